#!/usr/bin/env bash
# The balancing lab inside the trainers (docs/balance.md "In the trainers"):
# runs that trace every token (--trace-router), replayed and recomputed.
#  1. CPU, two micro-batches per step: moe_replay with the run's own settings
#     and --bias-start trace reproduces the bias of every recorded step bit
#     for bit ("bias vs trace" 0), and the logged D, primal, gap, subgradient
#     norms and moved slots of every step and layer equal their recomputation
#     from the trace with model/dual.c (build/trace_dual), exactly;
#  2. the same with --bias-update-every micro, the prop rule and the inv
#     schedule (the replay maps the recorded updates to optimizer steps), and
#     with --bias-on logits under a softmax gate;
#  3. --bias-update-every micro with one micro-batch per step is the
#     per-step update, bit for bit (final biases and losses);
#  4. a resumed run continues its trace: 10 steps, then --resume to 20, give
#     the trace of 20 uninterrupted steps byte for byte;
#  5. two ranks (mpirun, when train_moe has MPI): every rank's rows reach the
#     trace; replay and recomputation as in 1;
#  6. the emulated GPU trainer (train_moecu built for tests/emu, the first
#     argument): as in 1 and 2;
#  7. a sample (--trace-tokens) holds M rows per step; bad trace options and a
#     trace that exists already are refused, the file left as it was;
#  8. moe_replay --trace --repeat 1 (the deterministic setting from a real
#     batch): with gamma 0 every step's MaxVio, D and primal equal those of
#     the trace's first step replayed as it is.
#
#   tests/test_lab_trace.sh [EMU_TRAIN_MOECU]     (default build/emu/FP32/train_moecu)
. "$(dirname "$0")/lib.sh"
test_begin test_lab_trace --tmp
GPU=${1:-build/emu/FP32/train_moecu}
# CI runs as root; Open MPI refuses that unless told.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

test_shards "$TMP" 200000 20000
# tiny: 2 MoE layers of 8 experts, top-2; micro-batches of 4 x 16 tokens.
COMMON=(--config tiny --train-data "$TMP/train_*.bin" -b 4 --lr 1e-2 --warmup-steps 2 --threads 1
        --print-every 1000 --log-loads-every 0)

# The logged quantities against trace_dual's recomputation, every step and layer, exactly.
same_dual() { # LOG RECOMPUTED
    python3 - "$1" "$2" << 'EOF'
import json, sys
log = {r["step"]: r for r in map(json.loads, open(sys.argv[1])) if r.get("type") == "step"}
rec = [json.loads(l) for l in open(sys.argv[2])]
keys = ["dual_layers", "primal_layers", "gap_layers", "subgrad_l1_layers", "subgrad_l2_layers", "moved_layers"]
bad = [(r["step"], k) for r in rec for k in keys if log[r["step"]][k] != r[k]]
assert len(rec) == len(log) and rec, "%d recomputed steps, %d logged" % (len(rec), len(log))
assert not bad, "differ: %s" % bad[:5]
print("%d steps x %d layers, %d values" % (len(rec), len(rec[0]["dual_layers"]), len(rec) * len(keys) * len(rec[0]["dual_layers"])))
EOF
}

# Replays TRACE with the given settings from its first bias; prints "bias vs trace".
replay_diff() { # TRACE OUT settings...
    local trace=$1 out=$2
    shift 2
    ./moe_replay --trace "$trace" --bias-start trace --horizons 0 --threads 1 --out "$out" "$@" > "$out.md" 2>&1 \
        || { tail -3 "$out.md"; return 1; }
    awk -F'|' '/^\| [a-z]/ && !/^\| setting/ && NF > 10 { gsub(/ /, "", $(NF - 1)); print $(NF - 1) }' "$out/summary.md"
}

