#!/usr/bin/env bash
# Training throughput of the GPU trainer: for each preset, micro-batches of
# 1, 2, 4, 8, ... sequences until one does not fit (an out-of-memory start
# ends that preset's series) or --max-batch; tokens/s, MFU and memory as a
# markdown table. See docs/gpu.md, "What a GPU session runs".
#
#   bench/gpu_bench.sh [--trainer ./train_moecu] [--presets small,1b,3b] [--max-batch 64]
#                      [--steps 8] [--budget SECONDS] [--out DIR]
#
# Each size is one run of the trainer on synthetic shards (tests/gen_shards.c)
# for --steps steps; tokens/s is the median of the step records of its JSON
# log after the first two (cuBLASLt plans and allocations are made there).
# When the trainer accepts --profile (its --help says so), the runs pass
# --profile and keep its per-phase output in DIR/runs/*.out.
#   MFU = training FLOPs per token (the trainer's --print-config: 6 x active
#         parameters + attention, model/config.c) x tokens/s / the GPU's dense
#         bf16 peak (bench/gpu_peaks.h; an unknown GPU gets no MFU).
#   memory: what the trainer allocates (its "GPU memory" start-up line) and the
#         peak of nvidia-smi's memory.used during the run, less the memory used
#         before it (CUDA context, cuBLAS workspace and allocator slack included).
# --budget stops starting runs that would not finish in time; the table says
# which sizes were not run. Output: DIR/gpu_bench.md, DIR/gpu_bench.tsv,
# every run's output in DIR/runs/. Exit status 1 when a run failed other than
# by running out of memory.
set -u
cd "$(dirname "$0")/.."

TRAINER=./train_moecu
PRESETS=small,1b,3b
MAX_B=64
STEPS=8
BUDGET=0
OUT=build/gpu_bench
usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case $1 in
        --trainer) TRAINER=$2; shift 2 ;;
        --presets) PRESETS=$2; shift 2 ;;
        --max-batch) MAX_B=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "gpu_bench.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for v in "$MAX_B" "$STEPS" "$BUDGET"; do
    [[ $v =~ ^[0-9]+$ ]] || { echo "gpu_bench.sh: '$v' is not a whole number" >&2; exit 2; }
done
[ "$STEPS" -ge 4 ] || { echo "gpu_bench.sh: --steps must be >= 4 (two are left out of the median)" >&2; exit 2; }
[ -x "$TRAINER" ] || { echo "gpu_bench.sh: no trainer at $TRAINER (make train_moecu)" >&2; exit 2; }
make -s --no-print-directory build/gen_shards build/gpu_peak || exit 2
mkdir -p "$OUT/runs" "$OUT/data" || exit 2
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }

# nvidia-smi's view of the GPU the trainer takes (the first visible one).
SMI_ID=${CUDA_VISIBLE_DEVICES:-0}
SMI_ID=${SMI_ID%%,*}
have_smi() { command -v nvidia-smi > /dev/null 2>&1; }
mem_used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$SMI_ID" 2> /dev/null | head -1; }

. bench/log_rate.sh

PROFILE=()
if "$TRAINER" --help 2> /dev/null | grep -q -- '--profile'; then PROFILE=(--profile $((STEPS - 2))); fi

TSV=$OUT/gpu_bench.tsv
printf 'preset\tmicro_batch\ttokens_per_step\ttokens_per_s\tms_per_step\tmfu\talloc_gib\tpeak_gib\tstatus\n' > "$TSV"
row() { local IFS=$'\t'; echo "$*" >> "$TSV"; }
GPU_NAME=""
PEAK=""
stop_all=0
failed=0
last_run_s=0

