#!/usr/bin/env bash
# Inputs that must not hurt the trainer: every case here was once accepted
# silently, crashed, hung or damaged something, and must now be refused with
# a message naming the file or option (or, where the input is legitimate,
# handled). Groups:
#  1. checkpoints whose checksums are valid but whose content is not
#     (tests/ckpt_edit.c writes them): train_moe sample, --resume, --init-from;
#  2. model sizes whose counts overflow, and --sample-tokens at INT_MAX;
#  3. the log on a full disk (/dev/full, and a file size limit mid-run), a
#     checkpoint write that fails;
#  4. moe_ckpt diff: NaN, missing sections, dtype changes, exit status;
#  5. over-long lines in model and options files;
#  6. two trainers on one --ckpt-dir (the lock);
#  7. FIFOs and devices where files are read;
#  8. options checked before the first step; --resume on an empty directory
#     and changed options at resume.
# MOE_BIN_DIR (default .) holds the programs, MOE_BUILD (default build) the
# test tools: `make test-asan` runs this on the sanitizer build.
. "$(dirname "$0")/lib.sh"
test_begin test_inputs
BIN_DIR=${MOE_BIN_DIR:-.}
TOOLS=${MOE_BUILD:-build}
BIN=$BIN_DIR/train_moe
CKPT=$BIN_DIR/moe_ckpt
EDIT=$TOOLS/ckpt_edit
# Its own clean-up rather than test_begin --tmp: it also stops the trainers that 6 starts in the background.
TMP=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2> /dev/null; done; rm -rf "$TMP"; }
trap cleanup EXIT

# Runs a command that must be refused: a non-zero exit that is not a crash
# (a signal gives >= 128, a hang is killed by timeout: 124), and stderr
# containing `want` (a fixed string). Usage: refused WHAT WANT CMD...
refused() {
    local what="$1" want="$2"; shift 2
    timeout 30 "$@" > "$TMP/out" 2> "$TMP/err"
    local rc=$?
    if [ $rc -eq 0 ]; then bad "$what: accepted (exit 0)"
    elif [ $rc -ge 124 ]; then bad "$what: exit $rc (crash, or hang killed by timeout): $(tail -2 "$TMP/err")"
    elif ! grep -qF -- "$want" "$TMP/err"; then bad "$what: message lacks '$want': $(head -3 "$TMP/err")"
    else ok "$what refused: $(grep -m1 -F -- "$want" "$TMP/err" | cut -c1-170)"; fi
}

test_shards "$TMP" 200000 20000
COMMON=(--config tiny --train-data "$TMP/train_*.bin" -b 4 --threads 2 --print-every 1000 --warmup-steps 2)
# A 10-step checkpoint of a 20-step run: the base of every edit below.
$BIN "${COMMON[@]}" --steps 20 --run-steps 10 --ckpt-dir "$TMP/base" > "$TMP/base.out" 2>&1 \
    || { bad "base run failed:"; cat "$TMP/base.out"; test_end; }
BASE=$TMP/base/ckpt_00000010.bin

# ---------------------------------------------------------------- 1. checkpoint content
edit() { # NAME OP ARGS...: writes $TMP/e/NAME/ckpt_00000010.bin, an edited copy of BASE
    local name=$1; shift
    mkdir -p "$TMP/e/$name"
    $EDIT "$BASE" "$TMP/e/$name/ckpt_00000010.bin" "$@" || bad "ckpt_edit $name $* failed"
}
for f in "n_heads 0" "n_routed 0" "top_k 0" "top_k 9" "seq_len 0" "d_model 3" "n_layers 2000000000" "vocab_size -5"; do
    set -- $f
    edit "cfg_$1_$2" line model_config "$1" "$2"
    refused "sample: model_config $1=$2" "section 'model_config'" $BIN sample "$TMP/e/cfg_$1_$2/ckpt_00000010.bin" --sample-tokens 4
