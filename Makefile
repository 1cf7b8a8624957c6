# Build and test the MoE trainer. `make` builds the CPU trainer and tools;
# `make test` runs every CPU test (CI); `make bench` measures CPU throughput.
# See README.md.

CC ?= gcc
# The CPU build runs where it is compiled, so it may use every instruction of this machine.
CPU_ARCH ?= native
CFLAGS ?= -O3
CFLAGS += -std=c11 -march=$(CPU_ARCH) -fopenmp -ffp-contract=fast -Wall -Wextra -D_GNU_SOURCE
# Sanitizer flags for compiling and linking (make test-asan sets them).
SANITIZE ?=
CFLAGS += $(SANITIZE)
LDLIBS = -lm

# MPI (several CPU processes) when mpicc exists; USE_MPI=0 builds a single-process trainer.
MPICC ?= $(shell command -v mpicc 2>/dev/null)
USE_MPI ?= $(if $(MPICC),1,0)
ifeq ($(USE_MPI),1)
  LINK_CC = $(MPICC)
  MPI_DEF = -DUSE_MPI
else
  LINK_CC = $(CC)
endif

BUILD = build
# The GPU trainer is built wherever nvcc exists (CI compiles it; the GPU tests need a GPU).
NVCC_FOUND := $(shell command -v $(or $(NVCC),nvcc) 2>/dev/null)
# Host code shared by every trainer.
MODEL_SRC = model/config.c model/layout.c model/balance.c parallel/ep_layout.c
# The CPU model's compute: built in fp32 (the trainer) and in fp64 (the gradient check).
COMPUTE_SRC = model/matmul.c model/ops.c model/moe.c model/model.c
DATA_SRC = data/shard.c data/loader.c
TOK_SRC = $(filter-out tokenizer/tok_main.c,$(wildcard tokenizer/*.c))
TRAIN_SRC = train/options.c train/optim.c train/lr.c train/ckpt.c train/ckpt_state.c train/trainer.c

f32 = $(patsubst %.c,$(BUILD)/f32/%.o,$(1))
f64 = $(patsubst %.c,$(BUILD)/f64/%.o,$(1))
# The model with its optimizer, for tests and benchmarks.
CORE32 = $(call f32,$(MODEL_SRC) $(COMPUTE_SRC) train/optim.c)
CORE64 = $(call f64,$(MODEL_SRC) $(COMPUTE_SRC) train/optim.c)
# Everything a trainer links besides its backend and the communicator.
TRAINER32 = $(CORE32) $(call f32,$(DATA_SRC) $(TOK_SRC) $(filter-out train/optim.c,$(TRAIN_SRC)))
# The communicator, with or without MPI (the object's name records which).
COMM_OBJ = $(BUILD)/parallel/comm_mpi$(USE_MPI).o

TESTS = $(BUILD)/test_model $(BUILD)/test_gradcheck $(BUILD)/test_reference $(BUILD)/test_reference64 \
        $(BUILD)/test_data $(BUILD)/test_train_infra $(BUILD)/test_balance $(BUILD)/test_tokenizer \
        $(BUILD)/test_launch

.PHONY: all test test-build test-run test-cpu test-asan asan-build bench run clean
all: train_moe moe_ckpt moe_tok moe_prepare $(if $(NVCC_FOUND),train_moecu)

HEADERS = $(wildcard model/*.h data/*.h tokenizer/*.h train/*.h parallel/*.h util/*.h)
$(BUILD)/f32/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/f64/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DMOE_FP64 -c $< -o $@

$(COMM_OBJ): parallel/comm.c parallel/comm.h
	@mkdir -p $(dir $@)
	$(LINK_CC) $(CFLAGS) $(MPI_DEF) -c $< -o $@

# ---------------------------------------------------------------- programs

# Each program also as $(BUILD)/bin/NAME: the sanitizer build's copies (make test-asan).
train_moe $(BUILD)/bin/train_moe: train_moe.c $(TRAINER32) $(COMM_OBJ)
	@mkdir -p $(dir $@)
	$(LINK_CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

moe_tok $(BUILD)/bin/moe_tok: tokenizer/tok_main.c $(call f32,$(TOK_SRC))
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

moe_prepare $(BUILD)/bin/moe_prepare: data/prepare.c $(call f32,data/shard.c $(TOK_SRC))
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

# The quickstart: corpus, tokenizer, shards, a few minutes of training, a sample.
run:
	bash scripts/quickstart.sh

moe_ckpt $(BUILD)/bin/moe_ckpt: train/ckpt_main.c $(call f32,train/ckpt.c model/config.c)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

# ---------------------------------------------------------------- tests

$(BUILD)/gen_shards: tests/gen_shards.c $(call f32,data/shard.c)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/ckpt_edit: tests/ckpt_edit.c tests/ckpt_rewrite.h $(call f32,train/ckpt.c)
	$(CC) $(CFLAGS) $(filter %.c %.o,$^) -o $@ $(LDLIBS)

# Seeded mutants of every input format through its loader (tests/fuzz_inputs.c).
FUZZ_SRC = data/shard.c data/loader.c model/config.c model/layout.c model/balance.c train/ckpt.c \
           train/ckpt_state.c train/options.c train/lr.c train/optim.c $(TOK_SRC)
$(BUILD)/fuzz_inputs: tests/fuzz_inputs.c tests/ckpt_rewrite.h $(call f32,$(FUZZ_SRC))
	$(CC) $(CFLAGS) $(filter %.c %.o,$^) -o $@ $(LDLIBS)

$(BUILD)/test_model: tests/test_model.c $(CORE32)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_gradcheck: tests/test_gradcheck.c $(CORE64)
	$(CC) $(CFLAGS) -DMOE_FP64 $^ -o $@ $(LDLIBS)

$(BUILD)/test_reference: tests/test_reference.c tests/fixture.c $(CORE32)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_reference64: tests/test_reference.c tests/fixture.c $(CORE64)
	$(CC) $(CFLAGS) -DMOE_FP64 $^ -o $@ $(LDLIBS)

$(BUILD)/test_data: tests/test_data.c $(call f32,$(DATA_SRC))
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_train_infra: tests/test_train_infra.c tests/ckpt_rewrite.h \
                           $(call f32,train/optim.c train/lr.c train/ckpt.c train/ckpt_state.c model/layout.c model/config.c)
	$(CC) $(CFLAGS) $(filter %.c %.o,$^) -o $@ $(LDLIBS)

$(BUILD)/test_tokenizer: tests/test_tokenizer.c $(call f32,$(TOK_SRC))
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_balance: tests/test_balance.c $(call f32,model/balance.c)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

# Everything that runs on a CPU: the CPU trainer's tests, and the GPU
# trainer's CUDA code on the CPU emulator (tests/emu, test-emu); where nvcc
# exists also compiling the GPU trainer and its tests for a GPU (running them
# there is `make test-gpu`). First installs what a fresh Debian machine lacks
# (scripts/deps.sh; NO_INSTALL=1 refuses and lists it), then builds in
# parallel (JOBS, default: the number of cores), then runs the tests.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
NO_INSTALL ?= 0
# The Python environment with PyTorch and transformers (scripts/deps.sh venv).
PY_VENV ?= build/venv
TEST_DEPS = build test
test:
	DEPS_VENV=$(PY_VENV) bash scripts/deps.sh $(if $(filter 1,$(NO_INSTALL)),--no-install) $(TEST_DEPS)
	$(MAKE) --no-print-directory -j$(JOBS) test-build
	$(MAKE) --no-print-directory test-run

TEST_TOOLS = $(BUILD)/gen_shards $(BUILD)/ckpt_edit $(BUILD)/fuzz_inputs
test-build: train_moe moe_ckpt moe_tok moe_prepare $(TEST_TOOLS) $(TESTS) $(if $(NVCC_FOUND),gpu-build)

# The CPU tests: the C test programs and tools of $(BUILD), the shell tests on
# the programs in BIN_DIR. test-asan runs the same on the sanitizer build.
BIN_DIR ?= .
SH_TEST_ENV = MOE_BIN_DIR=$(BIN_DIR) MOE_BUILD=$(BUILD)
test-cpu:
	$(BUILD)/test_model
	$(BUILD)/test_gradcheck
	$(BUILD)/test_reference
	$(BUILD)/test_reference64
	$(BUILD)/test_data
	$(BUILD)/test_train_infra
	$(BUILD)/test_balance
	$(BUILD)/test_tokenizer
	$(BUILD)/test_launch
	$(BUILD)/fuzz_inputs
	$(SH_TEST_ENV) bash tests/test_trainer.sh
	$(SH_TEST_ENV) bash tests/test_inputs.sh
	$(SH_TEST_ENV) bash tests/test_dist.sh
	$(SH_TEST_ENV) bash tests/test_report.sh
	$(SH_TEST_ENV) bash tests/test_prepare.sh

test-run: test-build
	$(MAKE) --no-print-directory test-cpu
	./train_moe --config 1b --print-config | grep total
	bash tests/test_deps.sh
	$(MAKE) --no-print-directory -j$(JOBS) emu-build
	$(MAKE) --no-print-directory test-emu

# The C programs and tests built with AddressSanitizer and UndefinedBehavior-
# Sanitizer (-O1 -g, the first report fatal) into $(BUILD)/asan, then every
# CPU test (test-cpu) on them; the emulated CUDA code is C++ and not part of
# it. Leak checks are off: Open MPI's own allocations would fill the reports.
# OpenMP threads wait passively: spinning ones, slowed down by the sanitizer
# on a busy machine, took minutes per test instead of seconds.
ASAN_BUILD = $(BUILD)/asan
ASAN_FLAGS = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
test-asan:
	CFLAGS='-O1 -g' $(MAKE) --no-print-directory -j$(JOBS) BUILD=$(ASAN_BUILD) SANITIZE='$(ASAN_FLAGS)' asan-build
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 OMP_WAIT_POLICY=passive \
	    $(MAKE) --no-print-directory BUILD=$(ASAN_BUILD) BIN_DIR=$(ASAN_BUILD)/bin test-cpu

asan-build: $(addprefix $(BUILD)/bin/,train_moe moe_ckpt moe_tok moe_prepare) $(TEST_TOOLS) $(TESTS)

# ---------------------------------------------------------------- benchmarks

$(BUILD)/bench_cpu: bench/bench_cpu.c $(CORE32)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

# CPU throughput of the small preset (forward + backward), see README "Performance".
bench: $(BUILD)/bench_cpu
	$(BUILD)/bench_cpu small 8 256 5

clean: clean-gpu
	rm -rf $(BUILD) train_moe moe_ckpt moe_tok moe_prepare

include gpu.mk
include tests/emu/emu.mk
