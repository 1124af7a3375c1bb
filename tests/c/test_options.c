/*
 * tests/c/test_options.c — the environment options (preload/options.c): defaults, every accepted
 * spelling, every kind of bad value and the one-line error that names it, the rendered table.
 * Design choice: the environment is a fake (an array of name=value pairs handed to the parser as
 * its getenv), so tests never touch the real environment and run in parallel.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdio.h>
#include <string.h>

#include "../../preload/options.h"

/* ---- a fake environment ---- */

#define FAKE_MAX 8
static const char *fake_names[FAKE_MAX];
static const char *fake_values[FAKE_MAX];
static int fake_n;

/* Parameters are copied into the test process (which may be a fresh exec), so they hold the text
   itself, never a pointer. */
struct value {
    char s[24];
};

static void env_set(const char *name, const char *value)
{
    fake_names[fake_n] = name;
    fake_values[fake_n] = value;
    fake_n++;
}

static const char *fake_getenv(const char *name)
{
    for (int i = 0; i < fake_n; i++)
        if (!strcmp(fake_names[i], name))
            return fake_values[i];
    return NULL;
}

static struct mp_options opts;
static char err[512];

static int parse(void)
{
    return mp_options_parse(&opts, fake_getenv, err, sizeof err);
}

/* Parse with one variable set. */
static int parse1(const char *name, const char *value)
{
    fake_n = 0;
    env_set(name, value);
    return parse();
}

/* An enum option: value parses, and the field reads want. */
#define EXPECT_ENUM(name, value, field, want)                                                      \
    do {                                                                                           \
        cr_assert_eq(parse1(name, value), 0);                                                      \
        cr_expect_eq(opts.field, want);                                                            \
    } while (0)

static void expect_error(const char *name, const char *value, const char *shown,
                         const char *accepted)
{
    char want[300];
    cr_assert_eq(parse1(name, value), -1, "%s=%s should be rejected", name, value);
    snprintf(want, sizeof want, "%s='%s'", name, shown);
    cr_expect(strstr(err, want), "error '%s' should name the variable and the value", err);
    cr_expect(strstr(err, accepted), "error '%s' should list '%s'", err, accepted);
    cr_expect(!strchr(err, '\n'), "error should be one line");
}

/* ---- defaults ---- */

Test(preload_options, defaults_when_nothing_is_set)
{
    fake_n = 0;
    cr_assert_eq(parse(), 0);
    cr_expect_eq(opts.enabled, 1);
    cr_expect_eq(opts.log, MP_LOG_WARN);
    cr_expect_str_eq(opts.models, "");
    cr_expect_eq(opts.backend, MP_BACKEND_AUTO);
    cr_expect_eq(opts.check, 0);
    cr_expect_eq(opts.auxfree, 0);
    cr_expect_eq(opts.auxfree_rate, 0.01);
    cr_expect_eq(opts.auxfree_momentum, 0.9);
    cr_expect_eq(opts.auxfree_cap, 2.0);
    cr_expect_eq(opts.auxfree_warmup, 0);
    cr_expect_eq(opts.auxfree_sync, 0, "world");
    cr_expect_str_eq(opts.telemetry, "");
    cr_expect_eq(opts.telemetry_every, 10);
    cr_expect_str_eq(err, "");
}

Test(preload_options, blank_values_mean_default)
{
    fake_n = 0;
    env_set("MOEPATCH", "");
    env_set("MOEPATCH_LOG", "   ");
    env_set("MOEPATCH_CHECK", "\t");
    cr_assert_eq(parse(), 0);
    cr_expect_eq(opts.enabled, 1);
    cr_expect_eq(opts.log, MP_LOG_WARN);
    cr_expect_eq(opts.check, 0);
}

Test(preload_options, table_rows_have_unique_names_and_keys)
{
    for (size_t i = 0; i < mp_option_count; i++) {
        cr_expect(!strncmp(mp_option_table[i].name, "MOEPATCH", 8));
        for (size_t j = i + 1; j < mp_option_count; j++) {
            cr_expect_str_neq(mp_option_table[i].name, mp_option_table[j].name);
            cr_expect_str_neq(mp_option_table[i].key, mp_option_table[j].key);
        }
    }
}

/* ---- MOEPATCH (bool) ---- */