done
edit cfg_missing line model_config n_shared -
refused "sample: model_config without n_shared" "field 'n_shared' is missing" $BIN sample "$TMP/e/cfg_missing/ckpt_00000010.bin" --sample-tokens 4
edit cfg_empty text model_config ""
refused "sample: empty model_config" "is missing" $BIN sample "$TMP/e/cfg_empty/ckpt_00000010.bin" --sample-tokens 4
refused "--resume: empty model_config (not filled in from defaults)" "is missing" \
    $BIN "${COMMON[@]}" --steps 20 --ckpt-dir "$TMP/e/cfg_empty" --resume
edit cfg_twice line model_config d_model "32
d_model=32"
refused "sample: a model_config field given twice" "appears twice" $BIN sample "$TMP/e/cfg_twice/ckpt_00000010.bin" --sample-tokens 4

edit step_neg i64 step -1
refused "--resume: step -1" "section 'step'" $BIN "${COMMON[@]}" --steps 20 --ckpt-dir "$TMP/e/step_neg" --resume
edit step_past i64 step 100
refused "--resume: step 100 past --steps 20" "past --steps 20" \
    $BIN "${COMMON[@]}" --steps 20 --ckpt-dir "$TMP/e/step_past" --resume
for f in "params 17 nan" "bias 3 inf" "adam_m 5 -inf" "adam_v 9 -1e-3"; do
    set -- $f
    edit "val_$1" f32 "$1" "$2" "$3"
    refused "--resume: $1[$2] = $3" "section '$1': element $2" \
        $BIN "${COMMON[@]}" --steps 20 --ckpt-dir "$TMP/e/val_$1" --resume
done
refused "sample: params[17] = nan" "section 'params': element 17" $BIN sample "$TMP/e/val_params/ckpt_00000010.bin" --sample-tokens 4
refused "--init-from: bias[3] = inf" "section 'bias': element 3" \
    $BIN "${COMMON[@]}" --steps 3 --init-from "$TMP/e/val_bias/ckpt_00000010.bin"
edit reserved reserved 40
refused "--resume: non-zero reserved header byte" "reserved header byte 40" \
    $BIN "${COMMON[@]}" --steps 20 --ckpt-dir "$TMP/e/reserved" --resume
edit no_adam drop adam_v
refused "--resume: no adam_v section" "no section 'adam_v'" \
    $BIN "${COMMON[@]}" --steps 20 --ckpt-dir "$TMP/e/no_adam" --resume
# The multiplicative rule multiplies affinities by the bias: a zero bias cannot select.
$BIN "${COMMON[@]}" --gamma-rule mult --steps 4 --ckpt-dir "$TMP/mult" > /dev/null 2>&1 || bad "mult run failed"
mkdir -p "$TMP/e/mult0"
$EDIT "$TMP/mult/ckpt_00000004.bin" "$TMP/e/mult0/ckpt_00000004.bin" f32 bias 2 0 || bad "ckpt_edit mult"
refused "sample: a zero multiplicative bias" "multiplicative" $BIN sample "$TMP/e/mult0/ckpt_00000004.bin" --sample-tokens 4

# ---------------------------------------------------------------- 2. overflow
refused "--print-config: 2e9 layers" "n_layers must be in" $BIN --config tiny --n-layers 2000000000 --print-config
refused "--print-config: a parameter count past 2^40" "parameters, more than" \
    $BIN --config tiny --d-model 65536 --vocab-size 2000000000 --print-config
refused "--print-config: a parameter count past 2^63" "over 9223372036854775807 parameters" \
    $BIN --config tiny --n-layers 1024 --d-model 65536 --n-routed 65536 --d-expert 1048576 --n-shared 0 --print-config
# --sample-tokens INT_MAX: generation starts (no overflow, memory of one
# window); head stops reading after 300 bytes and SIGPIPE ends the program.
out=$($BIN sample "$BASE" --sample-tokens 2147483647 2> "$TMP/big.err" | head -c 300)
if echo "$out" | head -1 | grep -q "^sample (2147483647 tokens" && [ "$(echo "$out" | sed -n 3p | wc -w)" -ge 10 ]; then
    ok "--sample-tokens 2147483647 generates: $(echo "$out" | sed -n 3p | cut -c1-60)..."
