/*
 * preload/log.c — the stage-2 logger: "moepatch: [error: |warning: |debug: ]message\n".
 * Design choice: plain write(2) to fd 2, not Python's sys.stderr: it works before the interpreter
 * is up, from threads without the GIL, and in forked children leaving with os._exit.
 */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

static int current_level = MP_LOG_WARN;

void mp_log_set_level(int level)
{
    current_level = level;
}

int mp_log_level(void)
{
    return current_level;
}

static const char *level_tag(int level)
{
    switch (level) {
    case MP_LOG_ERROR:
        return "error: ";
    case MP_LOG_WARN:
        return "warning: ";
    case MP_LOG_DEBUG:
        return "debug: ";
    default:
        return "";
    }
}

void mp_log(int level, const char *fmt, ...)
{
    char line[2048];
    va_list ap;
    if (level > current_level)
        return;
    int n = snprintf(line, sizeof line, "moepatch: %s", level_tag(level));
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';
    ssize_t rc = write(STDERR_FILENO, line, len);
    (void)rc;
}