ParameterizedTestParameters(preload_options, moepatch_on_spellings)
{
    static struct value on[] = {{"1"},  {"true"}, {"TRUE"}, {"Yes"},
                                {"on"}, {"ON"},   {" on "}, {"tRuE"}};
    return cr_make_param_array(struct value, on, sizeof on / sizeof on[0]);
}

ParameterizedTest(struct value *value, preload_options, moepatch_on_spellings)
{
    fake_n = 0;
    env_set("MOEPATCH", "0");
    cr_assert_eq(parse(), 0);
    cr_assert_eq(opts.enabled, 0);
    cr_assert_eq(parse1("MOEPATCH", value->s), 0, "'%s': %s", value->s, err);
    cr_expect_eq(opts.enabled, 1, "'%s' means on", value->s);
}

ParameterizedTestParameters(preload_options, moepatch_off_spellings)
{
    static struct value off[] = {{"0"},   {"false"}, {"FALSE"}, {"No"},
                                 {"off"}, {"OFF"},   {"off\n"}, {" 0"}};
    return cr_make_param_array(struct value, off, sizeof off / sizeof off[0]);
}

ParameterizedTest(struct value *value, preload_options, moepatch_off_spellings)
{
    cr_assert_eq(parse1("MOEPATCH", value->s), 0, "'%s': %s", value->s, err);
    cr_expect_eq(opts.enabled, 0, "'%s' means off", value->s);
}

ParameterizedTestParameters(preload_options, moepatch_bad_values)
{
    static struct value bad[] = {{"2"}, {"enable"}, {"tru"}, {"o"}, {"-1"}, {"yess"}, {"0x1"}};
    return cr_make_param_array(struct value, bad, sizeof bad / sizeof bad[0]);
}

ParameterizedTest(struct value *value, preload_options, moepatch_bad_values)
{
    expect_error("MOEPATCH", value->s, value->s, "1/true/yes/on or 0/false/no/off");
    cr_expect_eq(opts.enabled, 1, "a bad value leaves the default");
}

Test(preload_options, off_stays_off_when_a_later_value_is_bad)
{
    fake_n = 0;
    env_set("MOEPATCH", "off");
    env_set("MOEPATCH_LOG", "bogus");
    cr_assert_eq(parse(), -1);
    cr_expect_eq(opts.enabled, 0, "stage 1 reads enabled first and stays silent");
}

/* ---- MOEPATCH_LOG (enum) ---- */

Test(preload_options, log_levels_case_insensitive)
{
    EXPECT_ENUM("MOEPATCH_LOG", "warn", log, MP_LOG_WARN);
    EXPECT_ENUM("MOEPATCH_LOG", "INFO", log, MP_LOG_INFO);
    EXPECT_ENUM("MOEPATCH_LOG", " Debug ", log, MP_LOG_DEBUG);
}

Test(preload_options, log_bad_value_lists_levels)
{
    expect_error("MOEPATCH_LOG", "verbose", "verbose", "warn, info, debug");
    expect_error("MOEPATCH_LOG", "warning", "warning", "warn, info, debug");
    expect_error("MOEPATCH_LOG", "2", "2", "warn, info, debug");
    cr_expect_eq(opts.log, MP_LOG_WARN);
}

/* ---- MOEPATCH_MODELS (list) ---- */

Test(preload_options, models_raw_list_is_kept_trimmed)
{
    cr_assert_eq(parse1("MOEPATCH_MODELS", "  bailing_moe_v2, qwen3_moe,mixtral "), 0);
    cr_expect_str_eq(opts.models, "bailing_moe_v2, qwen3_moe,mixtral");
    cr_assert_eq(parse1("MOEPATCH_MODELS", "deepseek-v3.1"), 0);
    cr_expect_str_eq(opts.models, "deepseek-v3.1");
}

Test(preload_options, models_accepts_256_characters_rejects_257)
{
    char v[MP_MODELS_MAX + 2];
    memset(v, 'a', MP_MODELS_MAX);
    v[MP_MODELS_MAX] = '\0';
    cr_assert_eq(parse1("MOEPATCH_MODELS", v), 0, "%s", err);
    cr_expect_eq(strlen(opts.models), MP_MODELS_MAX);
    v[MP_MODELS_MAX] = 'a';
    v[MP_MODELS_MAX + 1] = '\0';
    cr_assert_eq(parse1("MOEPATCH_MODELS", v), -1);
    cr_expect(strstr(err, "MOEPATCH_MODELS='aaaa"), "%s", err);
    cr_expect(strstr(err, "...'"), "a long value is shortened: %s", err);
    cr_expect(strstr(err, "at most 256 characters"), "%s", err);
    cr_expect_str_eq(opts.models, "", "a bad value leaves the default");
}

