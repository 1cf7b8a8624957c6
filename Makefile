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
MODEL_SRC = model/config.c model/layout.c model/balance.c
# Compute code: compiled once in fp32 (the trainer) and once in fp64 (gradient check).
COMPUTE_SRC = model/matmul.c model/ops.c model/moe.c model/model.c
DATA_SRC = data/shard.c data/loader.c
TOK_SRC = tokenizer/bpe.c tokenizer/bpe_file.c tokenizer/bpe_train.c tokenizer/hf_import.c \
          tokenizer/pretok.c tokenizer/tok_json.c tokenizer/tok_util.c
TRAIN_SRC = train/options.c train/optim.c train/lr.c train/ckpt.c train/trainer.c

OBJ32 = $(patsubst %.c,$(BUILD)/f32/%.o,$(MODEL_SRC) $(COMPUTE_SRC) $(DATA_SRC) $(TOK_SRC) $(TRAIN_SRC))
OBJ64 = $(patsubst %.c,$(BUILD)/f64/%.o,$(MODEL_SRC) $(COMPUTE_SRC) train/optim.c)

TESTS = $(BUILD)/test_model $(BUILD)/test_gradcheck $(BUILD)/test_reference $(BUILD)/test_reference64 $(BUILD)/test_data $(BUILD)/test_train_infra $(BUILD)/test_balance

.PHONY: all test bench clean
all: train_moe moe_ckpt

$(BUILD)/f32/%.o: %.c $(wildcard model/*.h data/*.h tokenizer/*.h train/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/f64/%.o: %.c $(wildcard model/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DMOE_FP64 -c $< -o $@

train_moe: train_moe.c $(OBJ32)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

moe_ckpt: train/ckpt_main.c $(BUILD)/f32/train/ckpt.o
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/gen_shards: tests/gen_shards.c $(BUILD)/f32/data/shard.o
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_model: tests/test_model.c $(OBJ32)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_gradcheck: tests/test_gradcheck.c $(OBJ64)
	$(CC) $(CFLAGS) -DMOE_FP64 $^ -o $@ $(LDLIBS)

$(BUILD)/test_reference: tests/test_reference.c tests/fixture.c $(OBJ32)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_reference64: tests/test_reference.c tests/fixture.c $(OBJ64)
	$(CC) $(CFLAGS) -DMOE_FP64 $^ -o $@ $(LDLIBS)

$(BUILD)/test_data: tests/test_data.c $(BUILD)/f32/data/shard.o $(BUILD)/f32/data/loader.o
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_train_infra: tests/test_train_infra.c $(BUILD)/f32/train/optim.o $(BUILD)/f32/train/lr.o $(BUILD)/f32/train/ckpt.o $(BUILD)/f32/model/layout.o $(BUILD)/f32/model/config.o
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_balance: tests/test_balance.c $(BUILD)/f32/model/balance.o
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

test: train_moe moe_ckpt $(BUILD)/gen_shards $(TESTS)
	$(BUILD)/test_model
	$(BUILD)/test_gradcheck
	$(BUILD)/test_reference
	$(BUILD)/test_reference64
	$(BUILD)/test_data
	$(BUILD)/test_train_infra
	$(BUILD)/test_balance
	bash tests/test_trainer.sh
	./train_moe --config 1b --print-config | grep total

$(BUILD)/bench_cpu: bench/bench_cpu.c $(OBJ32)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

# CPU throughput of the small preset (forward + backward), see README "Performance".
bench: $(BUILD)/bench_cpu
	$(BUILD)/bench_cpu small 8 256 5

clean:
	rm -rf $(BUILD) train_moe moe_ckpt
