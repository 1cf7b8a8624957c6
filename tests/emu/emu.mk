# The GPU trainer's own CUDA code, run on the CPU by the emulator in tests/emu
# (docs/gpu.md, "The emulator"). Included from the Makefile after gpu.mk.
#
#   make test-emu          the GPU tests (the memory-bound kernels' two paths, kernels, fixtures, 10 training steps) and a tiny
#                          train_moecu run, FP32, with the emulator's memory checks; part of `make test`
#   make test-emu EMU_PRECISION=BF16   the same with bf16 activations
#   make test-emu-race     the race build: the CUDA code compiled with -fsanitize=thread, every memory
#                          access of a kernel checked for races and exact bounds (emu_race.cc), FP32, and
#                          test_attention and test_grouped_gemm also in BF16; part of `make test`
#
# Needs only a C++17 compiler: the emulator's headers stand in for the CUDA
# runtime, cuBLAS and NCCL. It checks logic, not a GPU: see docs/gpu.md.

CXX ?= g++
EMU_PRECISION ?= FP32
EMU_BUILD = $(BUILD)/emu/$(EMU_PRECISION)
EMU_CXXFLAGS = -O2 -g -std=c++17 -Wall -Wextra -Wno-unused-parameter -D_GNU_SOURCE -Itests/emu/include -I. \
               $(if $(filter FP32,$(EMU_PRECISION)),-DENABLE_FP32) -DMOE_GPU_ARCH=90
