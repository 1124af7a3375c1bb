/*
 * kernels/cpu/permute.c — grouping of the T*K slots by expert (a counting sort) and its inverse.
 * Design choice: the sort is stable in slot order, so within one expert the rows keep token order
 * and every later step that walks rows is deterministic without further sorting.
 */
#include <string.h>

#include "cpu.h"

int moe_permute_cpu(int64_t T, int K, int E, const int32_t *idx, int64_t *counts, int64_t *offsets,
                    int32_t *perm)
{
    if (T < 0 || K < 1 || E < 1 || !counts || !offsets || (T > 0 && (!idx || !perm)))
        return MOE_EINVAL;
    int64_t n = T * K;
    if (n > INT32_MAX) /* perm holds slot numbers in int32 */
        return MOE_EINVAL;
    for (int64_t s = 0; s < n; s++)
        if (idx[s] < 0 || idx[s] >= E)
            return MOE_EINVAL;
    memset(counts, 0, (size_t)E * sizeof *counts);
    for (int64_t s = 0; s < n; s++)
        counts[idx[s]]++;
    offsets[0] = 0;
    for (int e = 0; e < E; e++)
        offsets[e + 1] = offsets[e] + counts[e];
    /* counts doubles as the fill cursor: it is rebuilt while the slots are placed */
    memset(counts, 0, (size_t)E * sizeof *counts);
    for (int64_t s = 0; s < n; s++) {
        int e = idx[s];
        perm[offsets[e] + counts[e]++] = (int32_t)s;
    }
    return MOE_OK;
}

void moe__invert_perm(int64_t n, const int32_t *perm, int32_t *inv)
{
    for (int64_t r = 0; r < n; r++)
        inv[perm[r]] = (int32_t)r;
}
