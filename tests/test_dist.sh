#!/usr/bin/env bash
# Data and expert parallelism on the CPU with MPI (mpirun on one machine):
# 10 steps of `tiny` with DP=2, EP=2, EP=4 and DP2 x EP2 against one process
# whose micro-batch holds the same sequences (B x ranks). Checks:
#  - identical expert counts, hence bit-identical biases on every rank and
#    the same biases as the single process;
#  - losses and gradient norms of every step, parameters and AdamW moments
#    after 10 steps, within tolerances derived from the measured error of
#    the order of the fp32 gradient sums (an all-reduce of per-rank partial
#    sums instead of one process's loop). Measured over these 4 layouts and
#    seeds 1..4: losses within 1e-6 (the log's 6 decimals), gradient norms
#    identical to the log's 6 significant digits, parameters 2.2e-5 (abs),
#    AdamW moments 1.2e-5 (relative to the largest). Tolerances: losses
#    5e-6, gradient norms 2e-5 (relative: two units of the last printed
#    digit), parameters 5e-5, moments 3e-5. A gradient summed over the ranks
#    instead of averaged doubles the norms (and moved parameters by 1.2e-4);
#  - a checkpoint written under EP=2 resumes under EP=4 (the file holds the
#    whole model) and continues like an uninterrupted EP=4 run (the same
#    tolerances; measured: parameters 3.0e-7).
# MOE_BIN_DIR holds the programs, MOE_BUILD the test tools (make test-asan: the sanitizer build).
BIN=${MOE_BIN_DIR:-.}/train_moe
CKPT=${MOE_BIN_DIR:-.}/moe_ckpt
. "$(dirname "$0")/lib.sh"
test_begin test_dist --tmp
if ! command -v mpirun > /dev/null || ! $BIN --help > /dev/null 2>&1; then
    bad "mpirun or train_moe missing (install openmpi-bin libopenmpi-dev, then make)"; test_end
fi
# CI runs as root; Open MPI refuses that unless told.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

test_shards "$TMP" 100000 10000 3
COMMON=(--config tiny --train-data "$TMP/train_*.bin" --val-data "$TMP/val_*.bin" --lr 1e-2 --warmup-steps 2
        --steps 10 --threads 1 --print-every 100 --init-std 0.1 --eval-batches 2 --ckpt-every 5 --keep-last 0)
B=8

run() { # name ranks ep [extra...]
    local name=$1 np=$2 ep=$3; shift 3
    local b=$((B / (np > 0 ? np : 1)))
    if [ "$np" = 0 ]; then
        $BIN "${COMMON[@]}" -b $B --ckpt-dir "$TMP/$name" --log "$TMP/$name.jsonl" "$@" > "$TMP/$name.out" 2>&1
    else
        mpirun -np "$np" $BIN "${COMMON[@]}" -b $b --ep "$ep" --ckpt-dir "$TMP/$name" \
            --log "$TMP/$name.jsonl" "$@" > "$TMP/$name.out" 2>&1
    fi || { bad "$name: run failed"; tail -5 "$TMP/$name.out"; return 1; }
}
# Tolerances (see the head of this file).
TOL_LOSS=5e-6 TOL_NORM=2e-5 TOL_PARAM=5e-5 TOL_MOM=3e-5
. tests/compare_runs.sh
close() { # name: compare with the single-process run
    local name=$1
    local hashes; hashes=$(grep -o 'final bias xxh64 [0-9a-f]*' "$TMP/$name.out" | sort -u)
    local nranks; nranks=$(grep -c 'final bias xxh64' "$TMP/$name.out")
    [ "$(echo "$hashes" | wc -l)" = 1 ] && [ "$hashes" = "$(grep -o 'final bias xxh64 [0-9a-f]*' "$TMP/single.out")" ] \
        && ok "$name: the $nranks ranks hold bit-identical biases, equal to the single process's" \
        || bad "$name: biases differ between ranks or from the single process"
    run_close "$name" "$TMP/single.jsonl" "$TMP/$name.jsonl" "$TMP/single/ckpt_00000010.bin" \
        "$TMP/$name/ckpt_00000010.bin" 10 $TOL_LOSS $TOL_NORM $TOL_PARAM $TOL_MOM
}

run single 0 1
run dp2 2 1 && close dp2
run ep2 2 2 && close ep2
run ep4 4 4 && close ep4
run dp2ep2 4 2 && close dp2ep2

# EP=2 checkpoint at step 5, resumed with EP=4 on the same 4 ranks.
run switch 4 2 --run-steps 5 && run switch 4 4 --resume
if [ -f "$TMP/switch/ckpt_00000010.bin" ]; then
    run_close "EP=2 checkpoint resumed under EP=4 vs an EP=4 run" "$TMP/ep4.jsonl" "$TMP/switch.jsonl" \
        "$TMP/ep4/ckpt_00000010.bin" "$TMP/switch/ckpt_00000010.bin" 10 $TOL_LOSS $TOL_NORM $TOL_PARAM $TOL_MOM
else
    bad "EP 2 -> 4 resume wrote no step-10 checkpoint"
fi

# Impossible layouts are refused.
if mpirun -np 2 $BIN "${COMMON[@]}" -b 4 --ep 3 > "$TMP/bad.out" 2>&1; then bad "--ep 3 on 2 ranks accepted"
else ok "--ep 3 on 2 ranks rejected: $(grep -m1 error "$TMP/bad.out")"; fi

test_end
