#!/usr/bin/env bash
# The GPU trainer's own CUDA code, run on the CPU by the emulator in tests/emu
# (docs/gpu.md, "The emulator"); `make test-emu`, part of `make test`.
#  1. the emulator's self-test (it computes what CUDA and cuBLAS define, and
#     stops on the bugs it is meant to catch);
#  2. the GPU tests, unchanged: routing and permutation kernels against CPU
#     implementations, every PyTorch fixture (logits, loss, every gradient),
#     10 training steps against the reference, the backend cases; then the
#     multi-GPU code with virtual ranks and one-rank NCCL;
#  3. train_moecu against train_moe on the same 10-step run with evaluation,
#     sampling and a checkpoint: losses, gradient norms, MaxVio, validation
#     loss, the sampled tokens, the final biases and the checkpoint; and, bit
#     for bit, the run through NCCL with the EP exchange forced and the runs
#     with every kernel's blocks and threads in reverse and shuffled order;
#  4. several ranks (processes) through the NCCL code path, DP, EP and both,
#     against one process, and an EP=2 checkpoint resumed under EP=4.
# This checks the logic of the CUDA code, not a GPU: see docs/gpu.md for what
# only a GPU run can show.
#
#   tests/test_emu.sh [EMU_BUILD_DIR]     (default build/emu/FP32)
#   tests/test_emu.sh --race [DIR]        the race build (default build/emu-race; make test-emu-race)
# A BF16 build (a directory named .../BF16) runs 1, 2 and the bitwise checks of 3:
# its comparison with the fp32 CPU trainer is test_gpu's, with bf16 tolerances.
# The race build, whose kernels have every memory access checked for races
# and out-of-bounds bytes (tests/emu/emu_race.cc), runs 1 (its race
# detections included), test_gpu, and a 10-step train_moecu run through
# one-rank NCCL with the EP exchange: any race stops them.
set -u
cd "$(dirname "$0")/.."
RACE=0
if [ "${1:-}" = --race ]; then RACE=1; shift; fi
B=${1:-$([ $RACE = 1 ] && echo build/emu-race || echo build/emu/FP32)}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fails=0
ok() { echo "ok   $*"; }
bad() { echo "FAIL $*"; fails=$((fails + 1)); }

# 1 and 2: the test programs print their own checks.
PROGS=("$B/test_emu" "$B/test_gpu tests/fixtures")
[ $RACE = 1 ] || PROGS+=("$B/test_gpu_dist")
for t in "${PROGS[@]}"; do
    if $t > "$TMP/out" 2>&1; then
        ok "$t: $(tail -1 "$TMP/out")"
    else
        bad "$t:"
        grep -v '^ok\|^  .* ok' "$TMP/out" | tail -40
    fi
done

# 3. The same run on both trainers.
./build/gen_shards "$TMP" 64 20000 4000 1 > /dev/null || { echo "FAIL gen_shards"; exit 1; }
RUN=(--config tiny --train-data "$TMP/train_*.bin" --val-data "$TMP/val_*.bin" -b 4 --steps 10 --warmup-steps 2
     --lr 1e-2 --gamma 1e-2 --eval-every 5 --eval-batches 2 --print-every 5 --sample-tokens 12 --ckpt-every 10
     --keep-last 0 --threads 1)
summary() { # prints the outcome and ends the script
    if [ "$fails" -eq 0 ]; then echo "test_emu.sh: all passed"; exit 0; fi
    echo "test_emu.sh: $fails failure(s)"
    exit 1
}
if [ $RACE = 1 ]; then
    # Every kernel of a training step, evaluation and sampling, and the EP
    # exchange's copy kernels.
    if MOE_NCCL=1 MOE_EP_EXCHANGE=1 "$B/train_moecu" "${RUN[@]}" --ckpt-dir "$TMP/race" > "$TMP/race.out" 2>&1; then
        ok "train_moecu (race build, through NCCL with the EP exchange): 10 steps, no race: $(grep -o 'loss [0-9.]*' "$TMP/race.out" | tail -1)"
    else
        bad "train_moecu (race build):"; grep -A3 'emulator:' "$TMP/race.out" || tail -5 "$TMP/race.out"
    fi
    summary
fi
"$B/train_moecu" "${RUN[@]}" --ckpt-dir "$TMP/gpu" --log "$TMP/gpu.jsonl" > "$TMP/gpu.out" 2>&1 \
    || { bad "train_moecu (emulated) failed:"; cat "$TMP/gpu.out"; }
