/*
 * preload/module.h — the builtin module `_moepatch` (preload/module.c), created by stage 2 when the
 * interpreter is ready to run user code.
 */
#ifndef MP_MODULE_H
#define MP_MODULE_H

#include <Python.h>

/* A new reference to the module object, or NULL with a Python exception set. */
PyObject *mp_module_create(void);

#endif /* MP_MODULE_H */