Test(preload_options, models_rejects_punctuation)
{
    expect_error("MOEPATCH_MODELS", "qwen3_moe;mixtral", "qwen3_moe;mixtral", "comma-separated");
    expect_error("MOEPATCH_MODELS", "'qwen3_moe'", "'qwen3_moe'", "comma-separated");
    expect_error("MOEPATCH_MODELS", "a/b", "a/b", "comma-separated");
}

/* ---- MOEPATCH_BACKEND (enum) ---- */

Test(preload_options, backend_values_case_insensitive)
{
    EXPECT_ENUM("MOEPATCH_BACKEND", "auto", backend, MP_BACKEND_AUTO);
    EXPECT_ENUM("MOEPATCH_BACKEND", "CPU", backend, MP_BACKEND_CPU);
    EXPECT_ENUM("MOEPATCH_BACKEND", "Cuda", backend, MP_BACKEND_CUDA);
}

Test(preload_options, backend_bad_value_lists_backends)
{
    expect_error("MOEPATCH_BACKEND", "gpu", "gpu", "auto, cpu, cuda");
    expect_error("MOEPATCH_BACKEND", "cuda:0", "cuda:0", "auto, cpu, cuda");
}

/* ---- MOEPATCH_GEMM (enum) ---- */

Test(preload_options, gemm_values)
{
    EXPECT_ENUM("MOEPATCH_GEMM", "", gemm, MP_GEMM_AUTO);
    EXPECT_ENUM("MOEPATCH_GEMM", "cuBLAS", gemm, MP_GEMM_CUBLAS);
    EXPECT_ENUM("MOEPATCH_GEMM", "sm90", gemm, MP_GEMM_SM90);
    EXPECT_ENUM("MOEPATCH_GEMM", " SM90-WS ", gemm, MP_GEMM_SM90_WS);
}

Test(preload_options, gemm_bad_value_lists_choices)
{
    expect_error("MOEPATCH_GEMM", "sm100", "sm100", "auto, cublas, sm90, sm90-ws");
    expect_error("MOEPATCH_GEMM", "1", "1", "auto, cublas, sm90, sm90-ws");
}

/* ---- MOEPATCH_CHECK (int) ---- */

Test(preload_options, check_accepts_non_negative_integers)
{
    cr_assert_eq(parse1("MOEPATCH_CHECK", "0"), 0);
    cr_expect_eq(opts.check, 0);
    cr_assert_eq(parse1("MOEPATCH_CHECK", " 5 "), 0);
    cr_expect_eq(opts.check, 5);
    cr_assert_eq(parse1("MOEPATCH_CHECK", "2147483647"), 0);
    cr_expect_eq(opts.check, 2147483647);
}

ParameterizedTestParameters(preload_options, check_bad_values)
{
    static struct value bad[] = {{"-1"},  {"abc"},        {"5x"},
                                 {"1e3"}, {"2147483648"}, {"99999999999999999999"},
                                 {"1.5"}, {"five"}};
    return cr_make_param_array(struct value, bad, sizeof bad / sizeof bad[0]);
}

ParameterizedTest(struct value *value, preload_options, check_bad_values)
{
    expect_error("MOEPATCH_CHECK", value->s, value->s, "an integer >= 0");
    cr_expect_eq(opts.check, 0, "a bad value leaves the default");
}

/* ---- aux-loss-free balancing and telemetry ---- */

Test(preload_options, auxfree_is_a_bool)
{
    cr_assert_eq(parse1("MOEPATCH_AUXFREE", "on"), 0);
    cr_expect_eq(opts.auxfree, 1);
    expect_error("MOEPATCH_AUXFREE", "2", "2", "1/true/yes/on or 0/false/no/off");
    cr_expect_eq(opts.auxfree, 0, "a bad value leaves the default");
}

