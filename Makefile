# libmoepatch — build, test, bench. Out-of-tree into build/. See README.md.
#
#   make            build/libmoepatch.so (stage 1, the LD_PRELOAD object), build/libmoepatch_py.so
#                   (stage 2, loaded only inside Python), build/libmoepatch_cuda.so (if nvcc exists)
#   make test       C unit tests (Criterion) + Python integration tests under LD_PRELOAD (CPU)
#   make deps       install the Debian packages the build and the tests need (root)
#   DEBUG=1 ASAN=1 CUDA_HOME=... NVCC_GENCODE=... NVCC_DEFS=... PYTHON=...

CC          ?= gcc
CUDA_HOME   ?= /usr/local/cuda
NVCC        ?= $(CUDA_HOME)/bin/nvcc
NVCC_GENCODE ?= -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a
BUILD       ?= build
# The Python that runs the integration tests: it must have torch (Debian: python3-torch).
PYTHON      ?= /usr/bin/python3
# Interpreters the stage-2 object must load in (pyenv layout); missing ones are skipped by the test.
PYENV_ROOT  ?= $(HOME)/.pyenv
TEST_PYTHONS ?= $(wildcard $(PYENV_ROOT)/versions/3.9*/bin/python3 $(PYENV_ROOT)/versions/3.11*/bin/python3 $(PYENV_ROOT)/versions/3.13*/bin/python3)

# Stage 2 is built on the stable ABI with the oldest supported headers (3.9): newer headers declare
# functions that 3.9 lacks. Fall back to the system headers, with a warning, when 3.9's are absent.
PY39_INC    := $(firstword $(wildcard $(PYENV_ROOT)/versions/3.9*/include/python3.9))
ifeq ($(PY39_INC),)
PY_INC      := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['include'])")
$(warning Python 3.9 headers not found; building stage 2 against $(PY_INC): it may not load on older Pythons)
else
PY_INC      := $(PY39_INC)
endif
# The C detection tests embed an interpreter; any libpython with the stable ABI serves.
PY_EMBED_CFLAGS := $(shell $(PYTHON)-config --includes 2>/dev/null)
PY_EMBED_LIBS   := $(shell $(PYTHON)-config --embed --ldflags 2>/dev/null)

OPT       := -O2
SAN       :=
ifeq ($(DEBUG),1)
OPT       := -O0
endif
ifeq ($(ASAN),1)
SAN       := -fsanitize=address,undefined -fno-omit-frame-pointer
endif

WARN      := -Wall -Wextra -Werror
CFLAGS    += -std=c11 $(OPT) -g $(WARN) -fPIC -fvisibility=hidden -D_GNU_SOURCE -MMD -MP $(SAN)
LDFLAGS   += $(SAN)
PYFLAGS   := -DPy_LIMITED_API=0x03090000 -DMP_HAVE_PYTHON -I$(PY_INC)

