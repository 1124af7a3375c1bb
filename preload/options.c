/*
 * preload/options.c — the option table and its forgiving parser (mimalloc style).
 * Design choice: this runs in the stage-1 constructor of every Python process, so it works on
 * spans of the getenv() strings in place: no allocation, no locale, libc string functions only.
 * To add an option: a field in struct mp_options, one row below, one line in the README table.
 */
#include "options.h"

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const log_choices[] = {"warn", "info", "debug", NULL};
static const char *const backend_choices[] = {"auto", "cpu", "cuda", NULL};
static const char *const sync_choices[] = {"world", NULL};
static const char *const gemm_choices[] = {"auto", "cublas", "sm90", "sm90-ws", NULL};

const struct mp_option_def mp_option_table[] = {
    {.name = "MOEPATCH",
     .key = "enabled",
     .kind = MP_OPT_BOOL,
     .dflt = "1",
     .help = "on by default; 0 keeps the library loaded but inert (the A/B switch)",
     .offset = offsetof(struct mp_options, enabled)},
    {.name = "MOEPATCH_LOG",
     .key = "log",
     .kind = MP_OPT_ENUM,
     .dflt = "warn",
     .help = "warn: one summary line per model and refusals; info; debug (adds Python tracebacks)",
     .choices = log_choices,
     .offset = offsetof(struct mp_options, log)},
    {.name = "MOEPATCH_MODELS",
     .key = "models",
     .kind = MP_OPT_LIST,
     .dflt = "",
     .help = "allow-list of model families, e.g. bailing_moe_v2,qwen3_moe; empty: every family",
     .max = MP_MODELS_MAX,
     .offset = offsetof(struct mp_options, models)},
    {.name = "MOEPATCH_BACKEND",
     .key = "backend",
     .kind = MP_OPT_ENUM,
     .dflt = "auto",
     .help = "auto: the tensors' device decides; cpu or cuda force one backend",
     .choices = backend_choices,
     .offset = offsetof(struct mp_options, backend)},
    {.name = "MOEPATCH_GEMM",
     .key = "gemm",
     .kind = MP_OPT_ENUM,
     .dflt = "auto",
     .help = "routed experts' GEMMs on CUDA: auto (= sm90), cublas, sm90 (the Hopper engine: no "
             "host sync; warp-specialized), sm90-ws (the same, by the schedule's name); sm90 falls "
             "back to cublas off sm_90 or on shapes it does not tile",
     .choices = gemm_choices,
     .offset = offsetof(struct mp_options, gemm)},
    {.name = "MOEPATCH_CHECK",
     .key = "check",
     .kind = MP_OPT_INT,
     .dflt = "0",
     .help = "N: the first N calls of each block also run the original forward and compare",
     .max = INT_MAX,
     .offset = offsetof(struct mp_options, check)},
    {.name = "MOEPATCH_DIRECT_GRADS",
     .key = "direct_grads",
     .kind = MP_OPT_BOOL,
     .dflt = "1",
     .help = "nn.ModuleList experts: their gradients are written to .grad by the fused backward "
             "(one foreach add) instead of one autograd edge per weight; 0: through autograd",
     .offset = offsetof(struct mp_options, direct_grads)},
    {.name = "MOEPATCH_FAST_ROUTER",
     .key = "fast_router",
     .kind = MP_OPT_BOOL,
     .dflt = "1",
     .help = "routers with fp32 logits in bf16 models on CUDA (Ring, DeepSeek-V3, GLM-4.5 ...): "
             "their backward on tensor cores (fp32 dlogits as three bf16 parts, exact products), "
             "no fp32 copy of x saved; the logits stay torch's fp32 GEMM; 0: all through torch",
     .offset = offsetof(struct mp_options, fast_router)},
    {.name = "MOEPATCH_AUXFREE",
     .key = "auxfree",
     .kind = MP_OPT_BOOL,
     .dflt = "0",
     .help =
         "aux-loss-free load balancing: a per-expert bias on the expert choice only, updated after "
         "every optimizer step from the measured expert loads",
     .offset = offsetof(struct mp_options, auxfree)},
    {.name = "MOEPATCH_AUXFREE_RATE",
     .key = "auxfree_rate",
     .kind = MP_OPT_FLOAT,
     .dflt = "0.01",
     .help = "bias step per optimizer step: bias += rate * (1/E - load EMA), then mean-centred",
     .offset = offsetof(struct mp_options, auxfree_rate),
     .fmin = 0.0,
     .fmax = DBL_MAX,
     .open = MP_OPEN_MIN},
    {.name = "MOEPATCH_AUXFREE_MOMENTUM",
     .key = "auxfree_momentum",
     .kind = MP_OPT_FLOAT,
     .dflt = "0.9",
     .help = "EMA momentum m of the per-expert load fractions: ema = m * ema + (1 - m) * load",
     .offset = offsetof(struct mp_options, auxfree_momentum),
     .fmin = 0.0,
     .fmax = 1.0,
     .open = MP_OPEN_MAX},
    {.name = "MOEPATCH_AUXFREE_CAP",
     .key = "auxfree_cap",
     .kind = MP_OPT_FLOAT,
     .dflt = "2.0",
     .help = "each bias is clamped to [-cap, cap] after every update",
     .offset = offsetof(struct mp_options, auxfree_cap),
     .fmin = 0.0,
     .fmax = DBL_MAX,
     .open = MP_OPEN_MIN},
    {.name = "MOEPATCH_AUXFREE_WARMUP",
     .key = "auxfree_warmup",
     .kind = MP_OPT_INT,
     .dflt = "0",
     .help = "the first N optimizer steps leave the bias unchanged (loads are still measured)",
     .max = INT_MAX,
     .offset = offsetof(struct mp_options, auxfree_warmup)},
    {.name = "MOEPATCH_AUXFREE_SYNC",
     .key = "auxfree_sync",
     .kind = MP_OPT_INT,
     .dflt = "world",
     .help = "expert loads are summed over this torch.distributed group: world, or groups of N "
             "consecutive ranks (the expert-parallel group size)",
     .choices = sync_choices,
     .min = 1,
     .max = INT_MAX,
     .offset = offsetof(struct mp_options, auxfree_sync)},
    {.name = "MOEPATCH_TELEMETRY",
     .key = "telemetry",
     .kind = MP_OPT_PATH,
     .dflt = "",
     .help =
         "path of a .jsonl file: per-layer expert load EMA and bias every N steps, and a heatmap "
         "path.png at exit; empty: off",
     .max = MP_PATH_MAX,
     .offset = offsetof(struct mp_options, telemetry)},
    {.name = "MOEPATCH_TELEMETRY_EVERY",
     .key = "telemetry_every",
     .kind = MP_OPT_INT,
     .dflt = "10",
     .help = "N: optimizer steps between two telemetry records",
     .min = 1,
     .max = INT_MAX,
     .offset = offsetof(struct mp_options, telemetry_every)},
};
const size_t mp_option_count = sizeof mp_option_table / sizeof mp_option_table[0];