Test(preload_options, floats_accept_decimal_and_exponent_notation)
{
    cr_assert_eq(parse1("MOEPATCH_AUXFREE_RATE", " 0.001 "), 0, "%s", err);
    cr_expect_eq(opts.auxfree_rate, 0.001);
    cr_assert_eq(parse1("MOEPATCH_AUXFREE_RATE", "1e-3"), 0, "%s", err);
    cr_expect_eq(opts.auxfree_rate, 1e-3);
    cr_assert_eq(parse1("MOEPATCH_AUXFREE_RATE", "5"), 0, "%s", err);
    cr_expect_eq(opts.auxfree_rate, 5.0);
    cr_assert_eq(parse1("MOEPATCH_AUXFREE_CAP", ".5"), 0, "%s", err);
    cr_expect_eq(opts.auxfree_cap, 0.5);
}

Test(preload_options, momentum_is_in_zero_inclusive_one_exclusive)
{
    cr_assert_eq(parse1("MOEPATCH_AUXFREE_MOMENTUM", "0"), 0, "%s", err);
    cr_expect_eq(opts.auxfree_momentum, 0.0);
    cr_assert_eq(parse1("MOEPATCH_AUXFREE_MOMENTUM", "0.999"), 0, "%s", err);
    cr_expect_eq(opts.auxfree_momentum, 0.999);
    expect_error("MOEPATCH_AUXFREE_MOMENTUM", "1", "1", "a number in [0, 1)");
    expect_error("MOEPATCH_AUXFREE_MOMENTUM", "1.0", "1.0", "a number in [0, 1)");
    expect_error("MOEPATCH_AUXFREE_MOMENTUM", "-0.1", "-0.1", "a number in [0, 1)");
    cr_expect_eq(opts.auxfree_momentum, 0.9, "a bad value leaves the default");
}

ParameterizedTestParameters(preload_options, rate_bad_values)
{
    static struct value bad[] = {{"0"},     {"0.0"}, {"-0.01"}, {"nan"},  {"inf"}, {"1e400"},
                                 {"0x1p3"}, {"1,5"}, {"abc"},   {"0.1x"}, {"."},   {"--1"}};
    return cr_make_param_array(struct value, bad, sizeof bad / sizeof bad[0]);
}

ParameterizedTest(struct value *value, preload_options, rate_bad_values)
{
    expect_error("MOEPATCH_AUXFREE_RATE", value->s, value->s, "a number > 0");
    cr_expect_eq(opts.auxfree_rate, 0.01, "a bad value leaves the default");
}

Test(preload_options, cap_must_be_positive)
{
    expect_error("MOEPATCH_AUXFREE_CAP", "0", "0", "a number > 0");
    expect_error("MOEPATCH_AUXFREE_CAP", "-2", "-2", "a number > 0");
}

Test(preload_options, warmup_is_a_non_negative_integer)
{
    cr_assert_eq(parse1("MOEPATCH_AUXFREE_WARMUP", "100"), 0);
    cr_expect_eq(opts.auxfree_warmup, 100);
    expect_error("MOEPATCH_AUXFREE_WARMUP", "-1", "-1", "an integer >= 0");
    expect_error("MOEPATCH_AUXFREE_WARMUP", "1.5", "1.5", "an integer >= 0");
}

Test(preload_options, sync_is_world_or_a_positive_group_size)
{
    cr_assert_eq(parse1("MOEPATCH_AUXFREE_SYNC", "8"), 0);
    cr_expect_eq(opts.auxfree_sync, 8);
    cr_assert_eq(parse1("MOEPATCH_AUXFREE_SYNC", " World "), 0);
    cr_expect_eq(opts.auxfree_sync, 0);
    cr_assert_eq(parse1("MOEPATCH_AUXFREE_SYNC", "1"), 0);
    cr_expect_eq(opts.auxfree_sync, 1);
    expect_error("MOEPATCH_AUXFREE_SYNC", "0", "0", "world or an integer >= 1");
    expect_error("MOEPATCH_AUXFREE_SYNC", "all", "all", "world or an integer >= 1");
    expect_error("MOEPATCH_AUXFREE_SYNC", "-4", "-4", "world or an integer >= 1");
}