else
    bad "--sample-tokens 2147483647: '$out' $(head -2 "$TMP/big.err")"
fi

# ---------------------------------------------------------------- 3. disks that fill
refused "--log /dev/full (writes fail with ENOSPC)" "writing the log /dev/full failed" \
    $BIN "${COMMON[@]}" --steps 5 --log /dev/full --ckpt-dir "$TMP/full"
[ -z "$(ls "$TMP/full" | grep ckpt_)" ] && ok "--log /dev/full: no step trained, no checkpoint written" \
    || bad "--log /dev/full: checkpoints written: $(ls "$TMP/full")"
# A log that fills mid-run: a file size limit (SIGXFSZ ignored, so writes fail
# with EFBIG) of 4 KB lets the header and a few steps through. Open MPI's
# PMIx keeps a growing store in shared-memory files unless told otherwise
# (gds=hash): the limit would stop MPI_Init itself.
export PMIX_MCA_gds=hash
cp -r "$TMP/base" "$TMP/fsz"
before=$(md5sum "$TMP"/fsz/ckpt_* | md5sum)
( trap '' XFSZ; ulimit -f 4; exec $BIN "${COMMON[@]}" --steps 20 --ckpt-dir "$TMP/fsz" --resume \
    --log "$TMP/fsz.jsonl" ) 2>&1 | cat > "$TMP/fsz.out"
rc=${PIPESTATUS[0]}
steps=$(grep -c '"type":"step"' "$TMP/fsz.jsonl")
if [ "$rc" = 1 ] && grep -q "writing the log $TMP/fsz.jsonl failed" "$TMP/fsz.out" \
        && [ "$before" = "$(md5sum "$TMP"/fsz/ckpt_* | md5sum)" ] && [ "$steps" -lt 10 ]; then
    ok "log full after $steps logged steps: exit 1, checkpoints untouched: $(grep -m1 'error' "$TMP/fsz.out" | cut -c1-120)"
else
    bad "log full mid-run: exit $rc, $steps steps logged, checkpoints $(ls "$TMP/fsz"): $(tail -3 "$TMP/fsz.out")"
fi
# A checkpoint write that fails (the file outgrows the size limit): the
# message names the file and holds no stray bytes.
( trap '' XFSZ; ulimit -f 100; exec $BIN "${COMMON[@]}" --steps 3 --ckpt-dir "$TMP/cw" ) > "$TMP/cw.out" 2> "$TMP/cw.err"
rc=$?
if [ $rc = 1 ] && [ ! -e "$TMP/cw/ckpt_00000003.bin" ] && ! grep -q -v "ckpt_00000003.bin.tmp" "$TMP/cw.err" \
        && ! LC_ALL=C grep -q '[^[:print:][:space:]]' "$TMP/cw.err"; then
    ok "failed checkpoint write: exit 1, clean message: $(head -1 "$TMP/cw.err" | cut -c1-150)"
else
    bad "failed checkpoint write: exit $rc: $(cat -v "$TMP/cw.err" | head -3)"
fi

# ---------------------------------------------------------------- 4. moe_ckpt diff
diffrc() { $CKPT diff "$1" "$2" > "$TMP/diff.out" 2>&1; echo $?; }
[ "$(diffrc "$BASE" "$BASE")" = 0 ] && ok "moe_ckpt diff A A: exit 0" || bad "moe_ckpt diff A A: $(cat "$TMP/diff.out")"
r=$(diffrc "$BASE" "$TMP/e/val_params/ckpt_00000010.bin")
[ "$r" = 1 ] && grep -q "^params .*nan.*1 elements NaN" "$TMP/diff.out" \
    && ok "moe_ckpt diff: a NaN parameter differs: $(grep '^params' "$TMP/diff.out")" \
    || bad "moe_ckpt diff with a NaN: exit $r: $(cat "$TMP/diff.out")"