for preset in ${PRESETS//,/ }; do
    [ $stop_all = 0 ] || { row "$preset" - - - - - - - "not run: budget"; continue; }
    cfg=$("$TRAINER" --config "$preset" --print-config 2>&1) || {
        row "$preset" - - - - - - - "config error: $(echo "$cfg" | head -1)"; continue; }
    V=$(sed -n 's/^vocab_size=//p' <<< "$cfg")
    T=$(sed -n 's/^seq_len=//p' <<< "$cfg")
    FLOPS=$(sed -n 's/^training FLOPs per token (T=[0-9]*): //p' <<< "$cfg")
    # Enough windows for the largest micro-batch; the loader cycles through epochs.
    data=$OUT/data/v$V
    if [ ! -f "$data/train_000.bin" ]; then
        mkdir -p "$data" && ./build/gen_shards "$data" "$V" $((MAX_B * T + 1)) $((T + 1)) 1 > /dev/null ||
            { row "$preset" - - - - - - - "gen_shards failed"; continue; }
    fi
    B=1
    last_run_s=0
    while [ "$B" -le "$MAX_B" ]; do
        # A run takes about twice the last one (twice the tokens); the first
        # of a preset at least 30 s (start-up: initialisation, cuBLAS, data).
        need=$((last_run_s * 2 > 30 ? last_run_s * 2 : 30))
        if [ "$BUDGET" -gt 0 ] && [ $(($(elapsed) + need)) -gt "$BUDGET" ]; then
            row "$preset" "$B" - - - - - - "not run: budget ($(elapsed) of $BUDGET s used)"
            stop_all=1
            break
        fi
        limit=600
        [ "$BUDGET" -gt 0 ] && limit=$((BUDGET - $(elapsed)))
        name=$OUT/runs/$preset-b$B
        rm -f "$name.jsonl"
        base=""; smi_pid=""
        if have_smi; then
            base=$(mem_used_mib)
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$SMI_ID" -lms 200 \
                > "$name.smi" 2> /dev/null &
            smi_pid=$!
        fi
        t0=$(date +%s)
        timeout --kill-after=10 "$limit" "$TRAINER" --config "$preset" --train-data "$data/train_*.bin" -b "$B" \
            --steps "$STEPS" --warmup-steps 1 --print-every 1 --log "$name.jsonl" "${PROFILE[@]}" \
            > "$name.out" 2>&1
        rc=$?
        last_run_s=$(($(date +%s) - t0))
        [ -n "$smi_pid" ] && { kill "$smi_pid" 2> /dev/null; wait "$smi_pid" 2> /dev/null; }
        if [ -z "$GPU_NAME" ]; then
            GPU_NAME=$(sed -n 's/^GPU 0: \(.*\) (sm_[0-9]*,.*/\1/p' "$name.out" | head -1)
            [ -n "$GPU_NAME" ] && PEAK=$(./build/gpu_peak "$GPU_NAME" 2> /dev/null | cut -f1)
            # What the trainer says of the GPU and of its grouped-GEMM probe, once.
            grep -E '^(GPU 0:|expert GEMMs:|note: cublasGemmGroupedBatchedEx)' "$name.out"
        fi
        if grep -qiE 'out of (GPU )?memory|cudaErrorMemoryAllocation|CUBLAS_STATUS_ALLOC_FAILED' "$name.out"; then
            row "$preset" "$B" $((B * T)) - - - - - "out of memory: the series ends"
            break
        fi
        if [ $rc != 0 ]; then
            why=$([ $rc = 124 ] || [ $rc = 137 ] && echo "stopped after $limit s" ||
                  grep -m1 -i 'error' "$name.out" | cut -c1-120)
            row "$preset" "$B" $((B * T)) - - - - - "failed (exit $rc): ${why:-see runs/$preset-b$B.out}"
            failed=1
            break
        fi
        tps=$(log_rate "$name.jsonl")
        if [ -z "$tps" ]; then
            row "$preset" "$B" $((B * T)) - - - - - "failed: no step records in runs/$preset-b$B.jsonl"
            failed=1
            break
        fi
        alloc=$(sed -n 's/^GPU memory: \([0-9.]*\) GiB [^,]*, \([0-9.]*\) GiB [^,]*, \([0-9.]*\) GiB.*/\1 \2 \3/p' \
                "$name.out" | awk '{ printf "%.2f", $1 + $2 + $3 }')
        peak=-
        if [ -n "$base" ] && [ -s "$name.smi" ]; then
            peak=$(awk -v b="$base" '$1 + 0 > m { m = $1 + 0 } END { printf "%.2f", (m - b) / 1024 }' "$name.smi")
        fi
        mfu=-
        [ -n "$PEAK" ] && [ -n "$FLOPS" ] && mfu=$(awk -v f="$FLOPS" -v t="$tps" -v p="$PEAK" \
            'BEGIN { printf "%.1f%%", 100 * f * t / (p * 1e12) }')
        ms=$(awk -v t="$tps" -v n=$((B * T)) 'BEGIN { printf "%.1f", 1000 * n / t }')
        row "$preset" "$B" $((B * T)) "$(printf '%.0f' "$tps")" "$ms" "$mfu" "${alloc:--}" "$peak" ok
        B=$((B * 2))
    done
done

# The markdown table, from the TSV.
{
    echo "GPU: ${GPU_NAME:-unknown}; dense bf16 peak: ${PEAK:+$PEAK TFLOP/s (bench/gpu_peaks.h)}${PEAK:-unknown, so no MFU}."
    echo "Trainer: $TRAINER, $STEPS steps per size, tokens/s the median of steps 3..$STEPS$([ ${#PROFILE[@]} -gt 0 ] && echo ", with --profile")."
    echo
    echo "| preset | micro-batch | tokens/step | tokens/s | ms/step | MFU | GPU memory allocated (GiB) | peak used (GiB, nvidia-smi) | |"
    echo "|---|---|---|---|---|---|---|---|---|"
    tail -n +2 "$TSV" | awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, ($9 == "ok" ? "" : $9) }'
} > "$OUT/gpu_bench.md"
cat "$OUT/gpu_bench.md"
# A run that failed other than by running out of memory fails the benchmark.
exit $failed
