/*
 * preload/stage1.c — the LD_PRELOAD object: a constructor that runs in every process of the job.
 * Design choice: it references nothing but libc/libdl. CPython is found with dlsym(RTLD_DEFAULT),
 * which works whether the interpreter exports its API from the executable or from libpython;
 * every Py* function is called through a local pointer type, never linked, so bash, gcc, nvcc and
 * friends start exactly as without us (also under LD_BIND_NOW=1).
 */
#include <dlfcn.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "options.h"
#include "stage2.h"

typedef int (*add_audit_hook_fn)(mp_audit_hook_fn hook, void *user);
typedef const char *(*get_version_fn)(void);

/* Static because stage 2 keeps pointing at them for the life of the process. */
static struct mp_options options;
static struct mp_stage2_args stage2_args;
static atomic_int ran;

/* "3.11.7 (main, ...)" -> 311; 0 when unparsable. */
static int python_version(const char *v)
{
    int major = 0, minor = 0;
    while (*v >= '0' && *v <= '9')
        major = major * 10 + (*v++ - '0');
    if (*v++ != '.')
        return 0;
    while (*v >= '0' && *v <= '9')
        minor = minor * 10 + (*v++ - '0');
    return major * 100 + minor;
}

/* dladdr of our own code gives the path LD_PRELOAD named; stage 2 sits beside it. */
static void *load_stage2(void)
{
    Dl_info info;
    char path[PATH_MAX];
    if (!dladdr((void *)python_version, &info) || !info.dli_fname) {
        mp_log(MP_LOG_WARN, "cannot locate libmoepatch.so; library inert");
        return NULL;
    }
    const char *slash = strrchr(info.dli_fname, '/');
    int dir_len = slash ? (int)(slash - info.dli_fname + 1) : 0;
    if (snprintf(path, sizeof path, "%.*slibmoepatch_py.so", dir_len, info.dli_fname) >=
        (int)sizeof path) {
        mp_log(MP_LOG_WARN, "path of libmoepatch.so too long; library inert");
        return NULL;
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h)
        mp_log(MP_LOG_WARN, "cannot load %s; library inert", dlerror());
    return h;
}

__attribute__((constructor)) static void mp_stage1_init(void)
{
    if (atomic_exchange(&ran, 1))
        return;
    add_audit_hook_fn add_hook = (add_audit_hook_fn)dlsym(RTLD_DEFAULT, "PySys_AddAuditHook");
    if (!add_hook) {
        /* Not CPython >= 3.8. The failed lookup left an error string behind: the first dlerror()
           hands it over, the second frees it, so the program sees a clean dlerror() state and
           no memory of ours. */
        (void)dlerror();
        (void)dlerror();
        return;
    }

    char err[512];
    int rc = mp_options_parse(&options, NULL, err, sizeof err);
    if (!options.enabled)
        return;
    mp_log_set_level(options.log);
    if (rc < 0) {
        mp_log(MP_LOG_ERROR, "%s; library inert", err);
        return;
    }

    get_version_fn get_version = (get_version_fn)dlsym(RTLD_DEFAULT, "Py_GetVersion");
    const char *version = get_version ? get_version() : "";
    if (python_version(version) < 309) {
        mp_log(MP_LOG_INFO, "Python %.*s is older than 3.9; library inert",
               (int)strcspn(version, " "), version);
        return;
    }
    if (strstr(version, "free-threading")) {
        mp_log(MP_LOG_WARN,
               "free-threaded Python builds are not supported (the stable ABI does not "
               "load there); library inert");
        return;
    }

    void *h = load_stage2();
    if (!h)
        return;
    mp_stage2_init_fn init = (mp_stage2_init_fn)dlsym(h, MP_STAGE2_ENTRY);
    if (!init) {
        mp_log(MP_LOG_WARN, "libmoepatch_py.so lacks %s; library inert", MP_STAGE2_ENTRY);
        dlclose(h);
        return;
    }
    stage2_args =
        (struct mp_stage2_args){MP_STAGE2_ABI, &options, mp_option_table, mp_option_count};
    mp_audit_hook_fn hook = NULL;
    rc = init(&stage2_args, &hook);
    if (rc == MP_STAGE2_EAGAIN) {
        mp_log(MP_LOG_DEBUG, "another copy of libmoepatch.so already installed the hook");
        dlclose(h);
        return;
    }
    if (rc < 0 || !hook) {
        mp_log(MP_LOG_WARN, "libmoepatch_py.so is from another build; library inert");
        dlclose(h);
        return;
    }
    if (add_hook(hook, NULL) != 0)
        mp_log(MP_LOG_WARN, "PySys_AddAuditHook failed; library inert");
    else
        mp_log(MP_LOG_DEBUG, "audit hook installed");
}