r=$(diffrc "$BASE" "$TMP/e/no_adam/ckpt_00000010.bin")
[ "$r" = 1 ] && grep -q "^adam_v .*only in A" "$TMP/diff.out" && ok "moe_ckpt diff: a missing section differs" \
    || bad "moe_ckpt diff with a missing section: exit $r: $(cat "$TMP/diff.out")"
mkdir -p "$TMP/e/dtype"; $EDIT "$BASE" "$TMP/e/dtype/x.bin" dtype bias 3
r=$(diffrc "$BASE" "$TMP/e/dtype/x.bin")
[ "$r" = 1 ] && grep -q "^bias .*dtype differs (f32 vs i32)" "$TMP/diff.out" && ok "moe_ckpt diff: a dtype change is named" \
    || bad "moe_ckpt diff with a dtype change: exit $r: $(cat "$TMP/diff.out")"
r=$(diffrc "$BASE" "$TMP/e/step_past/ckpt_00000010.bin")
[ "$r" = 1 ] && grep -q "^step .*10 vs 100" "$TMP/diff.out" && ok "moe_ckpt diff: step 10 vs 100" \
    || bad "moe_ckpt diff of the step: exit $r: $(cat "$TMP/diff.out")"
r=$(diffrc "$BASE" "$TMP/nothing.bin")
[ "$r" = 2 ] && ok "moe_ckpt diff with a missing file: exit 2" || bad "moe_ckpt diff with a missing file: exit $r"
refused "moe_ckpt info: invalid model_config" "section 'model_config'" $CKPT info "$TMP/e/cfg_n_heads_0/ckpt_00000010.bin"

# ---------------------------------------------------------------- 5. long lines
long=$(printf '#%01100d' 0)
printf '%s d_model=48\nn_heads=2\n' "$long" > "$TMP/long.cfg"
refused "model file: an 1101-character comment line (its tail is no setting)" "long.cfg:1: line longer than 1023" \
    $BIN --config "$TMP/long.cfg" --print-config
printf 'steps = 5\n%s%s lr = 0.5\n' "$long" "$long" > "$TMP/long.opts"
refused "options file: a 2202-character line" "long.opts:2: line longer than 2047" \
    $BIN --options "$TMP/long.opts" --train-data "$TMP/train_*.bin"

# ---------------------------------------------------------------- 6. one trainer per --ckpt-dir
$BIN "${COMMON[@]}" --steps 1000000 --ckpt-dir "$TMP/lock" --log "$TMP/lock.jsonl" > "$TMP/lock1.out" 2>&1 &
pids+=($!)
for _ in $(seq 300); do grep -q '"type":"step"' "$TMP/lock.jsonl" 2> /dev/null && break; sleep 0.1; done
refused "a second trainer on the same --ckpt-dir" "is in use by another trainer" \
    $BIN "${COMMON[@]}" --steps 3 --ckpt-dir "$TMP/lock"
kill -TERM "${pids[0]}"; wait "${pids[0]}"; rc=$?
[ $rc = 0 ] && ls "$TMP/lock" | grep -q ckpt_ && ok "the first trainer finished undisturbed (SIGTERM, checkpoint written)" \
    || bad "first trainer: exit $rc, $(ls "$TMP/lock")"
$BIN "${COMMON[@]}" --steps 1000000 --ckpt-dir "$TMP/lock" --resume --run-steps 1 > "$TMP/lock3.out" 2>&1 \
    && ok "the lock is released at exit: a later trainer resumes" || bad "lock not released: $(tail -2 "$TMP/lock3.out")"

