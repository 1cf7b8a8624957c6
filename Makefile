# Build and test the MoE trainer. `make` builds the CPU trainer (and the GPU
# trainer where nvcc exists); `make test` runs every CPU test; see README.md.

CC ?= gcc
# The CPU build runs where it is compiled, so it may use every instruction of this machine.
CPU_ARCH ?= native
CFLAGS ?= -O3
CFLAGS += -std=c11 -march=$(CPU_ARCH) -fopenmp -ffp-contract=fast -Wall -Wextra -D_GNU_SOURCE
LDLIBS = -lm
PYTHON ?= python3

BUILD = build
MODEL_SRC = model/config.c model/layout.c
# Compute code: compiled once in fp32 (the trainer) and once in fp64 (gradient check).
COMPUTE_SRC = model/matmul.c model/ops.c model/moe.c model/model.c
DATA_SRC = data/shard.c data/loader.c

OBJ32 = $(patsubst %.c,$(BUILD)/f32/%.o,$(MODEL_SRC) $(COMPUTE_SRC) $(DATA_SRC))
OBJ64 = $(patsubst %.c,$(BUILD)/f64/%.o,$(MODEL_SRC) $(COMPUTE_SRC))

TESTS = $(BUILD)/test_model $(BUILD)/test_gradcheck $(BUILD)/test_data

.PHONY: all test clean
all: train_moe

$(BUILD)/f32/%.o: %.c $(wildcard model/*.h data/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/f64/%.o: %.c $(wildcard model/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DMOE_FP64 -c $< -o $@

train_moe: train_moe.c $(OBJ32)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_model: tests/test_model.c $(OBJ32)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_gradcheck: tests/test_gradcheck.c $(OBJ64)
	$(CC) $(CFLAGS) -DMOE_FP64 $^ -o $@ $(LDLIBS)

$(BUILD)/test_data: tests/test_data.c $(BUILD)/f32/data/shard.o $(BUILD)/f32/data/loader.o
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

test: train_moe $(TESTS)
	$(BUILD)/test_model
	$(BUILD)/test_gradcheck
	$(BUILD)/test_data
	./train_moe --config 1b --print-config | grep total

clean:
	rm -rf $(BUILD) train_moe