# log.c (libc only) serves both stages; options.c is parsed once, in stage 1.
STAGE1_SRC := preload/stage1.c preload/options.c preload/log.c
STAGE2_SRC := $(filter-out preload/stage1.c preload/options.c,$(wildcard preload/*.c)) $(wildcard detect/*.c)
KERNEL_SRC := kernels/common.c $(wildcard kernels/cpu/*.c)
CUDA_SRC   := $(wildcard kernels/cuda/*.cu)

STAGE1_OBJ := $(STAGE1_SRC:%.c=$(BUILD)/obj/%.o)
STAGE2_OBJ := $(STAGE2_SRC:%.c=$(BUILD)/obj/%.o) $(BUILD)/obj/preload/bootstrap.o
KERNEL_OBJ := $(KERNEL_SRC:%.c=$(BUILD)/obj/%.o)
CUDA_OBJ   := $(CUDA_SRC:%.cu=$(BUILD)/obj/%.o)

HAVE_NVCC  := $(shell test -x $(NVCC) && echo 1)
LIBS       := $(BUILD)/libmoepatch.so $(BUILD)/libmoepatch_py.so
ifeq ($(HAVE_NVCC),1)
LIBS       += $(BUILD)/libmoepatch_cuda.so
endif

TEST_C_SRC := $(wildcard tests/c/test_*.c)
TEST_BINS  := $(TEST_C_SRC:tests/c/%.c=$(BUILD)/tests/%)

.PHONY: all test test-c test-py demo bench diag install deps format tidy compdb clean
all: $(LIBS)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(if $(filter $(STAGE2_SRC),$<),$(PYFLAGS)) -c $< -o $@

$(BUILD)/obj/preload/bootstrap.o: preload/bootstrap.S preload/bootstrap.py preload/glue.py preload/auxfree.py
	@mkdir -p $(dir $@)
	$(CC) -c $< -o $@ -Wa,-I,preload

# Stage 1: libc only. No CPython symbol, no libpython: it is mapped into every process.
$(BUILD)/libmoepatch.so: $(STAGE1_OBJ) preload/stage1.map
	$(CC) -shared $(LDFLAGS) -Wl,--version-script=preload/stage1.map -Wl,-z,defs -o $@ $(STAGE1_OBJ) -ldl

# Stage 2: CPython symbols stay undefined and bind to the running interpreter at dlopen.
$(BUILD)/libmoepatch_py.so: $(STAGE2_OBJ) $(KERNEL_OBJ) preload/stage2.map
	$(CC) -shared $(LDFLAGS) -Wl,--version-script=preload/stage2.map -o $@ $(STAGE2_OBJ) $(KERNEL_OBJ) -ldl -lm

# CUDA backend: dlopened on the first CUDA tensor. Links cudart/cuBLAS by soname, so the copies torch
# already loaded are the ones used.
NVCCFLAGS ?= -O3 -std=c++17 $(NVCC_GENCODE) -Xcompiler -fPIC,-fvisibility=hidden,-Wall,-Wextra,-Werror -lineinfo $(NVCC_DEFS)
# ptxas reports (C7515, C7520) when it serializes a kernel's wgmma pipeline, a silent 1.5-2x
# slowdown: fail.
$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@ 2>$@.log || { cat $@.log; rm -f $@; exit 1; }
	@cat $@.log; if grep -qE "C7515|C7520" $@.log; then echo "$<: ptxas serialized wgmma (C7515/C7520)"; rm -f $@; exit 1; fi

$(BUILD)/libmoepatch_cuda.so: $(CUDA_OBJ) $(BUILD)/obj/kernels/common.o kernels/cuda/cuda.map
	$(NVCC) -shared $(NVCC_GENCODE) -Xlinker --version-script=kernels/cuda/cuda.map -o $@ $(CUDA_OBJ) $(BUILD)/obj/kernels/common.o -lcudart -lcublas -lcublasLt

# ---- tests ----
$(BUILD)/tests/test_kernels_%: tests/c/test_kernels_%.c $(KERNEL_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/c -o $@ $< $(KERNEL_OBJ) $(LDFLAGS) -lcriterion -lm
$(BUILD)/tests/test_options: tests/c/test_options.c $(BUILD)/obj/preload/options.o
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $(filter %.c %.o,$^) $(LDFLAGS) -lcriterion
$(BUILD)/tests/test_detect: tests/c/test_detect.c $(filter $(BUILD)/obj/detect/%,$(STAGE2_OBJ)) $(KERNEL_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DMP_HAVE_PYTHON $(PY_EMBED_CFLAGS) -o $@ $(filter %.c %.o,$^) $(LDFLAGS) -lcriterion $(PY_EMBED_LIBS) -lm

# CUDA backend against the CPU reference; built only where nvcc is, skips at run time without a GPU.
ifeq ($(HAVE_NVCC),1)
$(BUILD)/tests/test_cuda_kernels: tests/c/test_cuda_kernels.c $(KERNEL_OBJ) $(BUILD)/libmoepatch_cuda.so
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -I$(CUDA_HOME)/include -Itests/c -o $@ $< $(KERNEL_OBJ) $(LDFLAGS) \
	  -L$(BUILD) -lmoepatch_cuda -Wl,-rpath,'$$ORIGIN/..' -L$(CUDA_HOME)/lib64 \
	  -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lcriterion -lm
else
TEST_BINS  := $(filter-out $(BUILD)/tests/test_cuda_kernels,$(TEST_BINS))
endif

test: test-c test-py
# Skipped tests (the CUDA ones on a machine without a GPU) are named with their reason: Criterion's
# summary does not count them.
# Under ASAN=1, LeakSanitizer would fail the CUDA suite on Criterion's own allocations.
test-c: $(TEST_BINS)
	@set -e; export LSAN_OPTIONS=suppressions=$(abspath tests/c/lsan.supp); \
	for t in $(TEST_BINS); do echo "== $$t"; \
	  $$t --jobs 2 --verbose > $$t.log 2>&1 || { cat $$t.log; exit 1; }; \
	  n=$$(grep -c '^\[SKIP\]' $$t.log || true); \
	  if [ "$$n" -gt 0 ]; then echo "skipped $$n: $$(grep -m1 '^\[SKIP\]' $$t.log | sed 's/^[^:]*::[^:]*: //')"; fi; \
	  grep Synthesis $$t.log; done
test-py: $(LIBS)
	MOEPATCH_LIB=$(abspath $(BUILD))/libmoepatch.so TEST_PYTHONS="$(TEST_PYTHONS)" \
	  $(PYTHON) -m pytest -q tests/py tests/gpu -p no:cacheprovider

demo: $(LIBS)
	$(PYTHON) examples/demo.py --lib $(abspath $(BUILD))/libmoepatch.so

# The GEMM engine's timing-diagnostic builds, $(BUILD)/diag1..3/libmoepatch_cuda.so (kernels/cuda/
# gemm_sm90.cu, MOE_DIAG; wrong outputs by design: never ship them); device_check.sh gemmdiag
# times them.
diag:
	for n in 1 2 3; do $(MAKE) BUILD=$(BUILD)/diag$$n NVCC_DEFS=-DMOE_DIAG=$$n $(BUILD)/diag$$n/libmoepatch_cuda.so || exit 1; done

bench: $(LIBS)
	$(PYTHON) tests/bench/bench_moe.py --lib $(abspath $(BUILD))/libmoepatch.so

PREFIX ?= /usr/local
install: $(LIBS)
	install -d $(DESTDIR)$(PREFIX)/lib
	install -m 0755 $(LIBS) $(DESTDIR)$(PREFIX)/lib/

# Debian packages: compiler and Criterion for the C tests, torch and pytest for the integration tests.
deps:
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc make libcriterion-dev python3-dev \
	  python3-torch python3-pytest clang-format clang-tidy

FORMAT_SRC = $(wildcard preload/*.c preload/*.h detect/*.c detect/*.h kernels/*.h kernels/*.c \
               kernels/cpu/*.c kernels/cpu/*.h kernels/cuda/*.cu kernels/cuda/*.h tests/c/*.c tests/c/*.h)
format:
	clang-format -i $(FORMAT_SRC)
format-check:
	clang-format --dry-run --Werror $(FORMAT_SRC)
# Library code only: the Criterion macros of the tests drown the report in noise.
TIDY_SRC = $(sort $(STAGE1_SRC) $(STAGE2_SRC) $(KERNEL_SRC))
tidy:
	clang-tidy --quiet $(TIDY_SRC) -- -std=c11 -D_GNU_SOURCE $(PYFLAGS) -I.
compdb: clean
	bear -- $(MAKE) all $(TEST_BINS)

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