# The grouped-GEMM probe gives the answer of the cuBLAS documentation's type
# table (tests/emu/emu_blas.cc): the grouped call when A, B and C have one
# type, the per-expert fallback for bf16 inputs with an fp32 C.
if [ "$(basename "$B")" = BF16 ]; then
    want_probe="expert GEMMs: C bf16 via cublasGemmGroupedBatchedEx; C fp32 (weight gradients) via per-expert cublasGemmEx"
else
    want_probe="expert GEMMs: C fp32 via cublasGemmGroupedBatchedEx; C fp32 (weight gradients) via cublasGemmGroupedBatchedEx"
fi
if grep -qxF "$want_probe" "$TMP/gpu.out"; then ok "train_moecu: $want_probe"
else bad "train_moecu: grouped-GEMM probe: want '$want_probe', got '$(grep 'expert GEMMs' "$TMP/gpu.out")'"; fi

if [ "$(basename "$B")" = BF16 ]; then
    echo "skip train_moecu vs train_moe step by step: bf16 activations (test_gpu compares with bf16 tolerances)"
else
./train_moe "${RUN[@]}" --ckpt-dir "$TMP/cpu" --log "$TMP/cpu.jsonl" > "$TMP/cpu.out" 2>&1 \
    || { bad "train_moe failed:"; cat "$TMP/cpu.out"; }

# Step and eval records side by side: losses and norms within fp32 noise,
# MaxVio exactly (the routing, hence the counts, must be identical).
field() { grep "\"type\":\"$2\"" "$1" | sed "s/.*\"$3\":\([-0-9.e+]*\).*/\1/"; }
compare() { # type field tolerance(relative; 0 = exact) description
    paste <(field "$TMP/cpu.jsonl" "$1" "$2") <(field "$TMP/gpu.jsonl" "$1" "$2") > "$TMP/pairs"
    local n
    n=$(wc -l < "$TMP/pairs")
    if [ "$n" -gt 0 ] && awk -v tol="$3" '{ d = $1 - $2; if (d < 0) d = -d; s = $1 < 0 ? -$1 : $1;
            if (d > tol * s || (tol == 0 && $1 != $2)) bad++; if (d / (s > 0 ? s : 1) > w) w = d / (s > 0 ? s : 1) }
            END { printf "%.2e", w > "/dev/stderr"; exit bad > 0 }' "$TMP/pairs" 2> "$TMP/worst"; then
        ok "train_moecu vs train_moe: $4 ($n values, worst relative difference $(cat "$TMP/worst"))"
    else
        bad "train_moecu vs train_moe: $4 differ:"
        cat "$TMP/pairs"
    fi
}
compare step loss 1e-5 "training losses"
compare step grad_norm 1e-4 "gradient norms"
compare step maxvio_batch 0 "MaxVio_batch (identical routing)"
compare eval val_loss 1e-5 "validation losses"
compare eval maxvio_global 0 "MaxVio_global"

sample() { awk '/^sample \(/ { s = 1; next } s && /^---$/ { if (++n == 2) exit; next } s && n == 1' "$1"; }
if [ -n "$(sample "$TMP/cpu.out")" ] && [ "$(sample "$TMP/cpu.out")" = "$(sample "$TMP/gpu.out")" ]; then
    ok "train_moecu vs train_moe: the same sampled tokens ($(sample "$TMP/gpu.out" | head -1 | cut -c1-40)...)"
else
    bad "train_moecu vs train_moe: sampled tokens differ"; sample "$TMP/cpu.out"; sample "$TMP/gpu.out"
fi
hc=$(grep 'final bias xxh64' "$TMP/cpu.out"); hg=$(grep 'final bias xxh64' "$TMP/gpu.out")
if [ -n "$hc" ] && [ "$hc" = "$hg" ]; then ok "train_moecu vs train_moe: final biases bit for bit (${hc##* })"
else bad "train_moecu vs train_moe: final biases differ: '$hc' vs '$hg'"; fi

c=$TMP/cpu/ckpt_00000010.bin; g=$TMP/gpu/ckpt_00000010.bin
./moe_ckpt diff "$c" "$g" > "$TMP/diff" 2>&1 || true # non-zero when they differ at all
if awk '$1 == "bias" { b = $3 } $1 == "params" { p = $3 } $1 == "adam_m" { m = $5 } $1 == "adam_v" { v = $5 }
        END { printf "bias %s, params %s (abs), adam_m %s, adam_v %s (rel)", b, p, m, v > "/dev/stderr";
              exit !(b != "" && b + 0 == 0 && p + 0 < 1e-4 && m + 0 < 1e-3 && v + 0 < 1e-3) }' "$TMP/diff" 2> "$TMP/summary"; then
    ok "train_moecu vs train_moe: checkpoints after 10 steps: $(cat "$TMP/summary")"
