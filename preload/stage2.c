/*
 * preload/stage2.c — the Python side of the preload: the audit hook and the install of `_moepatch`.
 * Design choice: the hook waits for the moment the interpreter is about to run user code, the first
 * `cpython.run_*` event (after site and sitecustomize, before the script/-m/-c), and then costs one
 * atomic load per audited event for the rest of the process. Built on the 3.9 stable ABI.
 *
 * Embedders (Py_Initialize + PyRun_* / PyObject_Call*) never raise `cpython.run_*`. Their fallback
 * trigger is the first `import` event (raised only for a module not yet in sys.modules) that comes
 * from Python code outside any import in progress:
 * the calling frame exists (C-level imports during start-up, of `site` and of readline have none)
 * and no frame on the stack is importlib's (everything site and sitecustomize import sits under
 * the frames of `import site`). So we never act while a module is half-executed. An embedder whose
 * first Python code is itself a module import is caught at its first top-level import afterwards.
 */
#include <Python.h>

#include <dlfcn.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "module.h"
#include "options.h"
#include "stage2.h"

/* preload/bootstrap.S: the text of preload/bootstrap.py, NUL-terminated. */
extern const char mp_bootstrap_src[];

static struct mp_options options;
static const struct mp_option_def *option_table;
static size_t option_count;
static atomic_int initialised;
static atomic_int triggered; /* set before any Python work: the install's own events pass through */

/* ---- _moepatch attributes ---- */

