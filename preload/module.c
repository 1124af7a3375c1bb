/*
 * preload/module.c — the builtin module `_moepatch`: the C functions the embedded bootstrap calls.
 *   detect(block)            -> dict (the struct moe_spec) or str (why the block is refused)
 *   run(op, backend, cfg, io) -> None or int; raises RuntimeError on a kernel error
 *   strerror(code)           -> str
 *   glue_source()            -> str: the text of preload/glue.py, compiled by the bootstrap on
 * demand auxfree_source()         -> str: the text of preload/auxfree.py, compiled by the glue on
 * demand Design choice: the glue passes raw data pointers and strides as Python ints (a dict per
 * call), so the kernels never see torch objects and the C API (kernels/moe.h) stays usable without
 * Python. The CUDA backend is dlopened from next to this object the first time a CUDA call arrives.
 */
#include <Python.h>

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "../detect/spec.h"
#include "../kernels/moe.h"
#include "module.h"

/* ---- spec -> dict ---- */

static int dict_set(PyObject *d, const char *key, PyObject *value)
{
    if (!value)
        return -1;
    int rc = PyDict_SetItemString(d, key, value);
    Py_DECREF(value);
    return rc;
}

static PyObject *spec_to_dict(const struct moe_spec *s)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    const struct moe_route_cfg *r = &s->route;
    int bad = dict_set(d, "family", PyUnicode_FromString(s->family)) ||
              dict_set(d, "recipe", PyLong_FromLong(r->recipe)) ||
              dict_set(d, "E", PyLong_FromLong(r->E)) || dict_set(d, "K", PyLong_FromLong(r->K)) ||
              dict_set(d, "n_group", PyLong_FromLong(r->n_group)) ||
              dict_set(d, "topk_group", PyLong_FromLong(r->topk_group)) ||
              dict_set(d, "norm", PyLong_FromLong(r->norm)) ||
              dict_set(d, "norm_eps", PyFloat_FromDouble(r->norm_eps)) ||
              dict_set(d, "scale", PyFloat_FromDouble(r->scale)) ||
              dict_set(d, "mask_value", PyFloat_FromDouble(r->mask_value)) ||
              dict_set(d, "H", PyLong_FromLongLong(s->H)) ||
              dict_set(d, "I", PyLong_FromLongLong(s->I)) ||
              dict_set(d, "layout", PyLong_FromLong(s->layout)) ||
              dict_set(d, "ret", PyLong_FromLong(s->ret)) ||
              dict_set(d, "router", PyUnicode_FromString(s->router)) ||
              dict_set(d, "logits_fp32", PyLong_FromLong(s->logits_fp32)) ||
              dict_set(d, "bias", PyUnicode_FromString(s->bias)) ||
              dict_set(d, "bias_on_block", PyBool_FromLong(s->bias_on_block)) ||
              dict_set(d, "experts", PyUnicode_FromString(s->experts)) ||
              dict_set(d, "gate", PyUnicode_FromString(s->gate)) ||
              dict_set(d, "up", PyUnicode_FromString(s->up)) ||
              dict_set(d, "down", PyUnicode_FromString(s->down)) ||
              dict_set(d, "shared", PyLong_FromLong(s->shared)) ||
              dict_set(d, "shared_name", PyUnicode_FromString(s->shared_name)) ||
              dict_set(d, "shared_gate_name", PyUnicode_FromString(s->shared_gate_name)) ||
              dict_set(d, "shared_I", PyLong_FromLongLong(s->shared_I)) ||
              dict_set(d, "jitter_attr", PyUnicode_FromString(s->jitter_attr));
    if (bad) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

static PyObject *py_detect(PyObject *self, PyObject *block)
{
    (void)self;
    struct moe_spec spec;
    char reason[MP_REASON] = "";
    memset(&spec, 0, sizeof spec);
    if (mp_detect(block, &spec, reason, sizeof reason) < 0) {
        PyErr_Clear();
        return PyUnicode_FromString(reason[0] ? reason : "not recognised as an MoE block");
    }
    return spec_to_dict(&spec);
}

/* ---- io dict -> struct moe_problem ---- */

/* Missing keys read as 0: optional tensors are simply absent from the dict. */
static int64_t get_i64(PyObject *d, const char *key)
{
    PyObject *v = PyDict_GetItemString(d, key);
    return v ? PyLong_AsLongLong(v) : 0;
}

static void *get_ptr(PyObject *d, const char *key)
{
    return (void *)(intptr_t)get_i64(d, key);
}

/* mats tuple: (ptr_array, base, es, rs, cs) */
static int parse_mats(PyObject *t, struct moe_mats *m)
{
    long long a[5];
    if (!PyArg_ParseTuple(t, "LLLLL", &a[0], &a[1], &a[2], &a[3], &a[4]))
        return -1;
    m->ptr = (void *const *)(intptr_t)a[0];
    m->base = (void *)(intptr_t)a[1];
    m->es = a[2];
    m->rs = a[3];
    m->cs = a[4];
    return 0;
}

