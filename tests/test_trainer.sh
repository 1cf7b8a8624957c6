#!/usr/bin/env bash
# End-to-end tests of train_moe on a synthetic corpus (tests/gen_shards.c):
#  1. a tiny run learns: validation loss falls far below log(V);
#  2. exact resume: 20 steps + --resume 10 steps == 30 uninterrupted steps,
#     bit for bit (parameters, biases, AdamW moments, losses);
#  3. SIGTERM: the run finishes its step, writes a checkpoint, exits 0;
#  4. a corrupt checkpoint is rejected by --resume, naming the file, and
#     nothing in the directory changes;
#  5. --lr 0 moves nothing; --init-from accepts another seq_len only;
#  6. bad options and impossible configs are rejected with a message;
#  7. gradient accumulation: 2 and 4 micro-batches make the step of one
#     micro-batch holding the same sequences.
. "$(dirname "$0")/lib.sh"
test_begin test_trainer --tmp
# MOE_BIN_DIR holds the programs, MOE_BUILD the test tools (make test-asan: the sanitizer build).
BIN=${MOE_BIN_DIR:-.}/train_moe
CKPT=${MOE_BIN_DIR:-.}/moe_ckpt

test_shards "$TMP" 200000 20000
COMMON=(--config tiny --train-data "$TMP/train_*.bin" --val-data "$TMP/val_*.bin" -b 8 --lr 1e-2
        --warmup-steps 5 --lr-min 1e-3 --threads 2 --print-every 1000)

# 1. learning. A perfect model of the chain has loss log 4 = 1.39; a fresh one log 64 = 4.16.
$BIN "${COMMON[@]}" --steps 80 --eval-every 40 --log "$TMP/learn.jsonl" > "$TMP/learn.out" 2>&1 \
    || { bad "training run failed:"; cat "$TMP/learn.out"; }
first=$(grep '"type":"eval"' "$TMP/learn.jsonl" | head -1 | sed 's/.*"val_loss":\([0-9.]*\).*/\1/')
last=$(grep '"type":"eval"' "$TMP/learn.jsonl" | tail -1 | sed 's/.*"val_loss":\([0-9.]*\).*/\1/')
loss0=$(grep '"type":"step"' "$TMP/learn.jsonl" | head -1 | sed 's/.*"loss":\([0-9.]*\).*/\1/')
if awk -v a="$loss0" -v b="$first" -v c="$last" 'BEGIN { exit !(a > 4.0 && c < b && c < 2.5) }'; then
    ok "loss falls: first step $loss0, val_loss at step 40 $first, at step 80 $last (< 2.5; log 64 = 4.16)"
else
    bad "loss does not fall enough: first step $loss0, val $first -> $last"
fi

if python3 -c '
import json, sys
n = 0
for line in open(sys.argv[1]):
    json.loads(line); n += 1
recs = [json.loads(l) for l in open(sys.argv[1])]
loads = [r for r in recs if "loads" in r]
assert loads and len(loads[-1]["loads"]) == 2 and len(loads[-1]["loads"][0]) == 8, "loads shape"
assert all(sum(l) == 2 * 128 for l in loads[-1]["loads"]), "counts sum to top_k x tokens"
assert recs[0]["type"] == "config" and recs[0]["format"] == "moe-train-log"
print(n)' "$TMP/learn.jsonl" > "$TMP/json.out" 2>&1; then
    ok "every one of the $(cat "$TMP/json.out") log lines is valid JSON; loads are (2 layers x 8 experts) and sum to top_k x tokens"
else
    bad "log is not valid JSON lines: $(tail -1 "$TMP/json.out")"
fi

# 2. exact resume.
run() { $BIN "${COMMON[@]}" --steps 30 --ckpt-every 10 --keep-last 0 "$@" > "$TMP/run.out" 2>&1 \
        || { bad "run $* failed:"; cat "$TMP/run.out"; }; }
run --ckpt-dir "$TMP/a" --log "$TMP/a.jsonl"
run --ckpt-dir "$TMP/b" --log "$TMP/b.jsonl" --run-steps 20
[ -f "$TMP/b/ckpt_00000020.bin" ] && [ ! -f "$TMP/b/ckpt_00000030.bin" ] \
    && ok "--run-steps 20 stopped at step 20 with a checkpoint" || bad "--run-steps did not stop at 20"
run --ckpt-dir "$TMP/b" --log "$TMP/b.jsonl" --resume
sections() { $CKPT info "$1" | grep -E '^  (params|bias|adam_m|adam_v|step|loader) '; }
if [ -f "$TMP/b/ckpt_00000030.bin" ] && diff <(sections "$TMP/a/ckpt_00000030.bin") \
        <(sections "$TMP/b/ckpt_00000030.bin") > /dev/null; then
    ok "resumed run's step-30 checkpoint equals the uninterrupted one (params, bias, adam_m, adam_v, step, loader hashes)"