/* Every row of the option table, keyed by its `key`, so new rows reach the bootstrap unchanged. */
static PyObject *options_dict(void)
{
    PyObject *d = PyDict_New();
    for (size_t i = 0; d && i < option_count; i++) {
        const struct mp_option_def *row = &option_table[i];
        const char *field = (const char *)&options + row->offset;
        PyObject *v = NULL;
        switch (row->kind) {
        case MP_OPT_BOOL:
            v = PyBool_FromLong(*(const int *)field);
            break;
        case MP_OPT_ENUM:
            v = PyUnicode_FromString(row->choices[*(const int *)field]);
            break;
        case MP_OPT_INT:
            v = PyLong_FromLong(*(const int *)field);
            break;
        case MP_OPT_LIST:
            v = PyUnicode_FromString(field);
            break;
        case MP_OPT_FLOAT:
            v = PyFloat_FromDouble(*(const double *)field);
            break;
        case MP_OPT_PATH:
            v = PyUnicode_DecodeFSDefault(field);
            break;
        }
        if (!v || PyDict_SetItemString(d, row->key, v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return d;
}

/* The directory this object was loaded from, absolute when the path resolves; the CUDA object and
   anything else the bootstrap needs sit beside it. */
static PyObject *lib_dir(void)
{
    Dl_info info;
    char path[PATH_MAX];
    if (!dladdr((void *)options_dict, &info) || !info.dli_fname)
        return PyUnicode_FromString("");
    if (!realpath(info.dli_fname, path))
        snprintf(path, sizeof path, "%s", info.dli_fname);
    char *slash = strrchr(path, '/');
    if (slash)
        *slash = '\0';
    return PyUnicode_DecodeFSDefault(slash ? (path[0] ? path : "/") : ".");
}

static int add_object(PyObject *m, const char *name, PyObject *v)
{
    if (!v || PyModule_AddObject(m, name, v) < 0) {
        Py_XDECREF(v);
        return -1;
    }
    return 0;
}

/* ---- install ---- */

/* One warning line; the traceback too with MOEPATCH_LOG=debug. Leaves no exception set. */
static void report_failure(const char *what)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *repr = value ? PyObject_Repr(value) : NULL;
    PyObject *utf8 = repr ? PyUnicode_AsUTF8String(repr) : NULL;
    PyErr_Clear();
    mp_log(MP_LOG_WARN, "%s: %s; running unmodified", what,
           utf8 ? PyBytes_AsString(utf8) : "unknown error");
    Py_XDECREF(utf8);
    Py_XDECREF(repr);
    /* PyErr_Print of a SystemExit would end the program. */
    if (mp_log_level() >= MP_LOG_DEBUG && type &&
        !PyErr_GivenExceptionMatches(type, PyExc_SystemExit)) {
        PyErr_Restore(type, value, tb);
        PyErr_Print();
        return;
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

static void install(const char *event)
{
    PyObject *modules = PyImport_GetModuleDict();
    if (PyDict_GetItemString(modules, "_moepatch")) {
        mp_log(MP_LOG_DEBUG, "_moepatch already present (another copy of libmoepatch); skipped");
        return;
    }
    mp_log(MP_LOG_DEBUG, "installing on audit event %s", event);
    PyObject *m = mp_module_create();
    if (!m || add_object(m, "options", options_dict()) < 0 ||
        add_object(m, "lib_dir", lib_dir()) < 0 ||
        PyModule_AddStringConstant(m, "version", MP_VERSION) < 0) {
        report_failure("cannot create module _moepatch");
        Py_XDECREF(m);
        return;
    }
    /* In sys.modules before the bootstrap runs: it finds itself there. */
    PyObject *d = PyModule_GetDict(m);
    PyObject *code = NULL, *result = NULL;
    if (PyDict_SetItemString(modules, "_moepatch", m) == 0 &&
        PyDict_SetItemString(d, "__builtins__", PyEval_GetBuiltins()) == 0 &&
        (code = Py_CompileString(mp_bootstrap_src, "<moepatch bootstrap>", Py_file_input)))
        result = PyEval_EvalCode(code, d, d);
    if (!result) {
        report_failure("bootstrap failed");
        /* `_moepatch` absent is how users and tests tell an inert library. */
        if (PyDict_DelItemString(modules, "_moepatch") < 0)
            PyErr_Clear();
    }
    Py_XDECREF(result);
    Py_XDECREF(code);
    Py_DECREF(m);
}

/* ---- trigger ---- */

/* The embedder fallback (see the file comment): an import from Python code, outside any import. */
static int import_from_top_level(void)
{
    if (!Py_IsInitialized())
        return 0;
    PyObject *frame = (PyObject *)PyEval_GetFrame();
    if (!frame)
        return 0;
    Py_INCREF(frame);
    int top = 1;
    while (top && frame && frame != Py_None) {
        PyObject *code = PyObject_GetAttrString(frame, "f_code");
        PyObject *file = code ? PyObject_GetAttrString(code, "co_filename") : NULL;
        if (!file ||
            (PyUnicode_Check(file) &&
             (!PyUnicode_CompareWithASCIIString(file, "<frozen importlib._bootstrap>") ||
              !PyUnicode_CompareWithASCIIString(file, "<frozen importlib._bootstrap_external>"))))
            top = 0;
        Py_XDECREF(file);
        Py_XDECREF(code);
        PyObject *back = top ? PyObject_GetAttrString(frame, "f_back") : NULL;
        Py_DECREF(frame);
        frame = back;
        if (!frame)
            top = 0;
    }
    Py_XDECREF(frame);
    PyErr_Clear();
    return top;
}

static int is_main_interpreter(void)
{
    return PyInterpreterState_GetID(PyInterpreterState_Get()) == 0;
}

/* Everything up to the first trigger; never inlined into the hook, which stays a load and a test.
 */
__attribute__((noinline, cold)) static int on_event(const char *event)
{
    int run = strncmp(event, "cpython.run_", 12) == 0;
    if (!run && strcmp(event, "import") != 0)
        return 0;
    /* An event can arrive while an exception is being handled: keep it intact around our work. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int expected = 0;
    if (is_main_interpreter() && (run || import_from_top_level()) &&
        atomic_compare_exchange_strong(&triggered, &expected, 1))
        install(event);
    PyErr_Restore(type, value, tb);
    return 0;
}

/* Always 0: a non-zero return would abort the audited operation in the user's program. */
static int audit_hook(const char *event, void *args, void *user)
{
    (void)args;
    (void)user;
    if (atomic_load_explicit(&triggered, memory_order_relaxed))
        return 0;
    return on_event(event);
}

int mp_stage2_init(const struct mp_stage2_args *args, mp_audit_hook_fn *hook)
{
    if (!args || args->abi != MP_STAGE2_ABI)
        return MP_STAGE2_EABI;
    if (atomic_exchange(&initialised, 1))
        return MP_STAGE2_EAGAIN;
    options = *args->options;
    option_table = args->table;
    option_count = args->table_len;
    mp_log_set_level(options.log);
    *hook = audit_hook;
    return 0;
}