EMU_HEADERS = $(wildcard tests/emu/include/*.h) tests/emu/cu2cc.sed $(GPU_HEADERS)
EMU_KOBJ = $(patsubst %,$(EMU_BUILD)/kernels/%.o,$(GPU_KERNELS))
EMU_COMM = $(BUILD)/emu/comm_nccl_host.o $(BUILD)/f32/parallel/launch.o
EMU_LIBS = -lgomp -lm -lpthread

.PHONY: test-emu emu-build
.PRECIOUS: $(EMU_BUILD)/%.cc

# A .cu file as C++: launches rewritten (cu2cc.sed); #line keeps messages pointing at the .cu file.
$(EMU_BUILD)/%.cc: %.cu tests/emu/cu2cc.sed
	@mkdir -p $(dir $@)
	@{ echo '#line 1 "$<"'; sed -f tests/emu/cu2cc.sed $<; } > $@

$(EMU_BUILD)/%.o: $(EMU_BUILD)/%.cc $(EMU_HEADERS)
	$(CXX) $(EMU_CXXFLAGS) -I$(dir $*) -c $< -o $@

$(EMU_BUILD)/train_moe_lib.o: $(EMU_BUILD)/train_moe.cc $(EMU_HEADERS)
	$(CXX) $(EMU_CXXFLAGS) -DTRAIN_MOECU_NO_MAIN -c $< -o $@

# The emulator itself (precision-independent).
EMU_LIB = $(patsubst tests/emu/%.cc,$(BUILD)/emu/%.o,$(wildcard tests/emu/emu_*.cc))
$(BUILD)/emu/emu_%.o: tests/emu/emu_%.cc tests/emu/emu_internal.h $(wildcard tests/emu/include/*.h)
	@mkdir -p $(dir $@)
	$(CXX) $(filter-out -DENABLE_FP32,$(EMU_CXXFLAGS)) -c $< -o $@

$(BUILD)/emu/comm_nccl_host.o: parallel/comm_nccl.c parallel/comm_nccl.h parallel/comm.h parallel/launch.h $(wildcard tests/emu/include/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/emu/include -DCOMM_NCCL_HOST -c $< -o $@

EMU_COMMON = $(EMU_KOBJ) $(GPU_HOST_BASE) $(EMU_COMM) $(EMU_LIB)

$(EMU_BUILD)/train_moecu: $(EMU_BUILD)/train_moe.o $(EMU_COMMON)
	$(CXX) $^ -o $@ $(EMU_LIBS)

$(EMU_BUILD)/test_gpu: $(EMU_BUILD)/tests/test_gpu.o $(EMU_BUILD)/train_moe_lib.o $(EMU_COMMON) $(BUILD)/f32/tests/fixture.o
	$(CXX) $^ -o $@ $(EMU_LIBS)

$(EMU_BUILD)/test_gpu_dist: $(EMU_BUILD)/tests/test_gpu_dist.o $(EMU_BUILD)/train_moe_lib.o $(EMU_COMMON)
	$(CXX) $^ -o $@ $(EMU_LIBS)

$(EMU_BUILD)/test_kernels: $(EMU_BUILD)/tests/test_kernels.o $(patsubst %,$(EMU_BUILD)/kernels/%.o,$(TEST_KERNELS_K)) \
                           $(TEST_KERNELS_HOST) $(EMU_LIB)
	$(CXX) $^ -o $@ $(EMU_LIBS)

# The fused attention and its tensor-core building blocks against the CPU model's attention (model/ops.c).
$(EMU_BUILD)/test_attention: $(EMU_BUILD)/tests/test_attention.o $(EMU_BUILD)/kernels/attention.o $(BUILD)/f32/model/ops.o \
                             $(EMU_LIB)
	$(CXX) $^ -o $@ $(EMU_LIBS)

# The grouped expert GEMMs (device and cuBLAS paths) against a loop over experts on the host.
$(EMU_BUILD)/test_grouped_gemm: $(EMU_BUILD)/tests/test_grouped_gemm.o $(EMU_BUILD)/kernels/grouped_gemm.o $(EMU_LIB)
	$(CXX) $^ -o $@ $(EMU_LIBS)

emu-build: $(EMU_BUILD)/test_emu $(EMU_BUILD)/train_moecu $(EMU_BUILD)/test_gpu $(EMU_BUILD)/test_gpu_dist \
           $(EMU_BUILD)/test_attention $(EMU_BUILD)/test_grouped_gemm $(EMU_BUILD)/test_kernels

$(EMU_BUILD)/test_emu: $(EMU_BUILD)/tests/emu/test_emu.o $(EMU_LIB)
	$(CXX) $^ -o $@ $(EMU_LIBS)

# FP32: the kernels' two paths, everything in tests/test_emu.sh; then the same in BF16.
test-emu: emu-build $(BUILD)/gen_shards train_moe moe_ckpt
	$(EMU_BUILD)/test_kernels > $(EMU_BUILD)/test_kernels.out || { grep -v ' ok' $(EMU_BUILD)/test_kernels.out; exit 1; }
	tail -1 $(EMU_BUILD)/test_kernels.out
	bash tests/test_emu.sh $(EMU_BUILD)
	$(MAKE) --no-print-directory -j$(JOBS) EMU_PRECISION=BF16 emu-build
	$(BUILD)/emu/BF16/test_kernels > $(BUILD)/emu/BF16/test_kernels.out || { grep -v ' ok' $(BUILD)/emu/BF16/test_kernels.out; exit 1; }
	tail -1 $(BUILD)/emu/BF16/test_kernels.out
	bash tests/test_emu.sh $(BUILD)/emu/BF16

# The race build (docs/gpu.md, "Races and exact bounds"): the same CUDA code,
# FP32, compiled with -fsanitize=thread so that every memory access calls the
# emulator's checker (tests/emu/emu_race.cc; ThreadSanitizer's own runtime is
# not linked, the emulator's objects are the plain build's). No function
# entry hooks (not needed), no loops turned into memset/memcpy calls (the
# checker would not see those), DWARF 4 (binutils' addr2line, which names
# the source line of a race, reads #line directives wrongly in DWARF 5).
EMU_RACE_BUILD = $(BUILD)/emu-race
EMU_RACE_CXXFLAGS = $(filter-out -DENABLE_FP32,$(EMU_CXXFLAGS)) -DENABLE_FP32 -gdwarf-4 -fsanitize=thread \
                    --param=tsan-instrument-func-entry-exit=0 -fno-tree-loop-distribute-patterns
EMU_RACE_KOBJ = $(patsubst %,$(EMU_RACE_BUILD)/kernels/%.o,$(GPU_KERNELS))
EMU_RACE_COMMON = $(EMU_RACE_KOBJ) $(GPU_HOST_BASE) $(EMU_COMM) $(EMU_LIB)

.PHONY: test-emu-race emu-race-build
.PRECIOUS: $(EMU_RACE_BUILD)/%.cc

$(EMU_RACE_BUILD)/%.cc: %.cu tests/emu/cu2cc.sed
	@mkdir -p $(dir $@)
	@{ echo '#line 1 "$<"'; sed -f tests/emu/cu2cc.sed $<; } > $@

$(EMU_RACE_BUILD)/%.o: $(EMU_RACE_BUILD)/%.cc $(EMU_HEADERS)
	$(CXX) $(EMU_RACE_CXXFLAGS) -I$(dir $*) -c $< -o $@

$(EMU_RACE_BUILD)/train_moe_lib.o: $(EMU_RACE_BUILD)/train_moe.cc $(EMU_HEADERS)
	$(CXX) $(EMU_RACE_CXXFLAGS) -DTRAIN_MOECU_NO_MAIN -c $< -o $@

$(EMU_RACE_BUILD)/test_emu: $(EMU_RACE_BUILD)/tests/emu/test_emu.o $(EMU_LIB)
	$(CXX) $^ -o $@ $(EMU_LIBS)

$(EMU_RACE_BUILD)/test_gpu: $(EMU_RACE_BUILD)/tests/test_gpu.o $(EMU_RACE_BUILD)/train_moe_lib.o $(EMU_RACE_COMMON) \
                            $(BUILD)/f32/tests/fixture.o
	$(CXX) $^ -o $@ $(EMU_LIBS)

$(EMU_RACE_BUILD)/train_moecu: $(EMU_RACE_BUILD)/train_moe.o $(EMU_RACE_COMMON)
	$(CXX) $^ -o $@ $(EMU_LIBS)

$(EMU_RACE_BUILD)/test_kernels: $(EMU_RACE_BUILD)/tests/test_kernels.o \
                                $(patsubst %,$(EMU_RACE_BUILD)/kernels/%.o,$(TEST_KERNELS_K)) $(TEST_KERNELS_HOST) $(EMU_LIB)
	$(CXX) $^ -o $@ $(EMU_LIBS)

$(EMU_RACE_BUILD)/test_attention: $(EMU_RACE_BUILD)/tests/test_attention.o $(EMU_RACE_BUILD)/kernels/attention.o \
                                  $(BUILD)/f32/model/ops.o $(EMU_LIB)
	$(CXX) $^ -o $@ $(EMU_LIBS)

$(EMU_RACE_BUILD)/test_grouped_gemm: $(EMU_RACE_BUILD)/tests/test_grouped_gemm.o \
                                     $(EMU_RACE_BUILD)/kernels/grouped_gemm.o $(EMU_LIB)
	$(CXX) $^ -o $@ $(EMU_LIBS)

# The tensor-core kernels also in bf16: the FP32 build stages tiles by
# cp.async but loads fragments with plain reads, while the BF16 build (the
# one users train with) has other tiles (the attention's are 64 rows, not
# 32) and its operands come through ldmatrix (ldmatrix.trans for the grouped
# GEMM's k-major operands). Only test_attention and test_grouped_gemm are
# built this way.
EMU_RACE_BF16_BUILD = $(BUILD)/emu-race-bf16
EMU_RACE_BF16_CXXFLAGS = $(filter-out -DENABLE_FP32,$(EMU_RACE_CXXFLAGS))
.PRECIOUS: $(EMU_RACE_BF16_BUILD)/%.cc

$(EMU_RACE_BF16_BUILD)/%.cc: %.cu tests/emu/cu2cc.sed
	@mkdir -p $(dir $@)
	@{ echo '#line 1 "$<"'; sed -f tests/emu/cu2cc.sed $<; } > $@

$(EMU_RACE_BF16_BUILD)/%.o: $(EMU_RACE_BF16_BUILD)/%.cc $(EMU_HEADERS)
	$(CXX) $(EMU_RACE_BF16_CXXFLAGS) -I$(dir $*) -c $< -o $@

$(EMU_RACE_BF16_BUILD)/test_attention: $(EMU_RACE_BF16_BUILD)/tests/test_attention.o \
                                       $(EMU_RACE_BF16_BUILD)/kernels/attention.o $(BUILD)/f32/model/ops.o $(EMU_LIB)
	$(CXX) $^ -o $@ $(EMU_LIBS)

$(EMU_RACE_BF16_BUILD)/test_grouped_gemm: $(EMU_RACE_BF16_BUILD)/tests/test_grouped_gemm.o \
                                          $(EMU_RACE_BF16_BUILD)/kernels/grouped_gemm.o $(EMU_LIB)
	$(CXX) $^ -o $@ $(EMU_LIBS)

emu-race-build: $(EMU_RACE_BUILD)/test_emu $(EMU_RACE_BUILD)/test_gpu $(EMU_RACE_BUILD)/train_moecu \
                $(EMU_RACE_BUILD)/test_attention $(EMU_RACE_BF16_BUILD)/test_attention \
                $(EMU_RACE_BUILD)/test_grouped_gemm $(EMU_RACE_BF16_BUILD)/test_grouped_gemm \
                $(EMU_RACE_BUILD)/test_kernels

# The kernels' two paths, then tests/test_emu.sh --race: any race or out-of-bounds access stops them.
test-emu-race: emu-race-build $(BUILD)/gen_shards
	$(EMU_RACE_BUILD)/test_kernels > $(EMU_RACE_BUILD)/test_kernels.out || { grep -v ' ok' $(EMU_RACE_BUILD)/test_kernels.out; exit 1; }
	tail -1 $(EMU_RACE_BUILD)/test_kernels.out
	bash tests/test_emu.sh --race $(EMU_RACE_BUILD)
	$(EMU_RACE_BF16_BUILD)/test_attention --quick
	$(EMU_RACE_BF16_BUILD)/test_grouped_gemm --quick

# Device-memory traffic per kernel (bench/emu_traffic.cc; docs/gpu.md,
# "Memory-bound kernels"): the race build's trainer with the access hooks and
# the launch notice wrapped by a counter (the linker's --wrap).
EMU_TRAFFIC_WRAP = $(foreach h,read write unaligned_read unaligned_write,$(foreach n,1 2 4 8 16,-Wl,--wrap=__tsan_$(h)$(n))) \
                   -Wl,--wrap=__tsan_read_range -Wl,--wrap=__tsan_write_range \
                   -Wl,--wrap=_ZN3emu17race_launch_beginEPKc4dim3S2_Pvm

$(BUILD)/emu/bench_traffic.o: bench/emu_traffic.cc tests/emu/emu_internal.h $(wildcard tests/emu/include/*.h)
	@mkdir -p $(dir $@)
	$(CXX) $(filter-out -DENABLE_FP32,$(EMU_CXXFLAGS)) -c $< -o $@

$(EMU_RACE_BUILD)/train_moecu_traffic: $(EMU_RACE_BUILD)/train_moe.o $(EMU_RACE_COMMON) $(BUILD)/emu/bench_traffic.o
	$(CXX) $^ -o $@ $(EMU_LIBS) $(EMU_TRAFFIC_WRAP)
