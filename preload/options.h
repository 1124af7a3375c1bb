/*
 * preload/options.h — the environment options, one table of rows {name, key, kind, default, help}.
 * Design choice: defaults are written as the user would write them and go through the same parser,
 * so the table is the single source of truth for the code, `_moepatch.options` and the README.
 * Linked into stage 1 (libc only): no Python here, no allocation while parsing.
 */
#ifndef MP_OPTIONS_H
#define MP_OPTIONS_H

#include <stddef.h>

#define MP_MODELS_MAX 256
#define MP_PATH_MAX 1024

/* MOEPATCH_LOG values index the choice list from 0; errors are always printed. */
enum mp_log_level { MP_LOG_ERROR = -1, MP_LOG_WARN = 0, MP_LOG_INFO = 1, MP_LOG_DEBUG = 2 };
enum mp_backend_choice { MP_BACKEND_AUTO = 0, MP_BACKEND_CPU = 1, MP_BACKEND_CUDA = 2 };
enum mp_gemm_choice { MP_GEMM_AUTO = 0, MP_GEMM_CUBLAS = 1, MP_GEMM_SM90 = 2, MP_GEMM_SM90_WS = 3 };

struct mp_options {
    int enabled;                     /* MOEPATCH */
    int log;                         /* MOEPATCH_LOG: enum mp_log_level */
    char models[MP_MODELS_MAX + 1];  /* MOEPATCH_MODELS: raw comma list, "" = every family */
    int backend;                     /* MOEPATCH_BACKEND: enum mp_backend_choice */
    int gemm;                        /* MOEPATCH_GEMM: enum mp_gemm_choice */
    int check;                       /* MOEPATCH_CHECK: calls per block also run the original */
    int direct_grads;                /* MOEPATCH_DIRECT_GRADS: ModuleList grads to .grad */
    int fast_router;                 /* MOEPATCH_FAST_ROUTER: router bwd on TCs */
    int auxfree;                     /* MOEPATCH_AUXFREE: aux-loss-free load balancing */
    double auxfree_rate;             /* MOEPATCH_AUXFREE_RATE: bias step per optimizer step */
    double auxfree_momentum;         /* MOEPATCH_AUXFREE_MOMENTUM: EMA momentum of the loads */
    double auxfree_cap;              /* MOEPATCH_AUXFREE_CAP: |bias| <= cap */
    int auxfree_warmup;              /* MOEPATCH_AUXFREE_WARMUP: optimizer steps without updates */
    int auxfree_sync;                /* MOEPATCH_AUXFREE_SYNC: 0 = world, else group size */
    char telemetry[MP_PATH_MAX + 1]; /* MOEPATCH_TELEMETRY: .jsonl path, "" = off */
    int telemetry_every;             /* MOEPATCH_TELEMETRY_EVERY: optimizer steps between lines */
};

enum mp_option_kind {
    MP_OPT_BOOL,  /* int: 1/true/yes/on or 0/false/no/off */
    MP_OPT_ENUM,  /* int: index into choices */
    MP_OPT_INT,   /* int in [min, max]; with choices, the word choices[0] is accepted too and
                     stored as 0 (such a row has min >= 1) */
    MP_OPT_LIST,  /* char[max + 1]: comma-separated names */
    MP_OPT_FLOAT, /* double in fmin..fmax (ends excluded per `open`); decimal, finite */
    MP_OPT_PATH,  /* char[max + 1]: a file path, printable characters only */
};

/* MP_OPT_FLOAT: which ends of fmin..fmax are excluded. */
enum { MP_OPEN_MIN = 1, MP_OPEN_MAX = 2 };

struct mp_option_def {
    const char *name; /* environment variable */
    const char *key;  /* key in the `_moepatch.options` dict */
    enum mp_option_kind kind;
    const char *dflt;           /* default, spelled as in the environment */
    const char *help;           /* one line for the README table */
    const char *const *choices; /* MP_OPT_ENUM: NULL-terminated; MP_OPT_INT: its named value */
    long min, max;              /* MP_OPT_INT: bounds; MP_OPT_LIST, MP_OPT_PATH: max = length */
    size_t offset;              /* field in struct mp_options */
    double fmin, fmax;          /* MP_OPT_FLOAT: bounds */
    int open;                   /* MP_OPT_FLOAT: MP_OPEN_MIN | MP_OPEN_MAX */
};

extern const struct mp_option_def mp_option_table[];
extern const size_t mp_option_count;

/*
 * Fill *o from the environment (getenv_fn, NULL = getenv). Unset or blank variables take the
 * default; values are trimmed and compared case-insensitively. Returns 0, or -1 with a one-line
 * message in err naming the variable, the bad value and the accepted values. Rows are parsed in
 * table order and parsing stops at the first bad value; MOEPATCH comes first, so o->enabled is
 * valid even on error.
 */
int mp_options_parse(struct mp_options *o, const char *(*getenv_fn)(const char *), char *err,
                     size_t errlen);

/* The table as a Markdown table (the README's). Returns the length snprintf would: call with
   len 0 to size the buffer. */
int mp_options_render(char *buf, size_t len);

#endif /* MP_OPTIONS_H */
