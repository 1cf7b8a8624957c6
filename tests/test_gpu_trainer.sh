#!/usr/bin/env bash
# train_moecu itself, after the GPU test programs (the end of make test-gpu;
# scripts/gpu_check.sh runs it per precision):
#  1. 6 steps plainly and through NCCL with one rank and the EP exchange
#     forced (MOE_NCCL=1 MOE_EP_EXCHANGE=1): the same losses, parameters,
#     AdamW state and biases, bit for bit;
#  2. 80 steps on the synthetic chain of tests/gen_shards.c: validation loss
#     below 2.5, as the CPU trainer's test (tests/test_trainer.sh) requires.
#
#   tests/test_gpu_trainer.sh [TRAINER]      (default ./train_moecu; run from the
#                                             repository root after make $BUILD/gen_shards moe_ckpt)
set -u
TRAINER=${1:-./train_moecu}
GEN=${BUILD:-build}/gen_shards
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
fails=0

"$GEN" "$d" 64 20000 4000 1 > /dev/null || { echo "FAIL gen_shards"; exit 1; }
a=(--config tiny -b 4 --steps 6 --warmup-steps 2 --print-every 3 --keep-last 0 --ckpt-every 6 --train-data "$d/train_*.bin")
"$TRAINER" "${a[@]}" --ckpt-dir "$d/plain" > "$d/plain.out" 2>&1 &&
    MOE_NCCL=1 MOE_EP_EXCHANGE=1 "$TRAINER" "${a[@]}" --ckpt-dir "$d/nccl" > "$d/nccl.out" 2>&1 ||
    { echo "FAIL train_moecu failed:"; tail -5 "$d/plain.out" "$d/nccl.out" 2> /dev/null; exit 1; }
grep -h 'expert GEMMs' "$d/plain.out" | head -1
for r in plain nccl; do
    ./moe_ckpt info "$d/$r/ckpt_00000006.bin" | awk '$1 ~ /^(params|adam_m|adam_v|bias)$/ { print $1, $NF }' > "$d/$r.hash"
    grep -o 'loss [0-9.]*' "$d/$r.out" >> "$d/$r.hash"
done
if [ "$(wc -l < "$d/plain.hash")" -ge 5 ] && cmp -s "$d/plain.hash" "$d/nccl.hash"; then
    echo "ok   train_moecu through NCCL (1 rank, EP exchange forced): losses, parameters, AdamW state and biases bitwise equal to the plain run"
else
    echo "FAIL train_moecu through NCCL differs from the plain run:"
    cat "$d/plain.hash" "$d/nccl.hash"
    ./moe_ckpt diff "$d/plain/ckpt_00000006.bin" "$d/nccl/ckpt_00000006.bin"
    fails=$((fails + 1))
fi

mkdir -p "$d/chain" && "$GEN" "$d/chain" 64 200000 20000 1 > /dev/null || { echo "FAIL gen_shards"; exit 1; }
"$TRAINER" --config tiny --train-data "$d/chain/train_*.bin" --val-data "$d/chain/val_*.bin" -b 8 --lr 1e-2 \
    --warmup-steps 5 --lr-min 1e-3 --steps 80 --eval-every 40 --print-every 20 > "$d/learn.out" 2>&1 ||
    { echo "FAIL train_moecu (80 steps) failed:"; tail -5 "$d/learn.out"; exit 1; }
grep -E '^(step|eval)' "$d/learn.out"
last=$(grep '^eval step' "$d/learn.out" | tail -1 | sed 's/.*val_loss \([0-9.]*\).*/\1/')
if awk -v v="$last" 'BEGIN { exit !(v > 0 && v < 2.5) }'; then
    echo "ok   train_moecu learns: val_loss $last < 2.5 after 80 steps"
else
    echo "FAIL train_moecu: val_loss \"$last\" after 80 steps (want < 2.5)"
    fails=$((fails + 1))
fi
[ $fails = 0 ] && echo "test_gpu_trainer.sh: all passed" || { echo "test_gpu_trainer.sh: $fails failure(s)"; exit 1; }
