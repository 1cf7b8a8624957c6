# The GPU trainer (train_moecu) and its tests; see docs/gpu.md. Meant to be
# included from the Makefile (`-include gpu.mk` after its variables), or used
# on its own: make -f Makefile -f gpu.mk train_moecu
#
#   make train_moecu                  bf16 activations, for sm_90 (H100 / H200)
#   make train_moecu PRECISION=FP32   everything fp32 (the build the fixtures check tightly)
#   make train_moecu GPU_ARCH=sm_80   another GPU generation
#   make train_moecu GPU_DEBUG=1      synchronise after every kernel, -lineinfo
#   make train_moecu USE_MPI=0        multi-GPU without MPI (torchrun / srun / scripts, --nccl-init DIR)
#   make gpu-build                    the trainer and the GPU test binaries (compiles anywhere with nvcc)
#   make test-gpu                     GPU tests: the memory-bound kernels' two paths, kernels, fixtures,
#                                     10 training steps, a short run, the multi-GPU code on one GPU (needs a GPU)
#   make test-gpu-memcheck            compute-sanitizer memcheck of a tiny run and the kernel tests
#   make test-launch                  the rendezvous without MPI, several processes on the CPU (no GPU)
#
# Uses the Makefile's BUILD, CC, CFLAGS, USE_MPI, MPICC, MODEL_SRC, DATA_SRC,
# TOK_SRC, TRAIN_SRC and its build/f32 pattern rule for the host C objects.
#
# Multi-GPU (docs/gpu.md): NCCL always. With USE_MPI=1 (the Makefile's
# default when mpicc exists) the host collectives are MPI's (parallel/comm.c) and
# NCCL is bootstrapped over MPI (mpirun); with USE_MPI=0 parallel/comm_nccl.c
# implements parallel/comm.h itself and ranks meet through parallel/launch.c.

NVCC ?= nvcc
# CUDA's headers for the C files that call the CUDA runtime / NCCL (parallel/comm_nccl.c);
# NCCL_HOME when NCCL is not installed with CUDA or in the system's paths.
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(shell command -v $(NVCC) 2>/dev/null))
NCCL_HOME ?=
CUDA_CFLAGS = $(if $(CUDA_HOME),-I$(CUDA_HOME)/include) $(if $(NCCL_HOME),-I$(NCCL_HOME)/include)
COMPUTE_SANITIZER ?= compute-sanitizer
GPU_ARCH ?= sm_90
PRECISION ?= BF16
GPU_DEBUG ?= 0

GPU_BUILD = $(BUILD)/gpu
# The architecture's number (sm_90 -> 90, sm_90a -> 90): the trainer refuses an older GPU with a clear message.
GPU_ARCH_NUM = $(shell echo '$(GPU_ARCH)' | tr -dc 0-9)
NVCCFLAGS = -O3 -std=c++17 -arch=$(GPU_ARCH) -I. -Xcompiler -Wall,-Wextra $(if $(NCCL_HOME),-I$(NCCL_HOME)/include) \
            $(if $(GPU_ARCH_NUM),-DMOE_GPU_ARCH=$(GPU_ARCH_NUM))
ifeq ($(PRECISION),FP32)
NVCCFLAGS += -DENABLE_FP32
else ifneq ($(PRECISION),BF16)
$(error PRECISION must be BF16 or FP32, not '$(PRECISION)')
endif
ifeq ($(GPU_DEBUG),1)
NVCCFLAGS += -DGPU_DEBUG_SYNC -lineinfo
endif
# libgomp: the host objects are compiled with -fopenmp.
GPU_LDLIBS = -lcublas -lcublasLt -lnccl -lgomp -lm $(if $(NCCL_HOME),-L$(NCCL_HOME)/lib)

GPU_KERNELS = embedding rmsnorm matmul attention swiglu classifier convert adamw gradnorm routing permute stats \
              grouped_gemm dispatch profiler
