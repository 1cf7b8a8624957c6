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
MODEL_SRC = model/config.c model/layout.c model/balance.c model/dual.c parallel/ep_layout.c
# The CPU model's compute: built in fp32 (the trainer) and in fp64 (the gradient check).
COMPUTE_SRC = model/matmul.c model/ops.c model/moe.c model/model.c model/phase.c
DATA_SRC = data/shard.c data/loader.c
TOK_SRC = $(filter-out tokenizer/tok_main.c,$(wildcard tokenizer/*.c))
TRAIN_SRC = train/options.c train/optim.c train/lr.c train/ckpt.c train/ckpt_state.c train/trace.c train/trainer.c \
            train/profile.c train/memplan.c

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
        $(BUILD)/test_launch $(BUILD)/test_safetensors $(BUILD)/test_dual $(BUILD)/test_trace $(BUILD)/test_replay

.PHONY: all test test-build test-run test-cpu test-asan asan-build bench bench-compare bench-gpu gpu-check run clean \
        fixtures
all: train_moe moe_ckpt moe_tok moe_prepare moe_replay $(if $(NVCC_FOUND),train_moecu)

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

# Checkpoint inspection and the Hugging Face export/import (docs/hf.md).
HF_SRC = train/hf_map.c train/hf_export.c train/hf_import.c train/safetensors.c train/ckpt_model.c train/ckpt.c
moe_ckpt $(BUILD)/bin/moe_ckpt: train/ckpt_main.c $(call f32,$(HF_SRC) $(MODEL_SRC) $(TOK_SRC))
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

# The balancing lab: offline replay of the policy over traces and synthetic streams.
LAB_SRC = model/dual.c train/trace.c train/stream.c train/hindsight.c train/replay.c train/replay_report.c \
          model/balance.c train/ckpt.c
moe_replay $(BUILD)/bin/moe_replay: train/replay_main.c $(call f32,$(LAB_SRC))
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

# The CPU model's logits and loss on a batch of a checkpoint (tests/test_hf.sh).
$(BUILD)/hf_logits: tests/hf_logits.c $(CORE32) $(call f32,train/ckpt_model.c train/ckpt.c)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_safetensors: tests/test_safetensors.c $(call f32,train/safetensors.c tokenizer/tok_json.c tokenizer/tok_util.c)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_balance: tests/test_balance.c $(call f32,model/balance.c)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_dual: tests/test_dual.c $(call f32,$(LAB_SRC))
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_trace: tests/test_trace.c $(call f32,$(LAB_SRC))
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_replay: tests/test_replay.c $(call f32,$(LAB_SRC))
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

# A trained run's primal-dual quantities recomputed from its trace (tests/test_lab_trace.sh).
$(BUILD)/trace_dual: tests/trace_dual.c $(call f32,$(LAB_SRC))
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

# The hindsight solver on one instance from standard input (tests/test_hindsight_lp.py).
$(BUILD)/hindsight_lp: tests/hindsight_lp.c $(call f32,$(LAB_SRC))
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
# venv: tests/test_peers.sh and tests/test_gpu_check.sh run the PyTorch peer.
TEST_DEPS = build test venv
test:
	DEPS_VENV=$(PY_VENV) bash scripts/deps.sh $(if $(filter 1,$(NO_INSTALL)),--no-install) $(TEST_DEPS)
	$(MAKE) --no-print-directory -j$(JOBS) test-build
	$(MAKE) --no-print-directory test-run

TEST_TOOLS = $(BUILD)/gen_shards $(BUILD)/ckpt_edit $(BUILD)/fuzz_inputs $(BUILD)/hf_logits $(BUILD)/gpu_peak $(BUILD)/trace_dual $(BUILD)/hindsight_lp
test-build: train_moe moe_ckpt moe_tok moe_prepare moe_replay $(TEST_TOOLS) $(TESTS) $(if $(NVCC_FOUND),gpu-build)

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
	$(BUILD)/test_dual
	$(BUILD)/test_trace
	$(BUILD)/test_replay
	bash tests/test_replay.sh
	/usr/bin/python3 tests/test_hindsight_lp.py $(BUILD)/hindsight_lp
	$(BUILD)/test_tokenizer
	$(BUILD)/test_launch
	$(BUILD)/test_safetensors
	$(BUILD)/fuzz_inputs
	$(SH_TEST_ENV) bash tests/test_trainer.sh
	$(SH_TEST_ENV) bash tests/test_inputs.sh
	$(SH_TEST_ENV) bash tests/test_dist.sh
	$(SH_TEST_ENV) bash tests/test_report.sh
	$(SH_TEST_ENV) bash tests/test_prepare.sh

test-run: test-build
	$(MAKE) --no-print-directory test-cpu
	bash tests/test_hf.sh $(PY_VENV)
	./train_moe --config 1b --print-config | grep total
	bash tests/test_deps.sh
	bash tests/test_peers.sh $(PY_VENV)/bin/python
	$(MAKE) --no-print-directory -j$(JOBS) emu-build
	$(MAKE) --no-print-directory test-emu
	bash tests/test_lab_trace.sh $(BUILD)/emu/FP32/train_moecu
	bash tests/test_profile.sh $(BUILD)/emu/FP32/train_moecu
	$(if $(NVCC_FOUND),bash tests/test_memplan.sh ./train_moecu,@echo "skip test_memplan.sh: no nvcc, no train_moecu")
	$(MAKE) --no-print-directory -j$(JOBS) emu-race-build
	$(MAKE) --no-print-directory test-emu-race
	bash tests/test_gpu_check.sh $(PY_VENV)/bin/python

# Regenerates the committed PyTorch fixtures tests/fixtures/ref_*.bin
# (docs/fixtures.md); needed only when the reference or its cases change.
fixtures:
	DEPS_VENV=$(PY_VENV) bash scripts/deps.sh $(if $(filter 1,$(NO_INSTALL)),--no-install) venv
	$(PY_VENV)/bin/python scripts/reference/moe_reference.py --out tests/fixtures

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

asan-build: $(addprefix $(BUILD)/bin/,train_moe moe_ckpt moe_tok moe_prepare moe_replay) $(TEST_TOOLS) $(TESTS)

# ---------------------------------------------------------------- benchmarks

$(BUILD)/bench_cpu: bench/bench_cpu.c $(CORE32)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

# CPU throughput of the small preset (forward + backward), see README "Performance".
bench: $(BUILD)/bench_cpu
	$(BUILD)/bench_cpu small 8 256 5

# The dense bf16 peaks of known GPUs (bench/gpu_peaks.h), for MFU figures.
$(BUILD)/gpu_peak: bench/gpu_peak.c bench/gpu_peaks.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< -o $@

# The project against its PyTorch peers on this machine's CPU, small preset
# (bench/compare.sh; README "Performance").
bench-compare: train_moe $(BUILD)/gen_shards
	bash bench/compare.sh --python $(PY_VENV)/bin/python --out $(BUILD)/compare

# On a machine with a GPU: throughput of small, 1b and 3b (bench/gpu_bench.sh),
# and the whole GPU check (scripts/gpu_check.sh: builds, tests, benchmarks,
# peers; docs/gpu.md "What a GPU session runs").
bench-gpu: train_moecu $(BUILD)/gen_shards $(BUILD)/gpu_peak
	bash bench/gpu_bench.sh --out $(BUILD)/gpu_bench
GPU_CHECK_OUT ?= out/gpu_check_$(shell date +%Y%m%d_%H%M%S)
GPU_CHECK_ARGS ?=
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean: clean-gpu
	rm -rf $(BUILD) train_moe moe_ckpt moe_tok moe_prepare moe_replay

include gpu.mk
include tests/emu/emu.mk

# ---------------------------------------------------------------- test subsets
# Parts of `make test`, each building what it runs: for a quicker loop, and
# the checks tests/mutants.txt names. The test-emu-* ones take EMU_PRECISION
# (FP32 or BF16) like test-emu.
.PHONY: test-model test-reference test-balance test-lab test-infra test-trainer test-dist test-emu-gpu \
        test-emu-gpu-dist test-emu-one test-mutants
test-model: $(BUILD)/test_model $(BUILD)/test_gradcheck
	$(BUILD)/test_model
	$(BUILD)/test_gradcheck

test-reference: $(BUILD)/test_reference $(BUILD)/test_reference64
	$(BUILD)/test_reference
	$(BUILD)/test_reference64

test-balance: $(BUILD)/test_balance
	$(BUILD)/test_balance

test-lab: $(BUILD)/test_dual $(BUILD)/test_trace $(BUILD)/test_replay $(BUILD)/hindsight_lp moe_replay
	$(BUILD)/test_dual
	$(BUILD)/test_trace
	$(BUILD)/test_replay
	bash tests/test_replay.sh
	/usr/bin/python3 tests/test_hindsight_lp.py $(BUILD)/hindsight_lp

test-infra: $(BUILD)/test_train_infra
	$(BUILD)/test_train_infra

test-trainer: train_moe moe_ckpt $(BUILD)/gen_shards
	bash tests/test_trainer.sh

test-dist: train_moe moe_ckpt $(BUILD)/gen_shards
	bash tests/test_dist.sh

test-emu-gpu: $(EMU_BUILD)/test_gpu
	$(EMU_BUILD)/test_gpu tests/fixtures

test-emu-gpu-dist: $(EMU_BUILD)/test_gpu_dist
	$(EMU_BUILD)/test_gpu_dist

test-emu-one: emu-build $(BUILD)/gen_shards train_moe moe_ckpt
	bash tests/test_emu.sh $(EMU_BUILD)

# The standing check that the tests can fail: every planted bug of
# tests/mutants.txt, on a copy of the tree, must fail its check (README "Tests").
test-mutants:
	JOBS=$(JOBS) bash tests/mutants.sh