# ---------------------------------------------------------------- 7. FIFOs and devices
mkfifo "$TMP/fifo.bin"
refused "a FIFO as a checkpoint (sample)" "a FIFO, not a regular file" $BIN sample "$TMP/fifo.bin" --sample-tokens 4
refused "a FIFO as --init-from" "a FIFO, not a regular file" $BIN "${COMMON[@]}" --steps 3 --init-from "$TMP/fifo.bin"
refused "a FIFO as a shard" "a FIFO, not a regular file" $BIN "${COMMON[@]}" --steps 3 --train-data "$TMP/fifo.bin"
refused "a FIFO as the tokenizer" "a FIFO, not a regular file" $BIN "${COMMON[@]}" --steps 3 --tokenizer "$TMP/fifo.bin"
refused "/dev/zero as the tokenizer" "/dev/zero: a character device" $BIN "${COMMON[@]}" --steps 3 --tokenizer /dev/zero
refused "a FIFO as a model file" "a FIFO, not a regular file" $BIN --config "$TMP/fifo.bin" --print-config
refused "a FIFO as an options file" "a FIFO, not a regular file" $BIN --options "$TMP/fifo.bin"
mkdir -p "$TMP/fifodir"; mkfifo "$TMP/fifodir/ckpt_00000010.bin"
refused "a FIFO named like the newest checkpoint (--resume)" "a FIFO, not a regular file" \
    $BIN "${COMMON[@]}" --steps 20 --ckpt-dir "$TMP/fifodir" --resume

# ---------------------------------------------------------------- 8. options, before the first step
nostep() { # WHAT WANT CMD...: refused, and no step was trained
    refused "$@"
    grep -q "^step " "$TMP/out" && bad "$1: refused only after training"
}
touch "$TMP/afile"
nostep "--ckpt-dir that is a file" "not a directory" $BIN "${COMMON[@]}" --steps 3 --ckpt-dir "$TMP/afile"
nostep "--ckpt-dir inside a file" "cannot create checkpoint directory" $BIN "${COMMON[@]}" --steps 3 --ckpt-dir "$TMP/afile/x"
nostep "--grad-clip -1" "--grad-clip must be >= 0" $BIN "${COMMON[@]}" --steps 3 --grad-clip -1
nostep "multistep without --lr-steps" "needs --lr-steps" $BIN "${COMMON[@]}" --steps 3 --lr-schedule multistep
nostep "--prompt without --tokenizer" "--prompt needs --tokenizer" $BIN "${COMMON[@]}" --steps 3 --prompt hello --sample-tokens 3
refused "sample --prompt without --tokenizer" "--prompt needs --tokenizer" $BIN sample "$BASE" --prompt hello
nostep "a shard as --tokenizer" "not a tokenizer file" $BIN "${COMMON[@]}" --steps 3 --tokenizer "$TMP/train_000.bin" --sample-tokens 3
nostep "--resume with -b changed" "section 'loader'" $BIN "${COMMON[@]}" -b 2 --steps 20 --ckpt-dir "$TMP/base" --resume
# --resume where there is no checkpoint yet: the first job of a preemptible run.
for d in "$TMP/empty" "$TMP/missing/deeper"; do
    mkdir -p "$TMP/empty"
    if $BIN "${COMMON[@]}" --steps 3 --ckpt-dir "$d" --resume > "$TMP/fresh.out" 2>&1 \
            && grep -q "note: --resume: no checkpoint in $d yet: starting a new run" "$TMP/fresh.out" \
            && [ -f "$d/ckpt_00000003.bin" ]; then
        ok "--resume on $(basename "$d") directory: fresh start with a note, checkpoint written"
    else bad "--resume on $d: $(tail -3 "$TMP/fresh.out")"; fi
done
# Options changed at resume are listed (a note, not an error).
cp -r "$TMP/base" "$TMP/chg"
if $BIN "${COMMON[@]}" --steps 12 --lr 0.5 --gamma 0.01 --ckpt-dir "$TMP/chg" --resume > "$TMP/chg.out" 2>&1 \
        && grep -q "note: .* option(s) differ from the checkpoint's: steps 20 -> 12; .*gamma 0.001 -> 0.01.*; lr 0.001 -> 0.5" "$TMP/chg.out"; then
    ok "changed options at resume: $(grep -m1 'note:' "$TMP/chg.out" | cut -c1-150)"
else
    bad "changed options at resume not listed: $(grep -m2 -e note -e error "$TMP/chg.out")"
fi

test_end