GPU_KOBJ = $(patsubst %,$(GPU_BUILD)/kernels/%.o,$(GPU_KERNELS))
# tests/test_kernels.cu: the memory-bound kernels (kernels/vec.cuh), against
# the CPU model's ops built in fp64 (TEST_KERNELS_HOST) and their scalar paths.
TEST_KERNELS_K = rmsnorm swiglu classifier permute convert adamw embedding gradnorm
TEST_KERNELS_HOST = $(BUILD)/f64/model/ops.o $(patsubst %.c,$(BUILD)/f32/%.o,model/config.c model/layout.c train/optim.c)
# The CPU model's compute files are not needed: the GPU runs its own.
GPU_HOST_BASE = $(patsubst %.c,$(BUILD)/f32/%.o,$(MODEL_SRC) $(DATA_SRC) $(TOK_SRC) $(TRAIN_SRC))
# The communicator. With MPI: parallel/comm.c over MPI plus the NCCL bootstrap
# from it; without: parallel/comm_nccl.c implements parallel/comm.h with NCCL, and
# parallel/launch.c finds the ranks. The second set is compiled in every build
# (gpu-build) and linked into the single-process GPU test of the multi-GPU code.
GPU_COMM_HOST = $(GPU_BUILD)/comm_nccl_host.o $(BUILD)/f32/parallel/launch.o
ifeq ($(USE_MPI),1)
GPU_COMM_OBJ = $(GPU_BUILD)/comm_mpi.o $(GPU_BUILD)/comm_nccl_mpi.o $(BUILD)/f32/parallel/launch.o
# MPI's link flags in a form nvcc accepts (-L/-l as they are, -Wl,x as -Xlinker x, the rest to the host compiler).
gpu_comma := ,
MPI_LINK_RAW := $(or $(shell $(MPICC) --showme:link 2>/dev/null),$(wordlist 2,999,$(shell $(MPICC) -link_info 2>/dev/null)))
MPI_NVCC_LIBS := $(foreach f,$(MPI_LINK_RAW),$(if $(filter -L% -l%,$(f)),$(f),$(if $(filter -Wl$(gpu_comma)%,$(f)),-Xlinker $(patsubst -Wl$(gpu_comma)%,%,$(f)),-Xcompiler $(f))))
GPU_LDLIBS += $(MPI_NVCC_LIBS)
else
GPU_COMM_OBJ = $(GPU_COMM_HOST)
endif
GPU_HOST_OBJ = $(GPU_HOST_BASE) $(GPU_COMM_OBJ)
GPU_HEADERS = $(wildcard kernels/*.cuh model/*.h train/*.h data/*.h tokenizer/*.h parallel/*.h tests/fixture.h)

# Everything GPU is rebuilt when the precision, arch or flags change: this
# file's content is the build configuration and is rewritten only when it differs.
GPU_CONFIG = $(GPU_BUILD)/config.txt
GPU_CONFIG_LINE = $(NVCC) $(NVCCFLAGS)
$(GPU_CONFIG): gpu-config-force
	@mkdir -p $(dir $@)
	@echo '$(GPU_CONFIG_LINE)' | cmp -s - $@ || echo '$(GPU_CONFIG_LINE)' > $@

.PHONY: gpu-config-force gpu-build test-gpu test-gpu-memcheck test-launch clean-gpu

$(GPU_BUILD)/comm_mpi.o: parallel/comm.c parallel/comm.h
	@mkdir -p $(dir $@)
	$(MPICC) $(CFLAGS) -DUSE_MPI -c $< -o $@

$(GPU_BUILD)/comm_nccl_mpi.o: parallel/comm_nccl.c parallel/comm_nccl.h parallel/comm.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(CUDA_CFLAGS) -c $< -o $@

$(GPU_BUILD)/comm_nccl_host.o: parallel/comm_nccl.c parallel/comm_nccl.h parallel/comm.h parallel/launch.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(CUDA_CFLAGS) -DCOMM_NCCL_HOST -c $< -o $@

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

# The objects' names record MPI or not; this one is relinked when USE_MPI changes.
GPU_LINK_CONFIG = $(GPU_BUILD)/link_mpi$(USE_MPI).stamp
$(GPU_LINK_CONFIG):
	@mkdir -p $(dir $@)
	@rm -f $(GPU_BUILD)/link_mpi*.stamp
	@touch $@

train_moecu: $(GPU_BUILD)/train_moe.o $(GPU_KOBJ) $(GPU_HOST_OBJ) $(GPU_LINK_CONFIG)
	@echo "train_moecu: PRECISION=$(PRECISION), GPU_ARCH=$(GPU_ARCH), MPI=$(USE_MPI)"
	$(NVCC) $(NVCCFLAGS) $(filter-out $(GPU_LINK_CONFIG),$^) -o $@ $(GPU_LDLIBS)

$(GPU_BUILD)/test_gpu: tests/test_gpu.cu $(GPU_BUILD)/train_moe_lib.o $(GPU_KOBJ) $(GPU_HOST_OBJ) \
                       $(BUILD)/f32/tests/fixture.o $(GPU_HEADERS) $(GPU_CONFIG) $(GPU_LINK_CONFIG)
	$(NVCC) $(NVCCFLAGS) tests/test_gpu.cu $(GPU_BUILD)/train_moe_lib.o $(GPU_KOBJ) $(GPU_HOST_OBJ) \
	    $(BUILD)/f32/tests/fixture.o -o $@ $(GPU_LDLIBS)

# The multi-GPU code on one GPU (tests/test_gpu_dist.cu): no MPI, the build-without-MPI communicator.
$(GPU_BUILD)/test_gpu_dist: tests/test_gpu_dist.cu $(GPU_BUILD)/train_moe_lib.o $(GPU_KOBJ) $(GPU_HOST_BASE) \
                            $(GPU_COMM_HOST) $(GPU_HEADERS) $(GPU_CONFIG)
	$(NVCC) $(NVCCFLAGS) tests/test_gpu_dist.cu $(GPU_BUILD)/train_moe_lib.o $(GPU_KOBJ) $(GPU_HOST_BASE) \
	    $(GPU_COMM_HOST) -o $@ $(filter-out $(MPI_NVCC_LIBS),$(GPU_LDLIBS)) -lpthread

$(GPU_BUILD)/test_kernels: tests/test_kernels.cu $(patsubst %,$(GPU_BUILD)/kernels/%.o,$(TEST_KERNELS_K)) \
                           $(TEST_KERNELS_HOST) $(GPU_HEADERS) $(GPU_CONFIG)
	$(NVCC) $(NVCCFLAGS) tests/test_kernels.cu $(patsubst %,$(GPU_BUILD)/kernels/%.o,$(TEST_KERNELS_K)) \
	    $(TEST_KERNELS_HOST) -o $@ $(GPU_LDLIBS)

# The fused attention and its tensor-core building blocks (kernels/mma.cuh) against the CPU model's attention.
$(GPU_BUILD)/test_attention: tests/test_attention.cu $(GPU_BUILD)/kernels/attention.o $(BUILD)/f32/model/ops.o \
                             $(GPU_HEADERS) $(GPU_CONFIG)
	$(NVCC) $(NVCCFLAGS) tests/test_attention.cu $(GPU_BUILD)/kernels/attention.o $(BUILD)/f32/model/ops.o -o $@ \
	    -lgomp -lm

# The grouped expert GEMMs (device and cuBLAS paths) against a loop over experts on the host.
$(GPU_BUILD)/test_grouped_gemm: tests/test_grouped_gemm.cu $(GPU_BUILD)/kernels/grouped_gemm.o $(GPU_HEADERS) \
                                $(GPU_CONFIG)
	$(NVCC) $(NVCCFLAGS) tests/test_grouped_gemm.cu $(GPU_BUILD)/kernels/grouped_gemm.o -o $@ -lcublas -lm

gpu-build: train_moecu $(GPU_BUILD)/test_gpu $(GPU_BUILD)/test_gpu_dist $(GPU_BUILD)/test_attention \
           $(GPU_BUILD)/test_grouped_gemm $(GPU_BUILD)/test_kernels $(GPU_BUILD)/gpu_versions

# The CUDA driver, runtime, cuBLAS and NCCL versions this machine loads (scripts/gpu_check.sh).
# Plain flags, not NVCCFLAGS: it must not depend on (or rebuild) the trainer's configuration.
$(GPU_BUILD)/gpu_versions: bench/gpu_versions.cu kernels/common.cuh util/cuda_check.h util/util.h
	@mkdir -p $(dir $@)
	$(NVCC) -O2 -std=c++17 -I. $(if $(NCCL_HOME),-I$(NCCL_HOME)/include) $< -o $@ -lcublas -lnccl \
	    $(if $(NCCL_HOME),-L$(NCCL_HOME)/lib)

# The rendezvous of parallel/launch.c with several processes (fork); CPU only.
$(BUILD)/test_launch: tests/test_launch.c $(BUILD)/f32/parallel/launch.o
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

test-launch: $(BUILD)/test_launch
	$(BUILD)/test_launch

# Kernel unit tests, the fixtures, 10 training steps, bigger configs; then
# the trainer itself (tests/test_gpu_trainer.sh): the NCCL path bitwise equal
# to the plain one, and a short run that must learn the synthetic chain of
# tests/gen_shards.c as the CPU trainer's test does (val_loss < 2.5 after 80 steps).
test-gpu: train_moecu $(GPU_BUILD)/test_gpu $(GPU_BUILD)/test_gpu_dist $(GPU_BUILD)/test_attention \
          $(GPU_BUILD)/test_grouped_gemm $(GPU_BUILD)/test_kernels \
          $(BUILD)/gen_shards moe_ckpt
	@# First the tensor-core building blocks alone: a fragment layout wrong in both the kernels and
	@# the emulator passes every emulated test and fails only here (docs/gpu.md).
	$(GPU_BUILD)/test_attention --mma
	$(GPU_BUILD)/test_attention
	$(GPU_BUILD)/test_grouped_gemm
	$(GPU_BUILD)/test_kernels
	$(GPU_BUILD)/test_gpu tests/fixtures
	$(GPU_BUILD)/test_gpu_dist
	BUILD=$(BUILD) bash tests/test_gpu_trainer.sh ./train_moecu

# Out-of-bounds and misaligned accesses, on a tiny run through every backend
# call (training, evaluation, checkpoint, sampling) and on the kernel tests.
test-gpu-memcheck: train_moecu $(GPU_BUILD)/test_gpu $(GPU_BUILD)/test_attention $(GPU_BUILD)/test_grouped_gemm $(GPU_BUILD)/test_kernels \
                   $(BUILD)/gen_shards
	@set -e; d=$$(mktemp -d); trap 'rm -rf "$$d"' EXIT; \
	./$(BUILD)/gen_shards "$$d" 64 20000 4000 1; \
	$(COMPUTE_SANITIZER) --tool memcheck --error-exitcode 1 ./train_moecu --config tiny \
	    --train-data "$$d/train_*.bin" --val-data "$$d/val_*.bin" -b 4 --steps 3 --warmup-steps 1 --eval-batches 2 \
	    --sample-tokens 8 --ckpt-dir "$$d/ckpt"
	$(COMPUTE_SANITIZER) --tool memcheck --error-exitcode 1 $(GPU_BUILD)/test_gpu --unit
	$(COMPUTE_SANITIZER) --tool memcheck --error-exitcode 1 $(GPU_BUILD)/test_kernels
	$(COMPUTE_SANITIZER) --tool memcheck --error-exitcode 1 $(GPU_BUILD)/test_attention --quick
	@# Shared-memory hazards of the attention kernels' tiles (cp.async, ldmatrix, barriers).
	$(COMPUTE_SANITIZER) --tool racecheck --error-exitcode 1 $(GPU_BUILD)/test_attention --quick
	$(COMPUTE_SANITIZER) --tool memcheck --error-exitcode 1 $(GPU_BUILD)/test_grouped_gemm --quick
	$(COMPUTE_SANITIZER) --tool racecheck --error-exitcode 1 $(GPU_BUILD)/test_grouped_gemm --quick
	$(COMPUTE_SANITIZER) --tool memcheck --error-exitcode 1 $(GPU_BUILD)/test_gpu_dist --quick

clean-gpu:
	rm -rf $(GPU_BUILD) train_moecu $(BUILD)/test_launch
