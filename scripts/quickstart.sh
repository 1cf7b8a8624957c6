#!/usr/bin/env bash
# Quickstart (what `make run` runs): from a fresh machine to a trained small
# MoE model with auxiliary-loss-free load balancing, in one command.
#
#   1. installs what is missing (scripts/deps.sh: gcc, make, bible-kjv);
#   2. builds the trainer and tools (make);
#   3. writes the corpus: the King James Bible, one document per chapter
#      (or your own text: --text FILE / QUICKSTART_TEXT=FILE);
#   4. trains a 4096-id byte-level BPE tokenizer (moe_tok train);
#   5. writes train/val token shards (moe_prepare);
#   6. trains the `small` preset with ALF-LB: on the GPU (train_moecu) when
#      nvidia-smi works and the GPU trainer builds, else on the CPU (train_moe,
#      about 6-7 minutes on 2 cores), evaluating on the val shards, saving a
#      checkpoint and printing a sample decoded with the tokenizer.
#
# Everything goes under runs/quickstart/. A re-run reuses the corpus, the
# tokenizer and the shards (rebuilt when the text changes) and starts a new
# training run. See docs/prepare.md.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat << 'EOF'
usage: scripts/quickstart.sh [--text FILE] [--doc-sep blank|lines|file] [--steps N] [--cpu] [--no-install] [--prepare-only]
  --text FILE      train on your own text instead of the King James Bible   (QUICKSTART_TEXT)
  --doc-sep MODE   how FILE splits into documents (default blank: paragraphs) (QUICKSTART_DOC_SEP)
  --steps N        training steps (default 400 on the CPU, 1000 on a GPU)    (QUICKSTART_STEPS)
  --threads N      CPU threads (default: all cores)                           (QUICKSTART_THREADS)
  --cpu            train on the CPU even when a GPU is present                (QUICKSTART_DEVICE=cpu)
  --no-install     never call apt-get; fail with a message if something is missing (QUICKSTART_NO_INSTALL=1)
  --prepare-only   stop after writing the tokenizer and the shards (used by scripts/reproduce.sh)
Outputs: runs/quickstart/{corpus,tokenizer.tok,data,ckpt,logs}; with --text: runs/quickstart/custom/{tokenizer.tok,data}.
EOF
}

TEXT=${QUICKSTART_TEXT:-}
DOC_SEP=${QUICKSTART_DOC_SEP:-blank}
STEPS=${QUICKSTART_STEPS:-}
THREADS=${QUICKSTART_THREADS:-0}
DEVICE=${QUICKSTART_DEVICE:-auto}
NO_INSTALL=${QUICKSTART_NO_INSTALL:-0}
PREPARE_ONLY=0
while [ $# -gt 0 ]; do
    case $1 in
        --text) TEXT=${2:?--text needs a file}; shift 2 ;;
        --doc-sep) DOC_SEP=${2:?--doc-sep needs a value}; shift 2 ;;
        --steps) STEPS=${2:?--steps needs a number}; shift 2 ;;
        --threads) THREADS=${2:?--threads needs a number}; shift 2 ;;
        --cpu) DEVICE=cpu; shift ;;
        --no-install) NO_INSTALL=1; shift ;;
        --prepare-only) PREPARE_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "quickstart: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

T0=$(date +%s)
RUN=runs/quickstart
# The King James Bible's tokenizer and shards; your own text's go to custom/.
WORK=$RUN
[ -n "$TEXT" ] && WORK=$RUN/custom
TOK=$WORK/tokenizer.tok
DATA=$WORK/data
VOCAB=4096
say() { printf '\n==> %s\n' "$*"; }
die() { printf 'quickstart: error: %s\n' "$*" >&2; exit 1; }
case $DOC_SEP in blank|lines|file) ;; *) die "--doc-sep must be blank, lines or file, not '$DOC_SEP'" ;; esac
case $DEVICE in auto|cpu|gpu) ;; *) die "QUICKSTART_DEVICE must be auto, cpu or gpu, not '$DEVICE'" ;; esac
[[ $THREADS =~ ^[0-9]+$ ]] || die "--threads must be a number, not '$THREADS'"
[ -z "$STEPS" ] || [[ $STEPS =~ ^[1-9][0-9]*$ ]] || die "--steps must be a positive number, not '$STEPS'"
if [ -n "$TEXT" ]; then
    [ -f "$TEXT" ] && [ -r "$TEXT" ] || die "--text $TEXT: no such readable file"
    [ -s "$TEXT" ] || die "--text $TEXT: the file is empty"
