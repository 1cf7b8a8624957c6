#!/usr/bin/env bash
# --print-memory from the command line, on a machine with or without a GPU:
# the table and the largest micro-batch; linear growth in the micro-batch
# and in the sequence length (the fused attention keeps nothing of size
# T^2); a head dim the attention kernels do not take is refused; the CPU
# trainer refuses it, naming the GPU trainer. (That the plan equals
# the real allocations byte for byte is tests/test_gpu.cu's.)
#   tests/test_memplan.sh TRAIN_MOECU
. "$(dirname "$0")/lib.sh"
test_begin test_memplan
GPU=${1:?usage: tests/test_memplan.sh TRAIN_MOECU}
total() { "$GPU" "$@" --print-memory | sed -n 's/^  total  *\([0-9.]*\) GiB$/\1/p'; }

out=$("$GPU" --config 1b -b 4 --print-memory 2>&1) || bad "--print-memory failed: $out"
if grep -q "activations kept for the backward" <<< "$out" && grep -q "^largest micro-batch that fits" <<< "$out"; then
    ok "1b, 4 x 2048: total $(sed -n 's/^  total  *//p' <<< "$out"); $(grep '^largest' <<< "$out")"
else
    bad "no table or no largest micro-batch:"; echo "$out"
fi
t1=$(total --config small -b 8); t2=$(total --config small -b 16); t3=$(total --config small -b 24)
if awk -v a="$t1" -v b="$t2" -v c="$t3" 'BEGIN { d1 = b - a; d2 = c - b; exit !(a > 0 && d1 > 0 && (d1 - d2) < 0.002 && (d2 - d1) < 0.002) }'; then
    ok "small: $t1, $t2, $t3 GiB at -b 8, 16, 24: linear in the micro-batch"
else
    bad "small: $t1, $t2, $t3 GiB at -b 8, 16, 24 is not linear"
fi
t1=$(total --config 1b --seq-len 2048); t2=$(total --config 1b --seq-len 4096); t3=$(total --config 1b --seq-len 8192)
# Totals are printed to 0.001 GiB (each within 0.0005): d2 - 2 d1 carries up to 0.003 of rounding.
if awk -v a="$t1" -v b="$t2" -v c="$t3" 'BEGIN { d1 = b - a; d2 = c - b; exit !(a > 0 && d1 > 0 && (d2 - 2 * d1) < 0.004 && (2 * d1 - d2) < 0.004) }'; then
    ok "1b: $t1, $t2, $t3 GiB at T = 2048, 4096, 8192: linear in T"
else
    bad "1b: $t1, $t2, $t3 GiB at T = 2048, 4096, 8192 is not linear in T"
fi
if out=$("$GPU" --config small --n-heads 32 --print-memory 2>&1); then bad "head dim 8 accepted"
elif grep -q "head dims (d_model / n_heads) 16, 32, 64 or 128, not 8" <<< "$out"; then
    ok "head dim 8 refused: $(grep -m1 error <<< "$out" | cut -c1-110)"
else bad "head dim 8: not the attention's message: $out"; fi
fit=$("$GPU" --config 1b -b 4 --gpu-mem 30 --print-memory | sed -n 's/.*: -b \([0-9]*\) .*/\1/p')
at=$(total --config 1b -b "${fit:-1}"); above=$(total --config 1b -b $((${fit:-1} + 1)))
if [ -n "$fit" ] && awk -v a="$at" -v b="$above" 'BEGIN { exit !(a <= 30 && b > 30) }'; then
    ok "--gpu-mem 30: the largest 1b micro-batch is $fit ($at GiB; $((fit + 1)) needs $above)"
else
    bad "--gpu-mem 30: largest micro-batch '$fit' ($at GiB, next $above GiB)"
fi
if out=$(./train_moe --config tiny --print-memory 2>&1); then bad "train_moe --print-memory accepted"
elif grep -q "train_moecu" <<< "$out"; then ok "train_moe --print-memory refused: $(grep -m1 error <<< "$out" | cut -c1-110)"
else bad "train_moe --print-memory: message does not name train_moecu: $out"; fi

test_end