else
    bad "train_moecu vs train_moe: checkpoints differ: $(cat "$TMP/summary")"; cat "$TMP/diff"
fi
fi

# The same run through NCCL (one rank) with the EP exchange forced, and with
# the blocks and threads of every kernel run in reverse and in shuffled order
# (a missing barrier or an order-dependent write would change the bits):
# losses, parameters, AdamW state and biases bit for bit.
hash_of() { # run-name -> its checkpoint sections' hashes and printed losses
    ./moe_ckpt info "$TMP/$1/ckpt_00000010.bin" | awk '$1 ~ /^(params|adam_m|adam_v|bias)$/ { print $1, $NF }'
    grep -o 'loss [0-9.]*' "$TMP/$1.out"
}
same_bits() { # run-name description env...
    local name=$1 what=$2
    shift 2
    env "$@" "$B/train_moecu" "${RUN[@]}" --ckpt-dir "$TMP/$name" > "$TMP/$name.out" 2>&1 \
        || { bad "train_moecu $what failed:"; cat "$TMP/$name.out"; return; }
    hash_of gpu > "$TMP/gpu.hash"
    hash_of "$name" > "$TMP/$name.hash"
    if [ "$(wc -l < "$TMP/gpu.hash")" -ge 5 ] && cmp -s "$TMP/gpu.hash" "$TMP/$name.hash"; then
        ok "train_moecu $what == plain run: losses, parameters, AdamW state, biases bitwise"
    else
        bad "train_moecu $what differs from the plain run"; diff "$TMP/gpu.hash" "$TMP/$name.hash"
    fi
}
same_bits nccl "through NCCL (1 rank, EP exchange forced)" MOE_NCCL=1 MOE_EP_EXCHANGE=1
same_bits reverse "with blocks and threads in reverse order" EMU_ORDER=reverse
same_bits shuffle "with blocks and threads in shuffled order" EMU_ORDER=shuffle

# A GPU older than the build's architecture is refused, naming the fix.
if EMU_DEVICE_CC=80 "$B/train_moecu" "${RUN[@]}" --ckpt-dir "$TMP/cc80" > "$TMP/cc80.out" 2>&1; then
    bad "train_moecu ran on a GPU older than its build"
elif grep -q "built for sm_90 but GPU 0 is sm_80: rebuild it with make train_moecu GPU_ARCH=sm_80" "$TMP/cc80.out"; then
    ok "train_moecu built for sm_90 refuses an sm_80 GPU: $(grep error "$TMP/cc80.out")"
else
    bad "train_moecu on an older GPU: no clear message:"; tail -3 "$TMP/cc80.out"
fi

# 4. Several ranks: W processes of the emulated train_moecu, placed as a
#    launcher would (RANK, WORLD_SIZE, LOCAL_RANK) and meeting through a
#    --nccl-init directory (parallel/launch.c), their NCCL in shared memory --
#    the build-without-MPI communicator (parallel/comm_nccl.c) with its
#    ncclCommSplit into EP/EDP groups, the all-to-alls of the EP exchange,
#    the gradient all-reduces, the host collectives through the staging
#    buffer and the consolidated checkpoint -- against one process whose
#    micro-batch holds the same sequences (as tests/test_dist.sh does for
#    the CPU trainer): biases bit for bit on every rank, losses within 1e-5,
#    parameters within 1e-4, AdamW moments within 1e-4 of the largest.
mkdir -p "$TMP/mr" && ./build/gen_shards "$TMP/mr" 64 100000 10000 3 > /dev/null || { echo "FAIL gen_shards"; exit 1; }
MR=(--config tiny --train-data "$TMP/mr/train_*.bin" --val-data "$TMP/mr/val_*.bin" --lr 1e-2 --warmup-steps 2
    --steps 10 --threads 1 --print-every 100 --init-std 0.1 --eval-batches 2 --ckpt-every 5 --keep-last 0)