fi
mkdir -p "$RUN" "$DATA"

# ---------------------------------------------------------------- 1. packages
say "1/6 checking the tools"
DEP_GROUPS=(build)
KJV=$RUN/corpus/kjv.txt
if [ -z "$TEXT" ] && [ ! -s "$KJV" ]; then DEP_GROUPS+=(quickstart); fi
# scripts/deps.sh installs only what is missing (gcc, make, and the bible-kjv package for the corpus).
bash scripts/deps.sh $([ "$NO_INSTALL" = 1 ] && echo --no-install) "${DEP_GROUPS[@]}" || die "missing packages (see above)"

# ---------------------------------------------------------------- 2. build
say "2/6 building (make train_moe moe_tok moe_prepare)"
JOBS=$(nproc 2> /dev/null || echo 2)
# The CPU programs only: `make all` also compiles the GPU trainer wherever nvcc exists.
make -j"$JOBS" train_moe moe_tok moe_prepare > "$RUN/build.log" 2>&1 || { tail -30 "$RUN/build.log" >&2; die "make failed (full log: $RUN/build.log)"; }
for b in train_moe moe_tok moe_prepare; do [ -x "./$b" ] || die "make did not produce ./$b (see $RUN/build.log)"; done
TRAIN=./train_moe
USE_GPU=0
if [ "$DEVICE" != cpu ] && command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    if make -j"$JOBS" train_moecu > "$RUN/build_gpu.log" 2>&1 && [ -x ./train_moecu ]; then
        TRAIN=./train_moecu
        USE_GPU=1
        echo "GPU: $(nvidia-smi -L | head -1); using ./train_moecu"
    else
        echo "GPU present, but the GPU trainer did not build (see $RUN/build_gpu.log): training on the CPU"
    fi
elif [ "$DEVICE" = gpu ]; then
    die "QUICKSTART_DEVICE=gpu, but nvidia-smi does not work here"
fi
echo "built: ./train_moe ./moe_tok ./moe_prepare$([ $USE_GPU = 1 ] && echo " ./train_moecu")"

# ---------------------------------------------------------------- 3. corpus
say "3/6 corpus"
if [ -n "$TEXT" ]; then
    CORPUS=$TEXT
    echo "your text: $CORPUS ($(wc -c < "$CORPUS") bytes), documents: --doc-sep $DOC_SEP"
else
    CORPUS=$KJV
    DOC_SEP=blank
    if [ -s "$KJV" ]; then
        echo "reusing $KJV"
    else
        mkdir -p "$RUN/corpus"
        # `bible` prints one verse per line ("Ge1:1 In the beginning ..."); a blank
        # line between chapters makes each of the 1189 chapters a document.
        bible -f "Genesis 1:1-Revelation 22:21" > "$KJV.raw.tmp" || die "the bible command failed"
        [ -s "$KJV.raw.tmp" ] || die "the bible command printed nothing"
        awk '{ split($1, ref, ":"); if (NR > 1 && ref[1] != prev) print ""; prev = ref[1]; print }' \
            "$KJV.raw.tmp" > "$KJV.tmp"
        rm -f "$KJV.raw.tmp"
        mv "$KJV.tmp" "$KJV"
        echo "wrote $KJV"
    fi
    echo "the King James Bible: $(wc -c < "$KJV") bytes, $(grep -c '^$' "$KJV" | awk '{ print $1 + 1 }') chapters (one document each)"
fi

