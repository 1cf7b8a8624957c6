#!/usr/bin/env bash
# Kernel launches and device-memory bytes per training step of train_moecu on
# the CPU emulator, per kernel (bench/emu_traffic.cc; docs/gpu.md,
# "Memory-bound kernels"): bytes read and written, distinct (what a perfect
# cache moves) and all that the threads ask for. A benchmark, not a test: counts, which a GPU sees
# the same; the emulator's times mean nothing. Per step = the difference of a
# run of S2 steps and one of S1 steps, divided by S2 - S1, so the start-up
# work (the grouped-GEMM probe, the first weight conversion) cancels.
#
#   bench/emu_traffic.sh CONFIG MICRO_BATCH [S1 S2 [BINARY]]
#   e.g. make build/emu-race/train_moecu_traffic && bench/emu_traffic.sh small 2
# (defaults: 2 4, build/emu-race/train_moecu_traffic; needs build/gen_shards and train_moe)
set -eu
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
    echo "usage: bench/emu_traffic.sh CONFIG MICRO_BATCH [S1 S2 [BINARY]]" >&2
    exit 2
fi
CONFIG=$1 B=$2 S1=${3:-2} S2=${4:-4} BIN=${5:-build/emu-race/train_moecu_traffic}
for f in "$BIN" ./train_moe ./build/gen_shards; do
    [ -x "$f" ] || { echo "emu_traffic.sh: $f is not built (make build/emu-race/train_moecu_traffic train_moe build/gen_shards)" >&2; exit 1; }
done
if [ "$S2" -le "$S1" ]; then
    echo "emu_traffic.sh: S2 ($S2) must be larger than S1 ($S1)" >&2
    exit 2
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
V=$(./train_moe --config "$CONFIG" --print-config | sed -n 's/^vocab_size=//p')
./build/gen_shards "$TMP" "$V" 200000 1000 1 > /dev/null
for s in "$S1" "$S2"; do
    EMU_TRAFFIC="$TMP/t$s" "$BIN" --config "$CONFIG" --train-data "$TMP/train_*.bin" -b "$B" --steps "$s" \
        --warmup-steps 1 --print-every 1000 --threads 1 > "$TMP/out$s" 2>&1 || { cat "$TMP/out$s"; exit 1; }
done
echo "$CONFIG, micro-batch $B x $(./train_moe --config "$CONFIG" --print-config | sed -n 's/^seq_len=//p'), per training step (steps $S2 - $S1):"
awk -v n=$((S2 - S1)) '
    FNR == 1 { f++ } /^#/ { next }
    { s = f == 2 ? 1 : -1; for (i = 2; i <= 6; i++) c[$1, i] += s * $i; k[$1] = 1 }
    END {
        printf "  %-36s %8s %21s %21s\n", "kernel", "launches", "KB read: distinct/all", "KB written: dist/all"
        for (x in k) if (c[x, 2] != 0 || c[x, 3] != 0) {
            printf "  %-36s %8.1f %10.1f %10.1f %10.1f %10.1f\n", x, c[x, 2] / n, c[x, 5] / n / 1024, c[x, 3] / n / 1024,
                   c[x, 6] / n / 1024, c[x, 4] / n / 1024 | "sort -k3 -n -r"
            for (i = 2; i <= 6; i++) t[i] += c[x, i]
        }
        close("sort -k3 -n -r")
        printf "  %-36s %8.1f %10.1f %10.1f %10.1f %10.1f\n", "all kernels", t[2] / n, t[5] / n / 1024, t[3] / n / 1024,
               t[6] / n / 1024, t[4] / n / 1024
    }' "$TMP/t$S1" "$TMP/t$S2"