# A traced run, then 1's two checks. NAME BIN ROWS RANKS "balance settings" [more options]
# (RANKS > 1 runs BIN under mpirun).
check_run() {
    local name=$1 bin=$2 rows=$3 ranks=$4 settings=$5
    shift 5
    local launch=()
    [ "$ranks" -gt 1 ] && launch=(mpirun -np "$ranks")
    # shellcheck disable=SC2086
    if ! "${launch[@]}" "$bin" "${COMMON[@]}" $settings "$@" --log "$TMP/$name.jsonl" \
        --trace-router "$TMP/$name.trace" > "$TMP/$name.out" 2>&1; then
        bad "$name: the run failed:"; tail -5 "$TMP/$name.out"; return
    fi
    # shellcheck disable=SC2086
    local diff
    diff=$(replay_diff "$TMP/$name.trace" "$TMP/$name.replay" $settings)
    if [ "$diff" = 0 ]; then ok "$name: replayed with its own settings ($settings), every step's bias bit for bit"
    else bad "$name: the replay's bias differs from the run's: '$diff'"; fi
    if ./build/trace_dual "$TMP/$name.trace" "$rows" "$ranks" > "$TMP/$name.dual" 2> "$TMP/$name.err" \
        && same_dual "$TMP/$name.jsonl" "$TMP/$name.dual" > "$TMP/$name.cmp" 2>&1; then
        ok "$name: logged D, primal, gap, subgradient norms, moved slots == recomputed from the trace ($(cat "$TMP/$name.cmp"))"
    else
        bad "$name: logged primal-dual quantities differ from the trace's:"; cat "$TMP/$name.err" "$TMP/$name.cmp"
    fi
}

# 1, 2: the CPU trainer.
STEP_SET="--gamma 0.01"
MICRO_SET="--gamma-rule prop --gamma 0.05 --gamma-schedule inv --gamma-tau 5 --bias-update-every micro"
LOGIT_SET="--gamma 0.01 --bias-on logits"
check_run cpu ./train_moe 64 1 "$STEP_SET" --batch-tokens 128 --steps 20
check_run cpu_micro ./train_moe 64 1 "$MICRO_SET" --batch-tokens 192 --steps 15
check_run cpu_logits ./train_moe 64 1 "$LOGIT_SET" --batch-tokens 128 --steps 15 --gate softmax

# 3. Micro updates with one micro-batch per step are the per-step updates.
for mode in step micro; do
    ./train_moe "${COMMON[@]}" --steps 15 --gamma 0.01 --bias-update-every $mode --log "$TMP/one_$mode.jsonl" \
        > "$TMP/one_$mode.out" 2>&1 || bad "--bias-update-every $mode run failed"
done
h1=$(grep 'final bias' "$TMP/one_step.out"); h2=$(grep 'final bias' "$TMP/one_micro.out")
l1=$(grep -o '"loss":[0-9.]*' "$TMP/one_step.jsonl" | md5sum); l2=$(grep -o '"loss":[0-9.]*' "$TMP/one_micro.jsonl" | md5sum)
if [ -n "$h1" ] && [ "$h1" = "$h2" ] && [ "$l1" = "$l2" ]; then
    ok "--bias-update-every micro with one micro-batch per step == per step: biases (${h1##* }) and losses bit for bit"
else bad "micro vs step with one micro-batch: '$h1' vs '$h2'"; fi

# 4. Resume continues the trace.
RES=("${COMMON[@]}" --batch-tokens 128 --steps 20 --gamma 0.01 --ckpt-every 10 --keep-last 0)
./train_moe "${RES[@]}" --ckpt-dir "$TMP/ra" --trace-router "$TMP/ra.trace" > "$TMP/ra.out" 2>&1 || bad "run ra failed"
./train_moe "${RES[@]}" --ckpt-dir "$TMP/rb" --trace-router "$TMP/rb.trace" --run-steps 10 > "$TMP/rb.out" 2>&1 \
    || bad "run rb failed"
./train_moe "${RES[@]}" --ckpt-dir "$TMP/rb" --trace-router "$TMP/rb.trace" --resume > "$TMP/rb2.out" 2>&1 \
    || { bad "the resumed run failed:"; tail -3 "$TMP/rb2.out"; }
if cmp -s "$TMP/ra.trace" "$TMP/rb.trace" && grep -q "trace: continuing" "$TMP/rb2.out"; then
    ok "10 steps + --resume 10: the trace equals the uninterrupted run's, byte for byte ($(grep 'trace: continuing' "$TMP/rb2.out"))"
else bad "the resumed run's trace differs from the uninterrupted one"; fi