# ---------------------------------------------------------------- 4+5. tokenizer and shards
# What the tokenizer and shards were made from; they are rebuilt when it changes.
STAMP="corpus=$(readlink -f "$CORPUS") bytes=$(wc -c < "$CORPUS") mtime=$(stat -c %Y "$CORPUS") doc-sep=$DOC_SEP vocab=$VOCAB"
if [ -s "$TOK" ] && [ -f "$DATA/stamp" ] && [ "$(cat "$DATA/stamp")" = "$STAMP" ] \
        && ls "$DATA"/train_*.bin > /dev/null 2>&1; then
    say "4/6 tokenizer: reusing $TOK"
    ./moe_tok info "$TOK" | head -1
    say "5/6 shards: reusing $DATA"
    cat "$DATA/prepare.log"
else
    rm -f "$DATA/stamp"
    say "4/6 training the tokenizer (vocab $VOCAB)"
    ./moe_tok train --input "$CORPUS" --vocab-size $VOCAB --output "$TOK" --quiet || die "moe_tok train failed"
    ./moe_tok info "$TOK" | head -1
    say "5/6 writing token shards (moe_prepare)"
    mkdir -p "$DATA"
    ./moe_prepare --tokenizer "$TOK" --out "$DATA" --doc-sep "$DOC_SEP" --val-fraction 0.05 --force "$CORPUS" \
        > "$DATA/prepare.log.tmp" || die "moe_prepare failed"
    mv "$DATA/prepare.log.tmp" "$DATA/prepare.log"
    cat "$DATA/prepare.log"
    echo "$STAMP" > "$DATA/stamp"
fi
V=$(./moe_tok info "$TOK" | sed -n 's/.*vocab size \([0-9]*\),.*/\1/p')
[ -n "$V" ] || die "cannot read the vocabulary size of $TOK"
[ "$V" = "$VOCAB" ] || echo "note: the text was too small for $VOCAB ids; the tokenizer has $V, and the model uses --vocab-size $V"

# Token counts from the shard sizes (64-byte header, 2-byte tokens).
count_tokens() {
    local n=0 f
    for f in "$@"; do [ -f "$f" ] && n=$((n + ($(stat -c %s "$f") - 64) / 2)); done
    echo $n
}
TRAIN_TOKENS=$(count_tokens "$DATA"/train_*.bin)
VAL_TOKENS=$(count_tokens "$DATA"/val_*.bin)

if [ "$PREPARE_ONLY" = 1 ]; then
    echo "prepared: $TOK and $DATA ($TRAIN_TOKENS train / $VAL_TOKENS val tokens)"
    exit 0
fi

# ---------------------------------------------------------------- 6. training
if [ $USE_GPU = 1 ]; then
    B=16; STEPS=${STEPS:-1000}
else
    # The small preset does about 2,400 tokens/s forward+backward on 2 cores at
    # -b 8, seq_len 256 (2,048 tokens a step): 400 steps take about 6 minutes.
    B=8; STEPS=${STEPS:-400}
fi
SEQ=256
[ "$TRAIN_TOKENS" -gt $((B * (SEQ + 1))) ] \
    || die "the training set has $TRAIN_TOKENS tokens, fewer than one batch of $B x $((SEQ + 1)); use a larger text"
VAL_ARGS=()
if [ "$VAL_TOKENS" -gt $((B * (SEQ + 1))) ]; then
    VAL_ARGS=(--val-data "$DATA/val_*.bin" --eval-every 100 --eval-batches 10)
else
    echo "note: the validation set has $VAL_TOKENS tokens, less than one batch: training without evaluation" \
         "(more, smaller documents help: --doc-sep lines)"
