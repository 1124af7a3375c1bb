/*
 * preload/log.h — `moepatch: ...` lines on stderr for stage-2 C code (preload, detect).
 * Design choice: the level comes from MOEPATCH_LOG once, at stage-2 init; a line is formatted
 * into one buffer and written with one write(2), so lines from many ranks never interleave.
 */
#ifndef MP_LOG_H
#define MP_LOG_H

#include "options.h" /* enum mp_log_level */

/* MP_LOG_ERROR lines always print; the others when level <= MOEPATCH_LOG. */
__attribute__((format(printf, 2, 3))) void mp_log(int level, const char *fmt, ...);

void mp_log_set_level(int level);
int mp_log_level(void);

#endif /* MP_LOG_H */
