#!/usr/bin/env bash
# train_moecu itself, after the GPU test programs (the end of make test-gpu;
# scripts/gpu_check.sh runs it per precision):
#  1. 6 steps plainly and through NCCL with one rank and the EP exchange
#     forced (MOE_NCCL=1 MOE_EP_EXCHANGE=1): the same losses, parameters,
#     AdamW state and biases, bit for bit;
#  2. 80 steps on the synthetic chain of tests/gen_shards.c: validation loss
#     below 2.5, as the CPU trainer's test (tests/test_trainer.sh) requires.
#
#   tests/test_gpu_trainer.sh [TRAINER]      (default ./train_moecu, a path from the repository
#                                             root; after make $BUILD/gen_shards moe_ckpt)
. "$(dirname "$0")/lib.sh"
test_begin test_gpu_trainer --tmp
TRAINER=${1:-./train_moecu}

test_shards "$TMP"
a=(--config tiny -b 4 --steps 6 --warmup-steps 2 --print-every 3 --keep-last 0 --ckpt-every 6 --train-data "$TMP/train_*.bin")
"$TRAINER" "${a[@]}" --ckpt-dir "$TMP/plain" > "$TMP/plain.out" 2>&1 &&
    MOE_NCCL=1 MOE_EP_EXCHANGE=1 "$TRAINER" "${a[@]}" --ckpt-dir "$TMP/nccl" > "$TMP/nccl.out" 2>&1 ||
    { bad "train_moecu failed:"; tail -5 "$TMP/plain.out" "$TMP/nccl.out" 2> /dev/null; test_end; }
grep -h 'expert GEMMs' "$TMP/plain.out" | head -1
for r in plain nccl; do
    ./moe_ckpt info "$TMP/$r/ckpt_00000006.bin" | awk '$1 ~ /^(params|adam_m|adam_v|bias)$/ { print $1, $NF }' > "$TMP/$r.hash"
    grep -o 'loss [0-9.]*' "$TMP/$r.out" >> "$TMP/$r.hash"
done
if [ "$(wc -l < "$TMP/plain.hash")" -ge 5 ] && cmp -s "$TMP/plain.hash" "$TMP/nccl.hash"; then
    ok "train_moecu through NCCL (1 rank, EP exchange forced): losses, parameters, AdamW state and biases bitwise equal to the plain run"
else
    bad "train_moecu through NCCL differs from the plain run:"
    cat "$TMP/plain.hash" "$TMP/nccl.hash"
    ./moe_ckpt diff "$TMP/plain/ckpt_00000006.bin" "$TMP/nccl/ckpt_00000006.bin"
fi

test_shards "$TMP/chain" 200000 20000
"$TRAINER" --config tiny --train-data "$TMP/chain/train_*.bin" --val-data "$TMP/chain/val_*.bin" -b 8 --lr 1e-2 \
    --warmup-steps 5 --lr-min 1e-3 --steps 80 --eval-every 40 --print-every 20 > "$TMP/learn.out" 2>&1 ||
    { bad "train_moecu (80 steps) failed:"; tail -5 "$TMP/learn.out"; test_end; }
grep -E '^(step|eval)' "$TMP/learn.out"
last=$(grep '^eval step' "$TMP/learn.out" | tail -1 | sed 's/.*val_loss \([0-9.]*\).*/\1/')
if awk -v v="$last" 'BEGIN { exit !(v > 0 && v < 2.5) }'; then
    ok "train_moecu learns: val_loss $last < 2.5 after 80 steps"
else
    bad "train_moecu: val_loss \"$last\" after 80 steps (want < 2.5)"
fi
test_end