Test(preload_options, telemetry_keeps_the_path)
{
    cr_assert_eq(parse1("MOEPATCH_TELEMETRY", " /tmp/run 1/load.jsonl "), 0, "%s", err);
    cr_expect_str_eq(opts.telemetry, "/tmp/run 1/load.jsonl");
    cr_assert_eq(parse1("MOEPATCH_TELEMETRY", "rel/x-y_z.jsonl"), 0, "%s", err);
    cr_expect_str_eq(opts.telemetry, "rel/x-y_z.jsonl");
}

Test(preload_options, telemetry_rejects_control_characters_and_long_paths)
{
    expect_error("MOEPATCH_TELEMETRY", "a\tb", "a?b", "a file path");
    char v[MP_PATH_MAX + 2];
    memset(v, 'p', MP_PATH_MAX + 1);
    v[MP_PATH_MAX + 1] = '\0';
    cr_assert_eq(parse1("MOEPATCH_TELEMETRY", v), -1);
    cr_expect(strstr(err, "at most 1024 characters"), "%s", err);
    cr_expect_str_eq(opts.telemetry, "");
}

Test(preload_options, telemetry_every_is_at_least_one)
{
    cr_assert_eq(parse1("MOEPATCH_TELEMETRY_EVERY", "1"), 0);
    cr_expect_eq(opts.telemetry_every, 1);
    expect_error("MOEPATCH_TELEMETRY_EVERY", "0", "0", "an integer >= 1");
    cr_expect_eq(opts.telemetry_every, 10);
}

/* ---- the error message ---- */

Test(preload_options, error_replaces_control_characters)
{
    cr_assert_eq(parse1("MOEPATCH_LOG", "de\nbug"), -1);
    cr_expect(strstr(err, "MOEPATCH_LOG='de?bug'"), "%s", err);
    cr_expect(!strchr(err, '\n'));
}

Test(preload_options, error_fits_a_small_buffer)
{
    char small[16];
    fake_n = 0;
    env_set("MOEPATCH_BACKEND", "gpu");
    cr_assert_eq(mp_options_parse(&opts, fake_getenv, small, sizeof small), -1);
    cr_expect_eq(strlen(small), sizeof small - 1);
    cr_expect_str_eq(small, "MOEPATCH_BACKEN");
}

Test(preload_options, first_bad_value_in_table_order_is_reported)
{
    fake_n = 0;
    env_set("MOEPATCH_CHECK", "-5");
    env_set("MOEPATCH_LOG", "loud");
    cr_assert_eq(parse(), -1);
    cr_expect(strstr(err, "MOEPATCH_LOG='loud'"), "%s", err);
}

/* ---- the rendered table ---- */

Test(preload_options, render_has_one_row_per_option)
{
    char buf[8192];
    int n = mp_options_render(buf, sizeof buf);
    cr_assert_gt(n, 0);
    cr_assert_lt((size_t)n, sizeof buf);
    cr_expect_eq(strlen(buf), (size_t)n);
    cr_expect(!strncmp(buf, "| variable | default | accepted | meaning |\n", 44));
    int lines = 0;
    for (const char *p = buf; *p; p++)
        lines += *p == '\n';
    cr_expect_eq(lines, 2 + (int)mp_option_count);
    for (size_t i = 0; i < mp_option_count; i++) {
        char cell[64];
        snprintf(cell, sizeof cell, "| `%s` | ", mp_option_table[i].name);
        cr_expect(strstr(buf, cell), "row for %s", mp_option_table[i].name);
    }
    cr_expect(strstr(buf, "| `MOEPATCH_LOG` | `warn` | warn, info, debug |"), "%s", buf);
    cr_expect(strstr(buf, "| `MOEPATCH_MODELS` | (empty) |"), "%s", buf);
    cr_expect(strstr(buf, "| `MOEPATCH_AUXFREE_MOMENTUM` | `0.9` | a number in [0, 1) |"), "%s",
              buf);
    cr_expect(strstr(buf, "| `MOEPATCH_AUXFREE_SYNC` | `world` | world or an integer >= 1 |"), "%s",
              buf);
}

Test(preload_options, render_reports_the_size_it_needs)
{
    char big[4096], small[10];
    int n = mp_options_render(NULL, 0);
    cr_expect_eq(mp_options_render(big, sizeof big), n);
    cr_expect_eq(mp_options_render(small, sizeof small), n);
    cr_expect_eq(strlen(small), sizeof small - 1);
    cr_expect(!strncmp(big, small, sizeof small - 1));
}