/* mlp tuple: (n, H, I, gate_mats, up_mats, down_mats); absent key -> n = 0 */
static int parse_mlp(PyObject *d, const char *key, struct moe_mlp *m)
{
    PyObject *t = PyDict_GetItemString(d, key);
    memset(m, 0, sizeof *m);
    if (!t)
        return 0;
    PyObject *g, *u, *dn;
    long long H, I;
    if (!PyArg_ParseTuple(t, "iLLOOO", &m->n, &H, &I, &g, &u, &dn))
        return -1;
    m->H = H;
    m->I = I;
    return parse_mats(g, &m->gate) || parse_mats(u, &m->up) || parse_mats(dn, &m->down) ? -1 : 0;
}

/* cfg tuple: (dtype, recipe, E, K, n_group, topk_group, norm, norm_eps, scale, mask_value) */
static int parse_cfg(PyObject *cfg, struct moe_problem *p)
{
    struct moe_route_cfg *r = &p->route;
    int dtype, recipe;
    double eps, scale, mask;
    if (!PyArg_ParseTuple(cfg, "iiiiiiiddd", &dtype, &recipe, &r->E, &r->K, &r->n_group,
                          &r->topk_group, &r->norm, &eps, &scale, &mask))
        return -1;
    p->dtype = (moe_dtype)dtype;
    r->recipe = (moe_recipe)recipe;
    r->norm_eps = (float)eps;
    r->scale = (float)scale;
    r->mask_value = (float)mask;
    return 0;
}

static int parse_io(PyObject *io, struct moe_problem *p)
{
    if (!PyDict_Check(io)) {
        PyErr_SetString(PyExc_TypeError, "io must be a dict");
        return -1;
    }
    p->T = get_i64(io, "T");
    p->H = get_i64(io, "H");
    p->x = get_ptr(io, "x");
    p->x_rs = get_i64(io, "x_rs");
    p->logits = get_ptr(io, "logits");
    p->bias = get_ptr(io, "bias");
    p->bias_dtype = (moe_dtype)get_i64(io, "bias_dtype");
    p->idx64 = get_ptr(io, "idx64");
    p->router_w = get_ptr(io, "router_w");
    p->router_w_rs = get_i64(io, "router_w_rs");
    p->logits_out = get_ptr(io, "logits_out");
    p->shared_gate = get_ptr(io, "shared_gate");
    p->y = get_ptr(io, "y");
    p->idx = get_ptr(io, "idx");
    p->w = get_ptr(io, "w");
    p->counts = get_ptr(io, "counts");
    p->dy = get_ptr(io, "dy");
    p->dx = get_ptr(io, "dx");
    p->dlogits = get_ptr(io, "dlogits");
    p->d_shared_gate = get_ptr(io, "d_shared_gate");
    p->saved = get_ptr(io, "saved");
    p->counts_host = get_ptr(io, "counts_host");
    p->stream = get_ptr(io, "stream");
    p->engine = (int)get_i64(io, "engine");
    p->infer = (int)get_i64(io, "infer");
    p->logits_dtype = (moe_dtype)get_i64(io, "logits_dtype");
    p->workspace = get_ptr(io, "workspace");
    p->workspace_bytes = (size_t)get_i64(io, "workspace_bytes");
    if (PyErr_Occurred())
        return -1;
    return parse_mlp(io, "experts", &p->experts) || parse_mlp(io, "shared", &p->shared) ||
                   parse_mlp(io, "d_experts", &p->d_experts) ||
                   parse_mlp(io, "d_shared", &p->d_shared)
               ? -1
               : 0;
}

/* ---- backends ---- */

struct mp_backend {
    int (*forward)(struct moe_problem *);
    int (*backward)(struct moe_problem *);
    size_t (*workspace_bytes)(const struct moe_problem *, int);
    size_t (*saved_bytes)(const struct moe_problem *);
    const char *(*last_error)(void);
};

static size_t no_bytes(const struct moe_problem *p, int backward)
{
    (void)p;
    (void)backward;
    return 0;
}

static size_t no_saved(const struct moe_problem *p)
{
    (void)p;
    return 0;
}

static const struct mp_backend cpu_backend = {moe_forward_cpu, moe_backward_cpu, no_bytes, no_saved,
                                              NULL};
static struct mp_backend cuda_backend;
static int cuda_state; /* 0 not tried, 1 loaded, -1 failed */
static char cuda_error[PATH_MAX + 256];