# 5. Two ranks.
if ./train_moe --help 2> /dev/null | grep -q . && command -v mpirun > /dev/null \
    && mpirun -np 2 ./train_moe --config tiny --print-config > "$TMP/mpi.out" 2>&1; then
    check_run mpi2 ./train_moe 64 2 "$STEP_SET" --batch-tokens 256 --steps 10
else
    echo "skip two ranks: no mpirun"
fi

# 6. The emulated GPU trainer.
if [ -x "$GPU" ]; then
    check_run gpu "$GPU" 64 1 "$STEP_SET" --batch-tokens 128 --steps 8
    check_run gpu_micro "$GPU" 64 1 "$MICRO_SET" --batch-tokens 192 --steps 6
    check_run gpu_logits "$GPU" 64 1 "$LOGIT_SET" --batch-tokens 128 --steps 6 --gate softmax
else
    bad "no emulated train_moecu at $GPU (make emu-build)"
fi

# 7. A sample, and refusals.
./train_moe "${COMMON[@]}" --batch-tokens 128 --steps 3 --trace-router "$TMP/s.trace" --trace-tokens 50 --trace-every 2 \
    > "$TMP/s.out" 2>&1 || bad "sampled run failed"
if ./moe_replay --trace "$TMP/s.trace" --horizons 0 --threads 1 > "$TMP/s.md" 2>&1 \
    && grep -q "2 steps x 50 tokens x 2 MoE layers" "$TMP/s.md"; then
    ok "--trace-tokens 50 --trace-every 2: 2 of 3 steps recorded, 50 rows each ($(grep -o '[0-9]* steps x 50 tokens[^,]*' "$TMP/s.md"))"
else bad "sampled trace: $(grep steps "$TMP/s.md")"; fi
before=$(md5sum < "$TMP/s.trace")
refuse() { # WHAT MESSAGE options...
    local what=$1 msg=$2
    shift 2
    if ./train_moe "${COMMON[@]}" --steps 3 "$@" > "$TMP/r.out" 2>&1; then bad "$what was accepted"
    elif grep -q "$msg" "$TMP/r.out"; then ok "$what refused: $(grep error "$TMP/r.out" | head -1)"
    else bad "$what: no clear message:"; cat "$TMP/r.out"; fi
}
refuse "an existing trace" "s.trace: cannot create trace: File exists" --trace-router "$TMP/s.trace"
[ "$(md5sum < "$TMP/s.trace")" = "$before" ] && ok "and the existing trace is unchanged" || bad "the existing trace changed"
refuse "--trace-every 0" "trace-every must be >= 1" --trace-router "$TMP/x.trace" --trace-every 0
refuse "--trace-tokens -1" "trace-tokens must be >= 0" --trace-router "$TMP/x.trace" --trace-tokens -1
refuse "--bias-on sideways" "bias-on: unknown value 'sideways' (one of scores|logits)" --bias-on sideways
refuse "--bias-on logits with --gamma-rule mult" "bias-on logits cannot go with --gamma-rule mult" --bias-on logits \
    --gamma-rule mult
refuse "--trace-router without MoE layers" "no MoE layer" --n-dense 3 --trace-router "$TMP/x.trace"

# 8. The first step of a real trace, repeated.
./moe_replay --trace "$TMP/cpu.trace" --repeat 1 --steps 6 --gamma 0 --horizons 0 --threads 1 --out "$TMP/rep" \
    > /dev/null 2>&1 && ./moe_replay --trace "$TMP/cpu.trace" --gamma 0 --horizons 0 --threads 1 --out "$TMP/once" \
    > /dev/null 2>&1 || bad "moe_replay --repeat 1 on a trace failed"
if python3 - "$TMP/rep/steps.csv" "$TMP/once/steps.csv" << 'EOF'
import csv, sys
rep = list(csv.DictReader(open(sys.argv[1])))
first = [r for r in csv.DictReader(open(sys.argv[2])) if r["step"] == "0"][0]
keys = ["maxvio", "dual", "primal", "subgrad_l1"]
assert len(rep) == 6 and all(r[k] == first[k] for r in rep for k in keys), (rep[:2], first)
EOF
then ok "--repeat 1 on a trace: 6 steps, each the trace's first step (MaxVio, D, primal, ||c - C||_1 equal)"
else bad "--repeat 1 on a trace does not repeat its first step"; fi

test_end