/* A bounded string builder with snprintf semantics: len counts what would have been written. */
struct sbuf {
    char *p;
    size_t cap;
    size_t len;
};

__attribute__((format(printf, 2, 3))) static void sb_add(struct sbuf *b, const char *fmt, ...)
{
    va_list ap;
    size_t room = b->len < b->cap ? b->cap - b->len : 0;
    va_start(ap, fmt);
    int n = vsnprintf(room ? b->p + b->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n > 0)
        b->len += (size_t)n;
}

/* Bytes of s without leading and trailing white space. */
static const char *trim(const char *s, size_t *n)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t len = strlen(s);
    while (len && isspace((unsigned char)s[len - 1]))
        len--;
    *n = len;
    return s;
}

static int span_ieq(const char *s, size_t n, const char *word)
{
    return strlen(word) == n && strncasecmp(s, word, n) == 0;
}

static int parse_bool(const char *s, size_t n, int *out)
{
    static const char *const on[] = {"1", "true", "yes", "on"};
    static const char *const off[] = {"0", "false", "no", "off"};
    for (size_t i = 0; i < sizeof on / sizeof on[0]; i++) {
        if (span_ieq(s, n, on[i])) {
            *out = 1;
            return 0;
        }
        if (span_ieq(s, n, off[i])) {
            *out = 0;
            return 0;
        }
    }
    return -1;
}

static int parse_enum(const char *const *choices, const char *s, size_t n, int *out)
{
    for (int i = 0; choices[i]; i++) {
        if (span_ieq(s, n, choices[i])) {
            *out = i;
            return 0;
        }
    }
    return -1;
}

static int parse_int(const struct mp_option_def *d, const char *s, size_t n, int *out)
{
    if (d->choices && span_ieq(s, n, d->choices[0])) {
        *out = 0;
        return 0;
    }
    char digits[32];
    if (n == 0 || n >= sizeof digits)
        return -1;
    memcpy(digits, s, n);
    digits[n] = '\0';
    char *end;
    errno = 0;
    long v = strtol(digits, &end, 10);
    if (errno || *end || v < d->min || v > d->max)
        return -1;
    *out = (int)v;
    return 0;
}

/* Plain decimal notation only (no hex, inf or nan), finite, within the row's bounds. */
static int parse_float(const struct mp_option_def *d, const char *s, size_t n, double *out)
{
    char text[64];
    if (n == 0 || n >= sizeof text || strspn(s, "0123456789.eE+-") < n)
        return -1;
    memcpy(text, s, n);
    text[n] = '\0';
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || *end || !isfinite(v))
        return -1;
    if ((d->open & MP_OPEN_MIN) ? !(v > d->fmin) : !(v >= d->fmin))
        return -1;
    if ((d->open & MP_OPEN_MAX) ? !(v < d->fmax) : !(v <= d->fmax))
        return -1;
    *out = v;
    return 0;
}

/* Any printable text (spaces included): a control character is a quoting accident. */
static int parse_path(const struct mp_option_def *d, const char *s, size_t n, char *out)
{
    if (n > (size_t)d->max)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (!isprint((unsigned char)s[i]))
            return -1;
    memcpy(out, s, n);
    out[n] = '\0';
    return 0;
}

