#!/usr/bin/env bash
# The PyTorch peer (bench/peers/moe_torch.py) trains the project's model, so
# that bench/compare.sh times the same work on both sides. On the CPU, tiny
# preset, fp32:
#  - train_moe runs 4 steps and writes a checkpoint after each; the peer, in
#    both modes (eager: expert loop; compiled: torch.compile + grouped GEMMs +
#    fused AdamW), starts from the step-1 checkpoint (parameters, biases, AdamW
#    moments and step) and runs steps 2..4 on the same tokens: its losses must
#    match train_moe's within 1e-4 and its per-layer routing counts exactly, so
#    the same experts were chosen and the bias updates, AdamW, clipping and
#    LR schedule are the trainer's. (The shard holds exactly one micro-batch
#    of windows, so every step of both trainers sees all of them, in whatever
#    order each shuffles them; the loss and the counts do not depend on it.)
#  - the same in eager mode with the 1b-hz preset's pieces (softmax gate,
#    parallel residual, --bias-on logits);
#  - its parameter count equals the trainer's (the same shapes);
#  - a truncated checkpoint and a checkpoint of another model are refused,
#    naming the file.
#
#   tests/test_peers.sh PYTHON      (a Python with PyTorch: the Makefile's $(PY_VENV)/bin/python)
. "$(dirname "$0")/lib.sh"
test_begin test_peers --tmp
PY=${1:?usage: tests/test_peers.sh PYTHON}

B=8 T=16
test_shards "$TMP" $((B * T + 1)) $((T + 1))
./train_moe --config tiny --print-config > "$TMP/tiny.config"
OPTS=(-b $B --steps 4 --warmup-steps 2 --lr 1e-2 --lr-min 1e-3 --train-data "$TMP/train_*.bin")
./train_moe --config tiny "${OPTS[@]}" --threads 1 --ckpt-dir "$TMP/ck" --ckpt-every 1 --keep-last 0 \
    --log "$TMP/cpu.jsonl" --log-loads-every 1 > "$TMP/cpu.out" 2>&1 || { bad "train_moe failed:"; cat "$TMP/cpu.out"; test_end; }
# Han & Zhong's pieces (the 1b-hz preset's): softmax gate, parallel residual,
# the bias on the router logits; the peer in eager mode.
HZ=(--gate softmax --norm-topk 1 --parallel-residual 1)
./train_moe --config tiny "${HZ[@]}" --print-config > "$TMP/hz.config"
./train_moe --config tiny "${HZ[@]}" --bias-on logits "${OPTS[@]}" --threads 1 --ckpt-dir "$TMP/ck_hz" --ckpt-every 1 \
    --keep-last 0 --log "$TMP/cpu_hz.jsonl" --log-loads-every 1 > "$TMP/cpu_hz.out" 2>&1 ||
    { bad "train_moe (1b-hz pieces) failed:"; cat "$TMP/cpu_hz.out"; test_end; }

for run in eager compiled eager_hz; do
    mode=${run%_hz}
    if [ "$run" = eager_hz ]; then cfg=hz.config ck=ck_hz cpu=cpu_hz.jsonl extra=(--bias-on logits)
    else cfg=tiny.config ck=ck cpu=cpu.jsonl extra=(); fi
    "$PY" bench/peers/moe_torch.py --model-config "$TMP/$cfg" "${OPTS[@]}" "${extra[@]}" --mode $mode --threads 1 \
        --init-from "$TMP/$ck/ckpt_00000001.bin" --init-opt-state --log "$TMP/$run.jsonl" > "$TMP/$run.out" 2>&1 ||
        { bad "$run: the peer failed:"; tail -5 "$TMP/$run.out"; continue; }
    # step, loss and loads of each step record, from both logs, side by side.
    if /usr/bin/python3 - "$TMP/$cpu" "$TMP/$run.jsonl" > "$TMP/$run.cmp" << 'EOF'
import json, sys
def steps(path):
    return {r["step"]: r for r in map(json.loads, open(path)) if r.get("type") == "step"}
cpu, peer = steps(sys.argv[1]), steps(sys.argv[2])
assert sorted(peer) == [2, 3, 4], "peer steps %s" % sorted(peer)
worst = 0.0
for s in sorted(peer):
    d = abs(cpu[s]["loss"] - peer[s]["loss"])
    worst = max(worst, d)
    assert d <= 1e-4, "step %d: loss %.7f vs train_moe %.7f" % (s, peer[s]["loss"], cpu[s]["loss"])
    assert peer[s]["loads"] == cpu[s]["loads"], "step %d: counts %s vs train_moe %s" % (s, peer[s]["loads"], cpu[s]["loads"])
print("steps 2..4: losses within %.1e of train_moe's (%s), routing counts identical (%d layers x %d experts)"
      % (worst, ", ".join("%.4f" % cpu[s]["loss"] for s in sorted(peer)), len(cpu[2]["loads"]), len(cpu[2]["loads"][0])))
EOF
    then ok "$run ($(grep -o 'experts by [^,]*' "$TMP/$run.out")): $(cat "$TMP/$run.cmp")"
    else bad "$run: differs from train_moe:"; cat "$TMP/$run.cmp"; fi
done

n_peer=$(sed -n 's/.*: \([0-9]*\) parameters,.*/\1/p' "$TMP/eager.out")
n_cpu=$(sed -n 's/^total parameters: //p' "$TMP/tiny.config")
[ -n "$n_peer" ] && [ "$n_peer" = "$n_cpu" ] && ok "the peer has the trainer's $n_cpu parameters" ||
    bad "parameters: peer '$n_peer', train_moe '$n_cpu'"

# Bad checkpoints: the peer stops with the file's name.
head -c 5000 "$TMP/ck/ckpt_00000001.bin" > "$TMP/short.bin"
"$PY" bench/peers/moe_torch.py --model-config "$TMP/tiny.config" "${OPTS[@]}" --init-from "$TMP/short.bin" \
    > "$TMP/short.out" 2>&1
rc=$?
[ $rc != 0 ] && grep -q "short.bin: truncated or damaged" "$TMP/short.out" && ok "truncated checkpoint refused: $(tail -1 "$TMP/short.out")" ||
    { bad "truncated checkpoint: exit $rc:"; tail -3 "$TMP/short.out"; }
sed 's/^n_routed=8$/n_routed=4/' "$TMP/tiny.config" > "$TMP/other.config"
"$PY" bench/peers/moe_torch.py --model-config "$TMP/other.config" "${OPTS[@]}" --init-from "$TMP/ck/ckpt_00000001.bin" \
    > "$TMP/other.out" 2>&1
rc=$?
[ $rc != 0 ] && grep -q "ckpt_00000001.bin holds another model" "$TMP/other.out" && ok "another model's checkpoint refused: $(tail -1 "$TMP/other.out")" ||
    { bad "checkpoint of another model: exit $rc:"; tail -3 "$TMP/other.out"; }

test_end
