/*
 * kernels/common.c — what every backend shares: error strings (from the one list in moe.h) and
 * dtype sizes. Linked into the stage-2 object and into the CUDA object alike.
 */
#include "moe.h"

const char *moe_strerror(int err)
{
    switch (err) {
#define MOE_ERR_CASE(name, value, text)                                                            \
    case value:                                                                                    \
        return text;
        MOE_ERRORS(MOE_ERR_CASE)
#undef MOE_ERR_CASE
    default:
        return "unknown error";
    }
}

size_t moe_dtype_size(moe_dtype dt)
{
    return dt == MOE_F32 ? 4 : 2;
}
