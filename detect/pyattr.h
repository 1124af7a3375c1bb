/*
 * detect/pyattr.h — small probes of Python objects for detection: optional attributes read as C
 * values, tensor shapes and dtypes. Everything here is on the CPython limited API (3.9).
 * Design choice: a probe never leaves a Python exception set. A missing attribute, an attribute
 * that is None and an attribute of the wrong type all read as "absent" (return 0), so callers
 * branch on presence and never on errors.
 */
#ifndef MP_PYATTR_H
#define MP_PYATTR_H

#include <stddef.h>
#include <stdint.h>

#include <Python.h>

#define MP_MAX_DIMS 8

/* New reference to o.<name>, or NULL when it is missing or None. */
PyObject *mp__attr(PyObject *o, const char *name);
/* 1 when o.<name> exists and is not None. */
int mp__has(PyObject *o, const char *name);

/* 1 and *out when o.<name> is an int (bool excluded) / a real number (int or float) / a bool or
   int / a str that fits buf; else 0. */
int mp__attr_long(PyObject *o, const char *name, long *out);
int mp__attr_double(PyObject *o, const char *name, double *out);
int mp__attr_bool(PyObject *o, const char *name, int *out);
int mp__attr_str(PyObject *o, const char *name, char *buf, size_t len);

/* str(o) / type(o).__name__ / type(o).__module__ into buf; 1 on success, else 0 (buf = ""). */
int mp__str(PyObject *o, char *buf, size_t len);
int mp__type_name(PyObject *o, char *buf, size_t len);
int mp__type_module(PyObject *o, char *buf, size_t len);

/* Number of dimensions of t.shape (a sequence of ints) with the sizes in dims[0..max), or -1 when
   t has no usable shape or more than max dimensions. */
int mp__shape(PyObject *t, int64_t *dims, int max);
/* str(t.dtype) into buf ("torch.bfloat16"); 1 on success. */
int mp__dtype(PyObject *t, char *buf, size_t len);

/* len(o) when o is a sequence (an nn.ModuleList is), else -1. */
Py_ssize_t mp__seq_len(PyObject *o);
/* New reference to o[i], or NULL. */
PyObject *mp__seq_item(PyObject *o, Py_ssize_t i);

#endif /* MP_PYATTR_H */