else
    bad "resumed run differs from the uninterrupted run"
fi
losses() { grep '"type":"step"' "$1" | sed 's/.*"step":\([0-9]*\),"loss":\([0-9.]*\).*/\1 \2/' | sort -n -u; }
if diff <(losses "$TMP/a.jsonl") <(losses "$TMP/b.jsonl") > /dev/null \
        && [ "$(losses "$TMP/b.jsonl" | wc -l)" = 30 ]; then
    ok "losses of all 30 steps identical (printed to 6 decimals) between resumed and uninterrupted runs"
else
    bad "losses differ between resumed and uninterrupted runs"
fi

# Sampling from a checkpoint (no tokenizer: token ids are printed).
ids=$($BIN sample "$TMP/a/ckpt_00000030.bin" --sample-tokens 12 --seed 5 2> "$TMP/sample.err" | sed -n '/^---$/,/^---$/p' | grep -v -- '---')
again=$($BIN sample "$TMP/a/ckpt_00000030.bin" --sample-tokens 12 --seed 5 2> /dev/null | sed -n '/^---$/,/^---$/p' | grep -v -- '---')
n=$(echo "$ids" | wc -w)
if [ "$n" = 12 ] && echo "$ids" | tr ' ' '\n' | awk 'NF && ($1 < 0 || $1 >= 64) { e = 1 } END { exit e }' && [ "$ids" = "$again" ]; then
    ok "sample command: 12 token ids in [0, 64), the same again with the same seed: $ids"
else
    bad "sample command printed '$ids' ($(cat "$TMP/sample.err"))"
fi

# 3. SIGTERM finishes the step and checkpoints.
$BIN "${COMMON[@]}" --steps 100000 --ckpt-dir "$TMP/s" --log "$TMP/s.jsonl" > "$TMP/s.out" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q '"type":"step"' "$TMP/s.jsonl" 2>/dev/null && break; sleep 0.1; done
kill -TERM $pid
wait $pid
rc=$?
laststep=$(grep '"type":"step"' "$TMP/s.jsonl" | tail -1 | sed 's/.*"step":\([0-9]*\).*/\1/')
if [ $rc = 0 ] && [ -f "$(printf '%s/s/ckpt_%08d.bin' "$TMP" "$laststep")" ] && $CKPT info "$TMP"/s/ckpt_*.bin > /dev/null; then
    ok "SIGTERM: exit 0 with an intact checkpoint of the last step ($laststep)"
else
    bad "SIGTERM: exit $rc, last step $laststep, checkpoints: $(ls "$TMP/s")"
fi

