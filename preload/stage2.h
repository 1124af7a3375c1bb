/*
 * preload/stage2.h — the contract between stage 1 (libmoepatch.so, every process) and stage 2
 * (libmoepatch_py.so, dlopened only inside CPython). No Python.h here: stage 1 must not see it.
 * Design choice: stage 2 hands back its audit hook and stage 1 registers it through a dlsym'd
 * PySys_AddAuditHook, so the only symbol stage 2 exports is its entry point.
 */
#ifndef MP_STAGE2_H
#define MP_STAGE2_H

#include <stddef.h>

#include "options.h"

#define MP_VERSION "0.1.0"

/* Bumped whenever struct mp_stage2_args or struct mp_options change: both objects of one build
   agree; a stage 2 from another build refuses instead of misreading the options. */
#define MP_STAGE2_ABI 2

#define MP_STAGE2_ENTRY "mp_stage2_init"

/* Both return codes of mp_stage2_init besides 0. */
#define MP_STAGE2_EABI (-1)   /* stage 1 and stage 2 come from different builds */
#define MP_STAGE2_EAGAIN (-2) /* already initialised in this process: one hook is enough */

/* Py_AuditHookFunction with the PyObject * spelt void *: the two are passed identically. */
typedef int (*mp_audit_hook_fn)(const char *event, void *args, void *user);

/* Everything points into stage 1's static storage, which lives as long as the process. */
struct mp_stage2_args {
    int abi; /* MP_STAGE2_ABI */
    const struct mp_options *options;
    const struct mp_option_def *table; /* to export every option row to Python generically */
    size_t table_len;
};

/* The one export macro of the preload objects (the version script still decides). */
#define MP_EXPORT __attribute__((visibility("default")))

/* Called once from stage 1's constructor, before Py_Initialize: no Python API may be used.
   0 and *hook set, or a negative MP_STAGE2_E* code. Stage 1 reaches it only through dlsym. */
MP_EXPORT int mp_stage2_init(const struct mp_stage2_args *args, mp_audit_hook_fn *hook);
typedef int (*mp_stage2_init_fn)(const struct mp_stage2_args *args, mp_audit_hook_fn *hook);

#endif /* MP_STAGE2_H */
