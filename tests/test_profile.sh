#!/usr/bin/env bash
# --profile on the GPU trainer (run on the CPU emulator: tests/emu), and on the
# CPU trainer: the per-phase device times add up to the host's step time
# (within 5%), the per-phase FLOPs add up to the model's training FLOPs per
# token x tokens per step, every phase with model FLOPs got time, and the
# table and the JSON record are written.
#   tests/test_profile.sh build/emu/FP32/train_moecu
. "$(dirname "$0")/lib.sh"
test_begin test_profile --tmp
GPU=${1:?usage: tests/test_profile.sh TRAIN_MOECU}

test_shards "$TMP"
ARGS=(--config tiny --train-data "$TMP/train_*.bin" -b 4 --steps 6 --warmup-steps 1)
# The FLOPs per token the model reports (model/config.c), independent of the profile's per-phase split.
fpt=$(./train_moe --config tiny --print-config | sed -n 's/^training FLOPs per token (T=[0-9]*): //p')

check_run() { # NAME BINARY
    local name=$1 bin=$2
    if ! "$bin" "${ARGS[@]}" --profile 3 --log "$TMP/$name.jsonl" > "$TMP/$name.out" 2>&1; then
        bad "$name --profile 3 failed:"; cat "$TMP/$name.out"; return
    fi
    grep -q "^profile: 3 steps of 64 tokens after 2 warm-up steps" "$TMP/$name.out" \
        && ok "$name prints the profile table" || { bad "$name: no profile table"; cat "$TMP/$name.out"; }
    /usr/bin/python3 - "$TMP/$name.jsonl" "$fpt" "$name" << 'PY' && ok "$name: $(cat "$TMP/$name.res")" || bad "$name: $(cat "$TMP/$name.res" 2>/dev/null)"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
prof = [r for r in recs if r["type"] == "profile"]
out = open(sys.argv[1].replace(".jsonl", ".res"), "w")
def fail(msg):
    out.write(msg); out.close(); sys.exit(1)
if len(prof) != 1: fail("%d profile records" % len(prof))
p = prof[0]
flops = sum(v["flops"] for v in p["phases"].values())
want = float(sys.argv[2]) * p["tokens_per_step"]
if abs(flops - want) > 5e-4 * want:  # the model's figure is printed with 4 digits
    fail("phase FLOPs %.6g != FLOPs per token x tokens %.6g" % (flops, want))
ms = sum(v["ms"] for v in p["phases"].values())
msg = "phase FLOPs sum to %.6g = %s x %d tokens" % (flops, sys.argv[2], p["tokens_per_step"])
# Both backends time every phase: on the emulated GPU with CUDA events, on
# the CPU with the host clock at the same boundaries (model/phase.h).
if abs(ms - p["step_ms"]) > 0.05 * p["step_ms"]:
    fail("phases add up to %.3f ms, the step takes %.3f ms (more than 5%% apart)" % (ms, p["step_ms"]))
idle = [k for k, v in p["phases"].items() if v["flops"] > 0 and v["ms"] <= 0]
if idle: fail("phases with FLOPs but no time: %s" % idle)
msg += "; phases add up to %.1f ms of the %.1f ms step (%.2f%%)" % (ms, p["step_ms"], 100 * abs(ms - p["step_ms"]) / p["step_ms"])
out.write(msg); out.close()
PY
}
check_run gpu "$GPU"
check_run cpu ./train_moe
if ./train_moe "${ARGS[@]}" --steps 3 --profile 3 > "$TMP/short.out" 2>&1; then bad "--profile 3 with --steps 3 accepted"
else ok "--profile needs --steps >= N + 2: $(grep -m1 error "$TMP/short.out" | cut -c1-120)"; fi

test_end