MB=8
mrun() { # name ranks ep [extra...]
    local name=$1 np=$2 ep=$3 r
    shift 3
    mkdir -p "$TMP/$name.rdv"
    for r in $(seq 0 $((np - 1))); do
        RANK=$r WORLD_SIZE=$np LOCAL_RANK=$r MOE_NCCL_INIT="$TMP/$name.rdv" EMU_NCCL_TIMEOUT=120 \
            "$B/train_moecu" "${MR[@]}" -b $((MB / np)) --ep "$ep" --ckpt-dir "$TMP/$name" --log "$TMP/$name.jsonl" \
            "$@" > "$TMP/$name.$r.out" 2>&1 &
    done
    local st=0
    for r in $(seq 0 $((np - 1))); do wait -n || st=1; done
    cat "$TMP/$name".*.out > "$TMP/$name.out"
    [ $st = 0 ] || { bad "$name: a rank failed:"; for r in $(seq 0 $((np - 1))); do
                         grep -h -m1 -i 'emulator:\|error' "$TMP/$name.$r.out" || tail -n 2 "$TMP/$name.$r.out"; done
                     return 1; }
}
mr_close() { # name: against the single process
    local name=$1 hashes nranks d
    hashes=$(grep -o 'final bias xxh64 [0-9a-f]*' "$TMP/$name.out" | sort -u)
    nranks=$(grep -c 'final bias xxh64' "$TMP/$name.out")
    if [ "$(echo "$hashes" | wc -l)" = 1 ] && [ "$hashes" = "$(grep -o 'final bias xxh64 [0-9a-f]*' "$TMP/mr1.out")" ]; then
        ok "$name: the $nranks ranks hold bit-identical biases, equal to the single process's"
    else bad "$name: biases differ between ranks or from the single process"; fi
    d=$(paste <(field "$TMP/mr1.jsonl" step loss) <(field "$TMP/$name.jsonl" step loss) \
        | awk '{ d = $1 - $2; if (d < 0) d = -d; if (d > m) m = d } END { print m + 0 }')
    if [ "$(field "$TMP/$name.jsonl" step loss | wc -l)" = 10 ] && awk -v d="$d" 'BEGIN { exit !(d <= 1e-5) }'; then
        ok "$name: losses of 10 steps within $d of the single process"
    else bad "$name: losses differ by $d"; fi
    ./moe_ckpt diff "$TMP/mr1/ckpt_00000010.bin" "$TMP/$name/ckpt_00000010.bin" > "$TMP/$name.diff" 2>&1
    if awk '$1 == "params" { p = 1; if ($3 > 1e-4) e = 1 } ($1 == "adam_m" || $1 == "adam_v") && $5 > 1e-4 { e = 1 }
            $1 == "bias" && $3 != 0 { e = 1 } END { exit e || !p }' "$TMP/$name.diff"; then
        ok "$name: step-10 checkpoint: $(awk '{ printf "%s %s ", $1, $3 }' "$TMP/$name.diff")"
    else bad "$name: checkpoint differs:"; cat "$TMP/$name.diff"; fi
}
if [ "$(basename "$B")" = BF16 ]; then
    echo "skip several ranks: run with the FP32 build"
else
    "$B/train_moecu" "${MR[@]}" -b $MB --ckpt-dir "$TMP/mr1" --log "$TMP/mr1.jsonl" > "$TMP/mr1.out" 2>&1 \
        || { bad "single-process run failed"; tail -5 "$TMP/mr1.out"; }
    mrun dp2 2 1 && mr_close dp2
    mrun ep2 2 2 && mr_close ep2
    mrun ep4 4 4 && mr_close ep4
    mrun dp2ep2 4 2 && mr_close dp2ep2
    # A checkpoint written under EP=2 at step 5, resumed under EP=4.
    if mrun switch 4 2 --run-steps 5 && mrun switch 4 4 --resume; then
        ./moe_ckpt diff "$TMP/ep4/ckpt_00000010.bin" "$TMP/switch/ckpt_00000010.bin" > "$TMP/switch.diff" 2>&1
        if awk '$1 == "params" { p = 1; if ($3 > 1e-4) e = 1 } $1 == "bias" && $3 != 0 { e = 1 } END { exit e || !p }' \
            "$TMP/switch.diff"; then
            ok "EP=2 checkpoint resumed under EP=4 matches an EP=4 run: $(awk '{ printf "%s %s ", $1, $3 }' "$TMP/switch.diff")"
        else bad "EP 2 -> 4 resume differs:"; cat "$TMP/switch.diff"; fi
    fi
fi

summary