# 4. a corrupt checkpoint is rejected and nothing changes.
cp -r "$TMP/a" "$TMP/c"
f="$TMP/c/ckpt_00000030.bin"
printf '\x55' | dd of="$f" bs=1 seek=5000 conv=notrunc status=none
before=$(md5sum "$TMP"/c/* | md5sum)
if $BIN "${COMMON[@]}" --steps 40 --ckpt-dir "$TMP/c" --resume > "$TMP/c.out" 2>&1; then
    bad "resume from a corrupt checkpoint succeeded"
elif grep -q "ckpt_00000030.bin" "$TMP/c.out" && [ "$before" = "$(md5sum "$TMP"/c/* | md5sum)" ]; then
    ok "corrupt checkpoint rejected: $(grep -m1 error "$TMP/c.out" | cut -c1-160)"
else
    bad "corrupt checkpoint: message does not name the file, or the directory changed"; cat "$TMP/c.out"
fi
head -c 100000 "$TMP/a/ckpt_00000020.bin" > "$TMP/trunc.bin"
if $BIN "${COMMON[@]}" --steps 40 --init-from "$TMP/trunc.bin" > "$TMP/t.out" 2>&1; then
    bad "a truncated checkpoint was accepted"
else
    ok "truncated checkpoint rejected: $(grep -m1 error "$TMP/t.out" | cut -c1-160)"
fi

# 5. options a user probing a model needs.
# --lr 0 moves no parameter (AdamW's decoupled weight decay is lr-scaled too),
# while the balancing biases still follow the counts: 1 step and 3 steps at
# lr 0 from the same start hold the same parameters, different biases.
params_of() { $CKPT info "$1" | awk '$1 == "params" || $1 == "bias" { print $1, $NF }'; }
$BIN "${COMMON[@]}" --lr 0 --warmup-steps 0 --steps 1 --ckpt-dir "$TMP/z1" --keep-last 0 > "$TMP/z1.out" 2>&1 || { bad "--lr 0 run failed"; cat "$TMP/z1.out"; }
$BIN "${COMMON[@]}" --lr 0 --warmup-steps 0 --steps 3 --ckpt-dir "$TMP/z3" --keep-last 0 > "$TMP/z3.out" 2>&1 || { bad "--lr 0 run failed"; cat "$TMP/z3.out"; }
p1=$(params_of "$TMP/z1/ckpt_00000001.bin" | grep params); p3=$(params_of "$TMP/z3/ckpt_00000003.bin" | grep params)
b1=$(params_of "$TMP/z1/ckpt_00000001.bin" | grep bias); b3=$(params_of "$TMP/z3/ckpt_00000003.bin" | grep bias)
if [ -n "$p1" ] && [ "$p1" = "$p3" ] && [ "$b1" != "$b3" ]; then
    ok "--lr 0 accepted: parameters after 1 and 3 steps identical ($p1), biases updated"
else
    bad "--lr 0: params '$p1' vs '$p3', biases '$b1' vs '$b3'"
fi
# --init-from a checkpoint trained at another sequence length: accepted (no
# parameter depends on it); a different d_model is refused, naming the field.
if $BIN "${COMMON[@]}" --steps 6 --seq-len 8 --init-from "$TMP/a/ckpt_00000030.bin" > "$TMP/sl.out" 2>&1 \
    && grep -q "initialised from" "$TMP/sl.out"; then
    ok "--init-from with a different seq_len (16 -> 8) accepted"
else
    bad "--init-from with another seq_len refused:"; cat "$TMP/sl.out"
fi
if $BIN "${COMMON[@]}" --steps 6 --d-model 48 --init-from "$TMP/a/ckpt_00000030.bin" > "$TMP/dm.out" 2>&1; then
    bad "--init-from with another d_model accepted"
elif grep -q "d_model differ" "$TMP/dm.out"; then
    ok "--init-from with another d_model refused: $(grep -m1 error "$TMP/dm.out" | cut -c1-150)"
else
    bad "--init-from with another d_model: message does not name d_model:"; cat "$TMP/dm.out"
fi

# 6. bad input.
expect_fail() {
    local what="$1"; shift
    if out=$("$@" 2>&1); then bad "$what: accepted"; else ok "$what rejected: $(echo "$out" | grep -m1 error | cut -c1-150)"; fi
}
expect_fail "unknown option" $BIN --no-such-option 1
expect_fail "top_k > n_routed" $BIN "${COMMON[@]}" --top-k 9
expect_fail "heads not dividing d" $BIN "${COMMON[@]}" --n-heads 3
expect_fail "missing config file" $BIN "${COMMON[@]}" --config "$TMP/none.cfg"
expect_fail "bad balance rule" $BIN "${COMMON[@]}" --gamma-rule nope
expect_fail "missing shards" $BIN --train-data "$TMP/nothing_*.bin" --steps 200
expect_fail "vocabulary larger than the model" $BIN "${COMMON[@]}" --vocab-size 32
expect_fail "batch-tokens not a multiple" $BIN "${COMMON[@]}" --batch-tokens 1000

# 7. Gradient accumulation. --batch-tokens 128 as 2 micro-batches of 4
#    sequences or 4 of 2 reads the same 8 sequences per step, in the same
#    order, as one micro-batch of 8 (docs/data.md), so the steps must agree:
#    losses and gradient norms of the log, parameters, AdamW moments and
#    biases of the checkpoint. Clipping is off so that the moments carry the
#    gradient's scale (a clipped gradient hides a constant factor, e.g. a sum
#    over micro-batches instead of a mean). Measured: bit-identical, as the CPU
#    matmuls sum every weight-gradient entry over the rows in one fixed order
#    and the micro-batch weights 1/2 and 1/4 are exact; so identity is required.
. tests/compare_runs.sh
ACC=(--steps 3 --warmup-steps 1 --grad-clip 0 --ckpt-every 3 --keep-last 0)
$BIN "${COMMON[@]}" "${ACC[@]}" -b 8 --ckpt-dir "$TMP/acc1" --log "$TMP/acc1.jsonl" > "$TMP/acc1.out" 2>&1 \
    || { bad "one micro-batch run failed"; cat "$TMP/acc1.out"; }
for m in 2 4; do
    $BIN "${COMMON[@]}" "${ACC[@]}" -b $((8 / m)) --batch-tokens 128 --ckpt-dir "$TMP/acc$m" --log "$TMP/acc$m.jsonl" \
        > "$TMP/acc$m.out" 2>&1 || { bad "$m micro-batches: run failed"; cat "$TMP/acc$m.out"; continue; }
    grep -q "x $m micro-batches of $((8 / m)) x 16 = 128 tokens per step" "$TMP/acc$m.out" \
        || bad "$m micro-batches: not what the run did: $(grep '^batch:' "$TMP/acc$m.out")"
    run_close "$m micro-batches of $((8 / m)) vs one of 8" "$TMP/acc1.jsonl" "$TMP/acc$m.jsonl" \
        "$TMP/acc1/ckpt_00000003.bin" "$TMP/acc$m/ckpt_00000003.bin" 3 0 0 0 0
done

test_end