fi
WARMUP=20
[ "$STEPS" -gt $((2 * WARMUP)) ] || WARMUP=$((STEPS / 2))
ID=$(date +%Y%m%d-%H%M%S)
CKPT=$RUN/ckpt/$ID
LOG=$RUN/logs/$ID
mkdir -p "$CKPT" "$RUN/logs"
# The checkpoint directory keeps its own copy of the tokenizer, so that it stays
# usable when the tokenizer is rebuilt for another text.
cp "$TOK" "$CKPT/tokenizer.tok"
say "6/6 training the small preset with ALF-LB on the $([ $USE_GPU = 1 ] && echo GPU || echo CPU): $STEPS steps of $B x $SEQ tokens"
echo "train: $TRAIN_TOKENS tokens, val: $VAL_TOKENS tokens; log: $LOG.txt"
echo "each line: loss, learning rate, gamma (the bias update rate), gnorm, maxvio = MaxVio_batch"
echo "(max expert load / mean load - 1, worst MoE layer; ALF-LB drives it down), tokens/s"
PROMPT_ARGS=()
[ -z "$TEXT" ] && PROMPT_ARGS=(--prompt "Ge1:1 In the beginning")
# gamma 0.01 rather than the papers' 0.001: this run is only a few hundred steps
# long, and at 0.001 the biases move too little to balance the experts in that
# time (docs/prepare.md has both runs).
CMD=("$TRAIN" --config small --vocab-size "$V" --balance alf --gamma 0.01
     --train-data "$DATA/train_*.bin" "${VAL_ARGS[@]}" --tokenizer "$TOK"
     -b "$B" --steps "$STEPS" --lr 3e-3 --warmup-steps "$WARMUP" --lr-min 1e-4
     --threads "$THREADS" --print-every 20
     --ckpt-dir "$CKPT" --log "$LOG.jsonl" --sample-tokens 200 "${PROMPT_ARGS[@]}")
echo "${CMD[*]}" > "$LOG.cmd"
"${CMD[@]}" 2>&1 | grep --line-buffered -v '^[|+]' | tee "$LOG.txt" || die "training failed (log: $LOG.txt)"
ln -sfn "$ID" "$RUN/ckpt/latest"

# ---------------------------------------------------------------- summary
CK=$(ls "$CKPT"/ckpt_*.bin 2> /dev/null | tail -1)
[ -n "$CK" ] || die "training wrote no checkpoint in $CKPT"
field() { sed -n "s/.*\"$1\":\([-0-9.e]*\).*/\1/p"; }
STEPLOG=$(grep '"type":"step"' "$LOG.jsonl")
L0=$(head -1 <<< "$STEPLOG" | field loss)
L1=$(tail -1 <<< "$STEPLOG" | field loss)
# MaxVio_batch: first step, the peak (routing first collapses onto a few experts), last step.
MV=$(paste <(field step <<< "$STEPLOG") <(field maxvio_batch <<< "$STEPLOG") \
     | awk 'NR == 1 { f = $2 } $2 > p { p = $2; ps = $1 } { l = $2 } END { printf "%s (step 1), peak %s (step %s), %s (last step)", f, p, ps, l }')
EVALS=$(grep '"type":"eval"' "$LOG.jsonl" || true)
VL="(no validation set)"
if [ -n "$EVALS" ]; then
    VL=$(paste <(field step <<< "$EVALS") <(field val_loss <<< "$EVALS") | awk '{ printf "%s%s (step %s)", (NR > 1 ? ", " : ""), $2, $1 }')
fi
T1=$(date +%s)
cat << EOF

==> done in $(( (T1 - T0) / 60 )) min $(( (T1 - T0) % 60 )) s
  training loss     $L0 (step 1) -> $L1 (step $STEPS)
  MaxVio_batch      $MV
  validation loss   $VL
  corpus            $CORPUS
  tokenizer         $TOK
  shards            $DATA/train_*.bin ($TRAIN_TOKENS tokens)$([ "$VAL_TOKENS" -gt 0 ] && echo ", $DATA/val_*.bin ($VAL_TOKENS tokens)")
  checkpoint        $CK   (with its tokenizer; also $RUN/ckpt/latest)
  logs              $LOG.txt, $LOG.jsonl (python3 scripts/report.py --out $RUN/report $LOG.jsonl)
Sample again:
  ./train_moe sample $CK --tokenizer $CKPT/tokenizer.tok --sample-tokens 200$([ -z "$TEXT" ] && echo ' --prompt "Ps23:1 The LORD"')
Run again (reuses the corpus, tokenizer and shards; a new training run):
  make run      # or: scripts/quickstart.sh --steps 1000
EOF