/* Family names are identifiers; anything else (';', quotes, '/') is a typo worth reporting. */
static int parse_list(const struct mp_option_def *d, const char *s, size_t n, char *out)
{
    if (n > (size_t)d->max)
        return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!isalnum(c) && !strchr("_-., ", c))
            return -1;
    }
    memcpy(out, s, n);
    out[n] = '\0';
    return 0;
}

static void add_accepted(struct sbuf *b, const struct mp_option_def *d)
{
    switch (d->kind) {
    case MP_OPT_BOOL:
        sb_add(b, "1/true/yes/on or 0/false/no/off");
        break;
    case MP_OPT_ENUM:
        for (int i = 0; d->choices[i]; i++)
            sb_add(b, "%s%s", i ? ", " : "", d->choices[i]);
        break;
    case MP_OPT_INT:
        if (d->choices)
            sb_add(b, "%s or ", d->choices[0]);
        if (d->max == INT_MAX)
            sb_add(b, "an integer >= %ld", d->min);
        else
            sb_add(b, "an integer in %ld..%ld", d->min, d->max);
        break;
    case MP_OPT_LIST:
        sb_add(b, "comma-separated names (letters, digits, _-.), at most %ld characters", d->max);
        break;
    case MP_OPT_FLOAT:
        if (d->fmax == DBL_MAX)
            sb_add(b, "a number %s %g", (d->open & MP_OPEN_MIN) ? ">" : ">=", d->fmin);
        else
            sb_add(b, "a number in %c%g, %g%c", (d->open & MP_OPEN_MIN) ? '(' : '[', d->fmin,
                   d->fmax, (d->open & MP_OPEN_MAX) ? ')' : ']');
        break;
    case MP_OPT_PATH:
        sb_add(b, "a file path, at most %ld characters", d->max);
        break;
    }
}

/* The value as the user wrote it, shortened and with control characters replaced, so the error
   stays one line. */
static void add_value(struct sbuf *b, const char *s, size_t n)
{
    enum { SHOWN = 64 };
    for (size_t i = 0; i < n && i < SHOWN; i++)
        sb_add(b, "%c", isprint((unsigned char)s[i]) ? s[i] : '?');
    if (n > SHOWN)
        sb_add(b, "...");
}

static int parse_row(const struct mp_option_def *d, const char *s, size_t n, struct mp_options *o)
{
    char *field = (char *)o + d->offset;
    switch (d->kind) {
    case MP_OPT_BOOL:
        return parse_bool(s, n, (int *)field);
    case MP_OPT_ENUM:
        return parse_enum(d->choices, s, n, (int *)field);
    case MP_OPT_INT:
        return parse_int(d, s, n, (int *)field);
    case MP_OPT_LIST:
        return parse_list(d, s, n, field);
    case MP_OPT_FLOAT:
        return parse_float(d, s, n, (double *)field);
    case MP_OPT_PATH:
        return parse_path(d, s, n, field);
    }
    return -1;
}

static const char *libc_getenv(const char *name)
{
    return getenv(name);
}

int mp_options_parse(struct mp_options *o, const char *(*getenv_fn)(const char *), char *err,
                     size_t errlen)
{
    if (!getenv_fn)
        getenv_fn = libc_getenv;
    if (errlen)
        err[0] = '\0';
    memset(o, 0, sizeof *o);
    for (size_t i = 0; i < mp_option_count; i++) {
        const struct mp_option_def *d = &mp_option_table[i];
        size_t n;
        const char *s = trim(d->dflt, &n);
        if (parse_row(d, s, n, o) < 0) {
            snprintf(err, errlen, "%s: bad built-in default '%s'", d->name, d->dflt);
            return -1;
        }
    }
    for (size_t i = 0; i < mp_option_count; i++) {
        const struct mp_option_def *d = &mp_option_table[i];
        const char *v = getenv_fn(d->name);
        size_t n;
        const char *s = v ? trim(v, &n) : NULL;
        if (!s || n == 0)
            continue;
        if (parse_row(d, s, n, o) < 0) {
            struct sbuf b = {err, errlen, 0};
            sb_add(&b, "%s='", d->name);
            add_value(&b, s, n);
            sb_add(&b, "' is not valid (accepted: ");
            add_accepted(&b, d);
            sb_add(&b, ")");
            return -1;
        }
    }
    return 0;
}

int mp_options_render(char *buf, size_t len)
{
    struct sbuf b = {buf, len, 0};
    if (len)
        buf[0] = '\0';
    sb_add(&b, "| variable | default | accepted | meaning |\n|---|---|---|---|\n");
    for (size_t i = 0; i < mp_option_count; i++) {
        const struct mp_option_def *d = &mp_option_table[i];
        sb_add(&b, "| `%s` | %s%s%s | ", d->name, d->dflt[0] ? "`" : "(empty)", d->dflt,
               d->dflt[0] ? "`" : "");
        add_accepted(&b, d);
        sb_add(&b, " | %s |\n", d->help);
    }
    return b.len > INT_MAX ? INT_MAX : (int)b.len;
}
