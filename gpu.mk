# The GPU trainer (train_moecu) and its tests; see docs/gpu.md. Meant to be
# included from the Makefile (`-include gpu.mk` after its variables), or used
# on its own: make -f Makefile -f gpu.mk train_moecu
#
#   make train_moecu                  bf16 activations, for sm_90 (H100 / H200)
#   make train_moecu PRECISION=FP32   everything fp32 (the build the fixtures check tightly)
#   make train_moecu GPU_ARCH=sm_80   another GPU generation
#   make train_moecu GPU_DEBUG=1      synchronise after every kernel, -lineinfo
#   make gpu-build                    the trainer and the GPU test binary (compiles anywhere with nvcc)
#   make test-gpu                     GPU tests: kernels, fixtures, 10 training steps, a short run (needs a GPU)
#   make test-gpu-memcheck            compute-sanitizer memcheck of a tiny run and the kernel tests
#
# Uses the Makefile's BUILD, CC, CFLAGS, MODEL_SRC, DATA_SRC, TOK_SRC,
# TRAIN_SRC and its build/f32 pattern rule for the host C objects.

NVCC ?= nvcc
COMPUTE_SANITIZER ?= compute-sanitizer
GPU_ARCH ?= sm_90
PRECISION ?= BF16
GPU_DEBUG ?= 0

GPU_BUILD = $(BUILD)/gpu
NVCCFLAGS = -O3 -std=c++17 -arch=$(GPU_ARCH) -I. -Xcompiler -Wall,-Wextra
ifeq ($(PRECISION),FP32)
NVCCFLAGS += -DENABLE_FP32
else ifneq ($(PRECISION),BF16)
$(error PRECISION must be BF16 or FP32, not '$(PRECISION)')
endif
ifeq ($(GPU_DEBUG),1)
NVCCFLAGS += -DGPU_DEBUG_SYNC -lineinfo
endif
# libgomp: the host objects are compiled with -fopenmp.
GPU_LDLIBS = -lcublas -lcublasLt -lgomp -lm

GPU_KERNELS = embedding rmsnorm rope matmul attention swiglu classifier convert adamw gradnorm routing permute \
              grouped_gemm
GPU_KOBJ = $(patsubst %,$(GPU_BUILD)/kernels/%.o,$(GPU_KERNELS))
# The CPU model's compute files are not needed: the GPU runs its own. The
# communicator is always the single-process one (no MPI): train_moecu is one
# process on one GPU.
GPU_COMM_OBJ = $(GPU_BUILD)/comm_single.o
GPU_HOST_OBJ = $(patsubst %.c,$(BUILD)/f32/%.o,$(MODEL_SRC) $(DATA_SRC) $(TOK_SRC) $(TRAIN_SRC)) $(GPU_COMM_OBJ)
GPU_HEADERS = $(wildcard kernels/*.cuh model/*.h train/*.h data/*.h tokenizer/*.h dist/*.h tests/fixture.h)

# Everything GPU is rebuilt when the precision, arch or flags change: this
# file's content is the build configuration and is rewritten only when it differs.
GPU_CONFIG = $(GPU_BUILD)/config.txt
GPU_CONFIG_LINE = $(NVCC) $(NVCCFLAGS)
$(GPU_CONFIG): gpu-config-force
	@mkdir -p $(dir $@)
	@echo '$(GPU_CONFIG_LINE)' | cmp -s - $@ || echo '$(GPU_CONFIG_LINE)' > $@

.PHONY: gpu-config-force gpu-build test-gpu test-gpu-memcheck clean-gpu

$(GPU_COMM_OBJ): dist/comm.c dist/comm.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(GPU_BUILD)/kernels/%.o: kernels/%.cu $(GPU_HEADERS) $(GPU_CONFIG)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(GPU_BUILD)/train_moe.o: train_moe.cu $(GPU_HEADERS) $(GPU_CONFIG)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

# The backend without main(), for the tests.
$(GPU_BUILD)/train_moe_lib.o: train_moe.cu $(GPU_HEADERS) $(GPU_CONFIG)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -DTRAIN_MOECU_NO_MAIN -c $< -o $@

train_moecu: $(GPU_BUILD)/train_moe.o $(GPU_KOBJ) $(GPU_HOST_OBJ)
	@echo "train_moecu: PRECISION=$(PRECISION), GPU_ARCH=$(GPU_ARCH)"
	$(NVCC) $(NVCCFLAGS) $^ -o $@ $(GPU_LDLIBS)

$(GPU_BUILD)/test_gpu: tests/test_gpu.cu $(GPU_BUILD)/train_moe_lib.o $(GPU_KOBJ) $(GPU_HOST_OBJ) \
                       $(BUILD)/f32/tests/fixture.o $(GPU_HEADERS) $(GPU_CONFIG)
	$(NVCC) $(NVCCFLAGS) tests/test_gpu.cu $(GPU_BUILD)/train_moe_lib.o $(GPU_KOBJ) $(GPU_HOST_OBJ) \
	    $(BUILD)/f32/tests/fixture.o -o $@ $(GPU_LDLIBS)

gpu-build: train_moecu $(GPU_BUILD)/test_gpu

# Kernel unit tests, the fixtures, 10 training steps, bigger configs; then a
# short run of the trainer itself that must learn the synthetic chain of
# tests/gen_shards.c as the CPU trainer's test does (val_loss < 2.5 after 80 steps).
test-gpu: train_moecu $(GPU_BUILD)/test_gpu $(BUILD)/gen_shards
	$(GPU_BUILD)/test_gpu tests/fixtures
	@set -e; d=$$(mktemp -d); trap 'rm -rf "$$d"' EXIT; \
	./$(BUILD)/gen_shards "$$d" 64 200000 20000 1; \
	./train_moecu --config tiny --train-data "$$d/train_*.bin" --val-data "$$d/val_*.bin" -b 8 --lr 1e-2 \
	    --warmup-steps 5 --lr-min 1e-3 --steps 80 --eval-every 40 --print-every 20 | tee "$$d/out"; \
	last=$$(grep '^eval step' "$$d/out" | tail -1 | sed 's/.*val_loss \([0-9.]*\).*/\1/'); \
	awk -v v="$$last" 'BEGIN { if (v > 0 && v < 2.5) { print "ok   train_moecu learns: val_loss " v " < 2.5 after 80 steps"; exit 0 } \
	    print "FAIL train_moecu: val_loss \"" v "\" after 80 steps (want < 2.5)"; exit 1 }'

# Out-of-bounds and misaligned accesses, on a tiny run through every backend
# call (training, evaluation, checkpoint, sampling) and on the kernel tests.
test-gpu-memcheck: train_moecu $(GPU_BUILD)/test_gpu $(BUILD)/gen_shards
	@set -e; d=$$(mktemp -d); trap 'rm -rf "$$d"' EXIT; \
	./$(BUILD)/gen_shards "$$d" 64 20000 4000 1; \
	$(COMPUTE_SANITIZER) --tool memcheck --error-exitcode 1 ./train_moecu --config tiny \
	    --train-data "$$d/train_*.bin" --val-data "$$d/val_*.bin" -b 4 --steps 3 --eval-batches 2 \
	    --sample-tokens 8 --ckpt-dir "$$d/ckpt"
	$(COMPUTE_SANITIZER) --tool memcheck --error-exitcode 1 $(GPU_BUILD)/test_gpu --unit

clean-gpu:
	rm -rf $(GPU_BUILD) train_moecu
