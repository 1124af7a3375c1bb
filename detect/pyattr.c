/*
 * detect/pyattr.c — attribute, shape and dtype probes for detection (see pyattr.h).
 * Limited API 3.9 only: strings go through PyUnicode_AsUTF8String + PyBytes_AsString, because
 * PyUnicode_AsUTF8 and PyUnicode_AsUTF8AndSize are not in the 3.9 stable ABI.
 */
#include "pyattr.h"

#include <string.h>

PyObject *mp__attr(PyObject *o, const char *name)
{
    if (!o)
        return NULL;
    PyObject *v = PyObject_GetAttrString(o, name);
    if (!v) {
        PyErr_Clear();
        return NULL;
    }
    if (v == Py_None) {
        Py_DECREF(v);
        return NULL;
    }
    return v;
}

int mp__has(PyObject *o, const char *name)
{
    PyObject *v = mp__attr(o, name);
    Py_XDECREF(v);
    return v != NULL;
}

/* UTF-8 copy of a str object into buf; 0 when it is not a str or does not fit. */
static int copy_unicode(PyObject *s, char *buf, size_t len)
{
    if (!PyUnicode_Check(s))
        return 0;
    PyObject *b = PyUnicode_AsUTF8String(s);
    if (!b) {
        PyErr_Clear();
        return 0;
    }
    const char *c = PyBytes_AsString(b);
    int ok = c && strlen(c) < len;
    if (ok)
        memcpy(buf, c, strlen(c) + 1);
    else
        PyErr_Clear();
    Py_DECREF(b);
    return ok;
}

int mp__attr_long(PyObject *o, const char *name, long *out)
{
    PyObject *v = mp__attr(o, name);
    int ok = v && PyLong_Check(v) && !PyBool_Check(v);
    if (ok) {
        long x = PyLong_AsLong(v);
        ok = !(x == -1 && PyErr_Occurred());
        if (ok)
            *out = x;
        else
            PyErr_Clear();
    }
    Py_XDECREF(v);
    return ok;
}

int mp__attr_double(PyObject *o, const char *name, double *out)
{
    PyObject *v = mp__attr(o, name);
    int ok = v && !PyBool_Check(v) && (PyFloat_Check(v) || PyLong_Check(v));
    if (ok) {
        double x = PyFloat_AsDouble(v);
        ok = !(x == -1.0 && PyErr_Occurred());
        if (ok)
            *out = x;
        else
            PyErr_Clear();
    }
    Py_XDECREF(v);
    return ok;
}

int mp__attr_bool(PyObject *o, const char *name, int *out)
{
    PyObject *v = mp__attr(o, name);
    int ok = v && PyLong_Check(v); /* bool is an int subclass */
    if (ok) {
        int t = PyObject_IsTrue(v);
        ok = t >= 0;
        if (ok)
            *out = t;
        else
            PyErr_Clear();
    }
    Py_XDECREF(v);
    return ok;
}

int mp__attr_str(PyObject *o, const char *name, char *buf, size_t len)
{
    PyObject *v = mp__attr(o, name);
    int ok = v && copy_unicode(v, buf, len);
    Py_XDECREF(v);
    return ok;
}

int mp__str(PyObject *o, char *buf, size_t len)
{
    if (len)
        buf[0] = '\0';
    if (!o)
        return 0;
    PyObject *s = PyObject_Str(o);
    if (!s) {
        PyErr_Clear();
        return 0;
    }
    int ok = copy_unicode(s, buf, len);
    Py_DECREF(s);
    return ok;
}

int mp__type_name(PyObject *o, char *buf, size_t len)
{
    if (len)
        buf[0] = '\0';
    return o && mp__attr_str((PyObject *)Py_TYPE(o), "__name__", buf, len);
}

int mp__type_module(PyObject *o, char *buf, size_t len)
{
    if (len)
        buf[0] = '\0';
    return o && mp__attr_str((PyObject *)Py_TYPE(o), "__module__", buf, len);
}

int mp__shape(PyObject *t, int64_t *dims, int max)
{
    PyObject *shape = mp__attr(t, "shape");
    if (!shape)
        return -1;
    int nd = -1;
    Py_ssize_t n = PySequence_Check(shape) ? PySequence_Size(shape) : -1;
    if (n >= 0 && n <= max) {
        nd = (int)n;
        for (int i = 0; i < nd; i++) {
            PyObject *d = PySequence_GetItem(shape, i);
            long long x = d && PyLong_Check(d) ? PyLong_AsLongLong(d) : -1;
            Py_XDECREF(d);
            if (x < 0) {
                nd = -1;
                break;
            }
            dims[i] = (int64_t)x;
        }
    }
    PyErr_Clear();
    Py_DECREF(shape);
    return nd;
}

int mp__dtype(PyObject *t, char *buf, size_t len)
{
    PyObject *dt = mp__attr(t, "dtype");
    int ok = mp__str(dt, buf, len);
    Py_XDECREF(dt);
    return ok;
}

Py_ssize_t mp__seq_len(PyObject *o)
{
    if (!o || !PySequence_Check(o))
        return -1;
    Py_ssize_t n = PySequence_Size(o);
    if (n < 0)
        PyErr_Clear();
    return n;
}

PyObject *mp__seq_item(PyObject *o, Py_ssize_t i)
{
    PyObject *v = PySequence_GetItem(o, i);
    if (!v)
        PyErr_Clear();
    return v;
}