/* The CUDA object lives next to this one; it needs libcudart/libcublas, which torch has loaded. */
static int load_cuda(void)
{
    if (cuda_state)
        return cuda_state;
    Dl_info info;
    char path[PATH_MAX];
    cuda_state = -1;
    if (!dladdr((void *)load_cuda, &info) || !info.dli_fname) {
        snprintf(cuda_error, sizeof cuda_error, "cannot locate libmoepatch_py.so");
        return cuda_state;
    }
    snprintf(path, sizeof path, "%s", info.dli_fname);
    char *slash = strrchr(path, '/');
    size_t dir_len = slash ? (size_t)(slash - path + 1) : 0;
    snprintf(path + dir_len, sizeof path - dir_len, "libmoepatch_cuda.so");
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(cuda_error, sizeof cuda_error, "%s", dlerror());
        return cuda_state;
    }
    cuda_backend.forward = (int (*)(struct moe_problem *))dlsym(h, "moe_forward_cuda");
    cuda_backend.backward = (int (*)(struct moe_problem *))dlsym(h, "moe_backward_cuda");
    cuda_backend.workspace_bytes =
        (size_t(*)(const struct moe_problem *, int))dlsym(h, "moe_workspace_bytes_cuda");
    cuda_backend.saved_bytes =
        (size_t(*)(const struct moe_problem *))dlsym(h, "moe_saved_bytes_cuda");
    cuda_backend.last_error = (const char *(*)(void))dlsym(h, "moe_last_error_cuda");
    if (!cuda_backend.forward || !cuda_backend.backward || !cuda_backend.workspace_bytes ||
        !cuda_backend.saved_bytes) {
        snprintf(cuda_error, sizeof cuda_error, "%s lacks the moe_*_cuda entry points", path);
        return cuda_state;
    }
    cuda_state = 1;
    return cuda_state;
}

static const struct mp_backend *backend_get(int which)
{
    if (which == 0)
        return &cpu_backend;
    if (load_cuda() < 0) {
        PyErr_Format(PyExc_RuntimeError, "CUDA backend unavailable: %s", cuda_error);
        return NULL;
    }
    return &cuda_backend;
}

static PyObject *run_error(const struct mp_backend *b, const char *op, int rc)
{
    const char *detail = b->last_error ? b->last_error() : NULL;
    PyErr_Format(PyExc_RuntimeError, "%s failed: %s%s%s", op, moe_strerror(rc),
                 detail && detail[0] ? ": " : "", detail ? detail : "");
    return NULL;
}

static PyObject *py_run(PyObject *self, PyObject *args)
{
    (void)self;
    const char *op;
    int which;
    PyObject *cfg, *io;
    if (!PyArg_ParseTuple(args, "siOO", &op, &which, &cfg, &io))
        return NULL;
    struct moe_problem p;
    memset(&p, 0, sizeof p);
    if (parse_cfg(cfg, &p) < 0 || parse_io(io, &p) < 0)
        return NULL;
    const struct mp_backend *b = backend_get(which);
    if (!b)
        return NULL;
    if (!strcmp(op, "workspace_forward"))
        return PyLong_FromSize_t(b->workspace_bytes(&p, 0));
    if (!strcmp(op, "workspace_backward"))
        return PyLong_FromSize_t(b->workspace_bytes(&p, 1));
    if (!strcmp(op, "saved"))
        return PyLong_FromSize_t(b->saved_bytes(&p));
    int (*fn)(struct moe_problem *) = !strcmp(op, "forward")    ? b->forward
                                      : !strcmp(op, "backward") ? b->backward
                                                                : NULL;
    if (!fn) {
        PyErr_Format(PyExc_ValueError, "unknown op %s", op);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = fn(&p);
    Py_END_ALLOW_THREADS if (rc < 0) return run_error(b, op, rc);
    Py_RETURN_NONE;
}

static PyObject *py_strerror(PyObject *self, PyObject *code)
{
    (void)self;
    long c = PyLong_AsLong(code);
    if (c == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(moe_strerror((int)c));
}

/* preload/bootstrap.S */
extern const char mp_glue_src[];
extern const char mp_auxfree_src[];

static PyObject *py_glue_source(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyUnicode_FromString(mp_glue_src);
}

static PyObject *py_auxfree_source(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyUnicode_FromString(mp_auxfree_src);
}

static PyMethodDef mp_methods[] = {
    {"glue_source", py_glue_source, METH_NOARGS, "glue_source() -> str"},
    {"auxfree_source", py_auxfree_source, METH_NOARGS, "auxfree_source() -> str"},
    {"detect", py_detect, METH_O, "detect(block) -> spec dict, or str: why the block is refused"},
    {"run", py_run, METH_VARARGS, "run(op, backend, cfg, io): forward/backward/workspace sizes"},
    {"strerror", py_strerror, METH_O, "strerror(code) -> str"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef mp_moduledef = {
    PyModuleDef_HEAD_INIT,
    "_moepatch",
    "libmoepatch: fused MoE forward/backward (C side)",
    -1,
    mp_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyObject *mp_module_create(void)
{
    return PyModule_Create(&mp_moduledef);
}
