/*
 * preload/options.c — the option table and its forgiving parser (mimalloc style).
 * Design choice: this runs in the stage-1 constructor of every Python process, so it works on
 * spans of the getenv() strings in place: no allocation, no locale, libc string functions only.
 * To add an option: a field in struct mp_options, one row below, one line in the README table.
 */
#include "options.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const log_choices[] = {"warn", "info", "debug", NULL};
static const char *const backend_choices[] = {"auto", "cpu", "cuda", NULL};

const struct mp_option_def mp_option_table[] = {
    {"MOEPATCH", "enabled", MP_OPT_BOOL, "1",
     "on by default; 0 keeps the library loaded but inert (the A/B switch)", NULL, 0, 0,
     offsetof(struct mp_options, enabled)},
    {"MOEPATCH_LOG", "log", MP_OPT_ENUM, "warn",
     "warn: one summary line per model and refusals; info; debug (adds Python tracebacks)",
     log_choices, 0, 0, offsetof(struct mp_options, log)},
    {"MOEPATCH_MODELS", "models", MP_OPT_LIST, "",
     "allow-list of model families, e.g. bailing_moe_v2,qwen3_moe; empty: every family", NULL, 0,
     MP_MODELS_MAX, offsetof(struct mp_options, models)},
    {"MOEPATCH_BACKEND", "backend", MP_OPT_ENUM, "auto",
     "auto: the tensors' device decides; cpu or cuda force one backend", backend_choices, 0, 0,
     offsetof(struct mp_options, backend)},
    {"MOEPATCH_CHECK", "check", MP_OPT_INT, "0",
     "N: the first N calls of each block also run the original forward and compare", NULL, 0,
     INT_MAX, offsetof(struct mp_options, check)},
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
        if (d->max == INT_MAX)
            sb_add(b, "an integer >= %ld", d->min);
        else
            sb_add(b, "an integer in %ld..%ld", d->min, d->max);
        break;
    case MP_OPT_LIST:
        sb_add(b, "comma-separated names (letters, digits, _-.), at most %ld characters", d->max);
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
