#!/usr/bin/env bash
# The GPU check: one command for a machine with a GPU and the CUDA toolkit.
# It builds the GPU trainer in both precisions, runs the GPU tests in order
# of value, measures throughput and compares with the PyTorch peers, all
# within a time budget, and writes OUTDIR/report.md and OUTDIR/report.json
# as it goes: a run cut short still leaves both, with every finished stage.
# See docs/gpu.md, "What a GPU session runs".
#
#   scripts/gpu_check.sh OUTDIR [--budget SECONDS] [--stages NAME,...] [--limit NAME=SECONDS]...
#                        [--python PY] [--jobs N] [--emu]
#   make gpu-check [GPU_CHECK_OUT=DIR] [GPU_CHECK_ARGS='--budget 900']
#
# Stages, in this order; "need" is the least time worth starting a stage
# with, "limit" the most it gets (--limit NAME=SECONDS changes it):
#   versions        5   60  GPU, driver, CUDA runtime, cuBLAS, NCCL, nvcc, PyTorch
#   build          60  300  FP32 and BF16 builds side by side (two copies of the sources, parallel make),
#                           then test_grouped_gemm --quick of each (the cuBLAS grouped-GEMM probe's line)
#   bf16-attention 10  120  test_attention --mma (the tensor-core building blocks alone, exact), then
#                           test_attention: the fused attention against the CPU model's, causality; then
#                           test_grouped_gemm: the device grouped GEMM against a host loop and cuBLAS
#   fp32-attention 10  120  the same in the FP32 build
#   fp32-unit       5   60  test_gpu --unit: routing and permutation kernels against the CPU code
#   fp32-fixtures  10  120  test_gpu: every PyTorch fixture, 10 training steps, the backend cases
#   fp32-dist      10  120  test_gpu_dist: the multi-GPU code on one GPU
#   fp32-trainer   10  120  tests/test_gpu_trainer.sh: NCCL path bitwise, 80 steps that must learn
#   bf16-fixtures  10  120  the same three in the BF16 build (the one users train with)
#   bf16-dist      10  120
#   bf16-trainer   10  120
#   memcheck       30  180  make test-gpu-memcheck (BF16): compute-sanitizer on a tiny run and the kernel tests
#   bench          30   90  bench/gpu_bench.sh: small at micro-batches 1, 2, 4, ... until out of memory (BF16)
#   peers          60  150  bench/compare.sh: train_moecu against the PyTorch peers, small
#   bench-large    60  240  bench/gpu_bench.sh: 1b and 3b
#   peers-1b       90  240  bench/compare.sh at 1b
# A stage is skipped, with the reason in the report, when it is not among
# --stages, when what it needs is missing (its build, compute-sanitizer,
# PyTorch), or when less of the budget (default 540 s) is left than it needs. A running
# stage is stopped at its limit or at the end of the budget, whichever comes
# first (status "timeout"). The grouped-GEMM probe line of each build (from
# the build stage's test_grouped_gemm --quick) is recorded with the versions. Exit status: 0 when no stage failed or timed
# out, 1 otherwise, 2 for bad usage.
#
# --emu: the dry mode, for a machine without a GPU (make test runs it): the
# same stages with the CPU emulator's builds (build/emu/FP32 and
# build/emu/BF16, tests/emu) and tiny sizes: the bench on `tiny`, the peers
# stage with the eager peer on the CPU; memcheck, bench-large and peers-1b
# are skipped.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)

usage() { sed -n '2,44p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

STAGES=(
    "versions|5|60|GPU, driver, CUDA runtime, cuBLAS, NCCL, nvcc and PyTorch versions"
    "build|60|300|FP32 and BF16 builds of train_moecu and the GPU tests, side by side"
    "bf16-attention|10|120|test_attention --mma, test_attention, test_grouped_gemm (BF16): tensor-core fragments, fused attention, grouped GEMM"
    "fp32-attention|10|120|test_attention --mma, test_attention, test_grouped_gemm (FP32)"
    "fp32-unit|5|60|test_gpu --unit (FP32): routing and permutation kernels against the CPU code"
    "fp32-fixtures|10|120|test_gpu (FP32): PyTorch fixtures, 10 training steps, backend cases"
    "fp32-dist|10|120|test_gpu_dist (FP32): the multi-GPU code on one GPU"
    "fp32-trainer|10|120|train_moecu (FP32): NCCL path bitwise, learns the synthetic chain"
    "bf16-fixtures|10|120|test_gpu (BF16)"
    "bf16-dist|10|120|test_gpu_dist (BF16)"
    "bf16-trainer|10|120|train_moecu (BF16): NCCL path bitwise, learns the synthetic chain"
    "memcheck|30|180|compute-sanitizer memcheck of a tiny run and the kernel tests (BF16)"
    "bench|30|90|throughput of small: micro-batches 1, 2, 4, ... until out of memory (bench/gpu_bench.sh)"
    "peers|60|150|train_moecu against the PyTorch peers, small (bench/compare.sh)"
    "bench-large|60|240|throughput of 1b and 3b (bench/gpu_bench.sh)"
    "peers-1b|90|240|train_moecu against the PyTorch peers, 1b (bench/compare.sh)"
)

# ----------------------------------------------------------------------------
# Command line

CMDLINE="scripts/gpu_check.sh $*"
OUT=""
BUDGET=540
SELECTED=""
PY=${PYTHON:-python3}
JOBS=$(nproc 2> /dev/null || echo 2)
MODE=gpu
declare -A LIMIT_OVERRIDE=()
while [ $# -gt 0 ]; do
    case $1 in
        --budget) BUDGET=${2:-}; shift 2 ;;
        --stages) SELECTED=${2:-}; shift 2 ;;
        --limit) [[ ${2:-} =~ ^([a-z0-9-]+)=([0-9]+)$ ]] || die "--limit wants NAME=SECONDS, not '${2:-}'"
                 LIMIT_OVERRIDE[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}; shift 2 ;;
        --python) PY=${2:-}; shift 2 ;;
        --jobs) JOBS=${2:-}; shift 2 ;;
        --emu) MODE=emu; shift ;;
        -h|--help) usage 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) [ -z "$OUT" ] || die "one OUTDIR only (got '$OUT' and '$1')"; OUT=$1; shift ;;
    esac
done
[ -n "$OUT" ] || die "name an output directory: scripts/gpu_check.sh OUTDIR (see --help)"
[[ $BUDGET =~ ^[0-9]+$ ]] && [ "$BUDGET" -gt 0 ] || die "--budget must be a positive number of seconds"
[[ $JOBS =~ ^[0-9]+$ ]] && [ "$JOBS" -gt 0 ] || die "--jobs must be a positive number"
NAMES=$(for s in "${STAGES[@]}"; do echo "${s%%|*}"; done)
for n in ${SELECTED//,/ } "${!LIMIT_OVERRIDE[@]}"; do
    grep -qx -- "$n" <<< "$NAMES" || die "unknown stage '$n' (stages: $(echo $NAMES | tr ' ' ,))"
done
if [ "$MODE" = gpu ]; then
    command -v nvcc > /dev/null || die "no nvcc on PATH: this check needs the CUDA toolkit (--emu runs it on the CPU emulator)"
    nvidia-smi -L 2> /dev/null | grep -q '^GPU' || die "no GPU found (nvidia-smi -L lists none; --emu runs the CPU emulator)"
fi
[ -e "$OUT/report.json" ] && die "$OUT already holds a GPU check report: choose a new directory"
mkdir -p "$OUT/logs" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)

# ----------------------------------------------------------------------------
# Where each build's programs are. GPU: two copies of the sources under
# OUT/src (the trainer is linked to ./train_moecu, so one tree holds one
# precision). Emulator: the repository's build/emu/<precision>.

workdir() { if [ "$MODE" = gpu ]; then echo "$OUT/src/$1"; else echo "$ROOT"; fi; }
trainer() { if [ "$MODE" = gpu ]; then echo "$OUT/src/$1/train_moecu"; else echo "$ROOT/build/emu/$1/train_moecu"; fi; }
testbin() { if [ "$MODE" = gpu ]; then echo "$OUT/src/$1/build/gpu/$2"; else echo "$ROOT/build/emu/$1/$2"; fi; }
# The make variables every make in a GPU copy gets (a change would rebuild it).
make_vars() { echo "PRECISION=$1 GPU_ARCH=$(cat "$OUT/gpu_arch" 2> /dev/null || echo sm_90)"; }
export ROOT OUT MODE JOBS PY
export -f workdir trainer testbin make_vars

# ----------------------------------------------------------------------------
# The stages. Each runs in its own process (bash -c) under `timeout`, with its
# output in logs/NN-NAME.log; it may write "key<tab>value" lines to $FIG, the
# key figures of the report. Its exit status is its verdict.

fig() { printf '%s\t%s\n' "$1" "$2" >> "$FIG"; }

# Counts of a test program's verdict lines ("ok", FAIL, WARN) and its summary line.
test_figures() {
    fig checks_ok "$(grep -cE '(^ok |[) ] ok$| ok \()' "$1")"
    fig checks_failed "$(grep -c 'FAIL' "$1")"
    fig warnings "$(grep -c 'WARN' "$1")"
    local s
    s=$(grep -E '(PASS|FAIL) \(|all passed|failure\(s\)' "$1" | tail -1)
    [ -n "$s" ] && fig summary "$s"
    return 0
}

stage_versions() {
    if [ "$MODE" = emu ]; then fig gpu "CPU emulator (tests/emu): --emu"; fi
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv,noheader |
            while IFS=, read -r i name drv mem cc; do
                fig "gpu$i" "$(echo $name) ($(echo $mem), compute capability$cc)"
                fig driver "$(echo $drv)"
            done
    fi
    if command -v nvcc > /dev/null; then
        nvcc --version
        fig nvcc "$(nvcc --version | sed -n 's/.*release \([0-9.]*\), V\([0-9.]*\).*/\2/p')"
        # The libraries loaded at run time, not the headers: a small program asks them.
        if make -C "$ROOT" build/gpu/gpu_versions; then
            "$ROOT/build/gpu/gpu_versions" | tee "$OUT/versions.tsv"
            while IFS=$'\t' read -r k v; do fig "$k" "$v"; done < "$OUT/versions.tsv"
        else
            fig libraries "bench/gpu_versions.cu did not build (see the log)"
        fi
    else
        fig nvcc "not found"
    fi
    local t
    t=$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())' 2>&1 | tail -1)
    fig torch "$PY: $t"
    fig host "$(uname -srm), $(nproc) CPU threads"
    return 0
}

stage_build() {
    cd "$ROOT" || return 1
    if [ "$MODE" = emu ]; then
        make -j"$JOBS" emu-build train_moe moe_ckpt build/gen_shards build/gpu_peak &&
            make -j"$JOBS" EMU_PRECISION=BF16 emu-build || return 1
        fig builds "$ROOT/build/emu/FP32, $ROOT/build/emu/BF16"
        build_probe
        return
    fi
    # The architecture of the GPU here, unless GPU_ARCH says otherwise.
    local arch cc
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
    arch=${GPU_ARCH:-sm_$cc}
    echo "$arch" > "$OUT/gpu_arch"
    fig GPU_ARCH "$arch"
    # The sources: what git tracks plus untracked files it does not ignore, or
    # (no git) the tree without build outputs.
    local list=$OUT/src/files.txt p
    mkdir -p "$OUT/src"
    if git -C "$ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
        git -C "$ROOT" ls-files -co --exclude-standard > "$list"
    else
        (cd "$ROOT" && find . \( -path ./build -o -path ./runs -o -path ./out -o -path ./.git -o -name __pycache__ \) -prune \
             -o -type f ! -name '*.o' ! -path ./train_moe ! -path ./train_moecu ! -path ./moe_ckpt ! -path ./moe_tok \
             ! -path ./moe_prepare -print | sed 's|^\./||') > "$list"
    fi
    # OUTDIR itself may lie inside the tree.
    { grep -v "^${OUT#"$ROOT"/}/" "$list" || true; } > "$list.tmp" && mv "$list.tmp" "$list"
    for p in FP32 BF16; do
        mkdir -p "$OUT/src/$p" && tar -C "$ROOT" -cf - -T "$list" | tar -C "$OUT/src/$p" -xf - || return 1
    done
    # Both precisions at once, each with half the cores; each line says whose it is.
    local half=$(((JOBS + 1) / 2)) pids=() rc=0
    for p in FP32 BF16; do
        # shellcheck disable=SC2046
        (make -C "$OUT/src/$p" -j"$half" $(make_vars $p) gpu-build moe_ckpt build/gen_shards build/gpu_peak 2>&1;
         echo "exit status $?") | sed -u "s/^/[$p] /" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    for p in FP32 BF16; do
        [ -x "$(trainer $p)" ] && [ -x "$(testbin $p test_gpu)" ] && [ -x "$(testbin $p test_gpu_dist)" ] &&
            [ -x "$(testbin $p test_attention)" ] && [ -x "$(testbin $p test_grouped_gemm)" ] || {
            echo "the $p build is incomplete"; rc=1; }
    done
    [ $rc = 0 ] && build_probe
}

# The cuBLAS grouped-GEMM probe line of each build, for the system record:
# the trainer takes the device path by default and probes nothing, and
# test_grouped_gemm --quick runs both paths (seconds).
build_probe() {
    local p out rc=0
    for p in FP32 BF16; do
        if out=$(cd "$(workdir "$p")" && "$(testbin "$p" test_grouped_gemm)" --quick 2>&1); then
            grep -m1 '^expert GEMMs: C ' <<< "$out"
            echo "[$p] $(tail -1 <<< "$out")"
        else
            grep -v '^ok' <<< "$out" | tail -20 | sed "s/^/[$p] /"; echo "[$p] test_grouped_gemm --quick failed"; rc=1
        fi
    done
    return $rc
}

stage_tests() { # PRECISION attention|unit|fixtures|dist|trainer
    local p=$1 what=$2 rc
    cd "$(workdir "$p")" || return 1
    case $what in
        # The building blocks first (docs/gpu.md, step 0): a fragment layout
        # misread alike in the kernels and the emulator fails only there. On
        # the emulator both leave out the T = 2048 case (--quick; make test-emu runs it).
        attention) "$(testbin "$p" test_attention)" --mma &&
                   "$(testbin "$p" test_attention)" $([ "$MODE" = emu ] && echo --quick) &&
                   "$(testbin "$p" test_grouped_gemm)" $([ "$MODE" = emu ] && echo --quick) ;;
        unit) "$(testbin "$p" test_gpu)" --unit ;;
        fixtures) "$(testbin "$p" test_gpu)" tests/fixtures ;;
        dist) "$(testbin "$p" test_gpu_dist)" ;;
        trainer) BUILD=build bash tests/test_gpu_trainer.sh "$(trainer "$p")" ;;
    esac
    rc=$?
    test_figures "$LOG"
    return $rc
}
stage_bf16-attention() { stage_tests BF16 attention; }
stage_fp32-attention() { stage_tests FP32 attention; }
stage_fp32-unit() { stage_tests FP32 unit; }
stage_fp32-fixtures() { stage_tests FP32 fixtures; }
stage_fp32-dist() { stage_tests FP32 dist; }
stage_fp32-trainer() { stage_tests FP32 trainer; }
stage_bf16-fixtures() { stage_tests BF16 fixtures; }
stage_bf16-dist() { stage_tests BF16 dist; }
stage_bf16-trainer() { stage_tests BF16 trainer; }

sanitizer() { command -v compute-sanitizer || ls "$(dirname "$(command -v nvcc 2> /dev/null)")/compute-sanitizer" 2> /dev/null; }
stage_memcheck() {
    local rc
    # shellcheck disable=SC2046
    make -C "$(workdir BF16)" $(make_vars BF16) COMPUTE_SANITIZER="$(sanitizer)" test-gpu-memcheck
    rc=$?
    fig memcheck_errors "$(sed -n 's/.*ERROR SUMMARY: \([0-9]*\) error.*/\1/p' "$LOG" | awk '{ s += $1 } END { print s + 0 }')"
    return $rc
}

stage_gpu_bench() { # presets [options]
    local rc out=$OUT/bench-${1//,/-}
    if [ "$MODE" = emu ]; then
        bash "$ROOT/bench/gpu_bench.sh" --trainer "$(trainer BF16)" --presets "$1" --max-batch 64 --steps 4 \
            --budget $((LIMIT - 5)) --out "$out"
    else
        bash "$(workdir BF16)/bench/gpu_bench.sh" --trainer "$(trainer BF16)" --presets "$1" \
            --budget $((LIMIT - 15)) --out "$out"
    fi
    rc=$?
    # Per preset: the best throughput and its MFU; where the series ended.
    [ -f "$out/gpu_bench.tsv" ] && awk -F'\t' 'NR > 1 && $9 == "ok" && $4 + 0 > best[$1] + 0 {
            best[$1] = $4; at[$1] = $2; mfu[$1] = $6 }
        NR > 1 && $9 != "ok" { end[$1] = "micro-batch " $2 ": " $9 }
        END { for (p in best) printf "%s\t%s tokens/s at micro-batch %s, MFU %s%s\n", p, best[p], at[p], mfu[p],
                  (p in end) ? "; " end[p] : ""; for (p in end) if (!(p in best)) printf "%s\t%s\n", p, end[p] }' \
        "$out/gpu_bench.tsv" >> "$FIG"
    return $rc
}
stage_bench() { if [ "$MODE" = emu ]; then stage_gpu_bench tiny; else stage_gpu_bench small; fi; }
stage_bench-large() { stage_gpu_bench 1b,3b; }

stage_compare() { # preset micro-batch steps reps outdir
    local rc
    if [ "$MODE" = emu ]; then
        # One thread: on a shared CPU, OpenMP threads that wait on each other slow the peer tenfold.
        bash "$ROOT/bench/compare.sh" --trainer "$(trainer BF16)" --device cpu --python "$PY" --preset "$1" \
            -b "$2" --steps "$3" --reps "$4" --modes eager --threads 1 --budget $((LIMIT - 5)) --out "$OUT/$5"
    else
        bash "$(workdir BF16)/bench/compare.sh" --trainer "$(trainer BF16)" --device cuda --python "$PY" \
            --preset "$1" -b "$2" --steps "$3" --reps "$4" --budget $((LIMIT - 20)) --out "$OUT/$5"
    fi
    rc=$?
    [ -f "$OUT/$5/compare.md" ] && awk -F'|' '/^\| (project|peer)/ { for (i = 2; i <= 6; i++) gsub(/^ +| +$/, "", $i);
        printf "%s\t%s tokens/s (median of %s runs, min %s), project/this %s\n", $2, $4, $3, $5, $6 }' \
        "$OUT/$5/compare.md" >> "$FIG"
    return $rc
}
stage_peers() { if [ "$MODE" = emu ]; then stage_compare tiny 4 5 1 peers; else stage_compare small 16 12 3 peers; fi; }
stage_peers-1b() { stage_compare 1b 4 8 2 peers-1b; }

export -f fig test_figures sanitizer stage_versions stage_build build_probe stage_tests stage_bf16-attention stage_fp32-attention \
    stage_fp32-unit stage_fp32-fixtures stage_fp32-dist stage_fp32-trainer stage_bf16-fixtures stage_bf16-dist \
    stage_bf16-trainer stage_memcheck stage_gpu_bench stage_bench stage_bench-large stage_compare stage_peers stage_peers-1b

# Why a stage cannot run here, if it cannot (empty: it can).
skip_reason() {
    local p=""
    case $1 in
        fp32-*) p=FP32 ;;
        bf16-*|memcheck|bench*|peers*) p=BF16 ;;
    esac
    if [ -n "$p" ] && ! { [ -x "$(trainer $p)" ] && [ -x "$(testbin $p test_gpu)" ]; }; then
        echo "no $p build (see the build stage)"
        return
    fi
    case $1 in
        memcheck)
            if [ "$MODE" = emu ]; then
                echo "no compute-sanitizer on the emulator; its own memory checks (guard pages, poisoned memory, host access to device memory) ran in the test stages"
            elif [ -z "$(sanitizer)" ]; then echo "compute-sanitizer not found (PATH, nvcc's directory)"; fi ;;
        peers|peers-1b)
            if ! "$PY" -c 'import torch' > /dev/null 2>&1; then echo "no PyTorch in $PY (--python)"
            elif [ "$1" = peers-1b ] && [ "$MODE" = emu ]; then echo "1b is beyond the emulator"; fi ;;
        bench-large)
            [ "$MODE" = emu ] && echo "1b and 3b are beyond the emulator" ;;
    esac
}

# ----------------------------------------------------------------------------
# The report: report.json and report.md, rewritten whole (through a temporary
# file and a rename) at every stage start and end.

NOW() { date -u +%Y-%m-%dT%H:%M:%SZ; }
STARTED=$(NOW)
# Times in microseconds (bash's EPOCHREALTIME), printed as seconds with one decimal.
now_us() { echo $((10#${EPOCHREALTIME/[.,]/})); }
secs() { printf '%d.%d' $(($1 / 1000000)) $(($1 % 1000000 / 100000)); }
T0=$(now_us)
declare -a S_STATUS S_TIME S_LIMIT S_NOTE
FINISHED=false

# JSON output without a process per string (the report is rewritten often):
# a string with its escapes and without control characters; a number as it is.
json_str() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/\\t}
    s=${s//$'\n'/\\n}
    s=${s//[$'\001'-$'\037']/}
    printf '"%s"' "$s"
}
json_val() { if [[ $1 =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; then printf '%s' "$1"; else json_str "$1"; fi; }
json_object_of_tsv() { # file -> {"k": v, ...}
    local sep="" k v
    printf '{'
    if [ -f "$1" ]; then
        while IFS=$'\t' read -r k v; do
            [ -n "$k" ] || continue
            printf '%s' "$sep"; json_str "$k"; printf ': '; json_val "$v"
            sep=", "
        done < "$1"
    fi
    printf '}'
}

# The lines of a failed stage that say why: from the first line that looks
# like a failure (10 lines), then the last 8 lines of its log; invalid UTF-8
# removed.
failure_lines() { # log
    local n
    n=$(grep -nE 'FAIL|[Ee]rror|ERROR|Abort|Segmentation|Killed|No such file|larger than the file' "$1" | head -1 | cut -d: -f1)
    { [ -n "$n" ] && sed -n "${n},$((n + 9))p" "$1"; echo "..."; tail -n 8 "$1"; } | cut -c1-300 |
        if command -v iconv > /dev/null; then iconv -f utf-8 -t utf-8 -c 2> /dev/null; else cat; fi
}

stage_log() { printf 'logs/%02d-%s.log' $(($1 + 1)) "$2"; }
stage_fig() { printf '%s/logs/%02d-%s.fig' "$OUT" $(($1 + 1)) "$2"; }
is_failed() { [ "$1" = fail ] || [ "$1" = timeout ] || [ "$1" = interrupted ]; }

write_report() {
    local i name need limit desc line sep k v figs
    # The system: the versions stage's figures and the grouped-GEMM probe lines.
    cat "$(stage_fig 0 versions)" "$OUT/grouped_gemm.tsv" > "$OUT/system.tsv" 2> /dev/null
    {
        printf '{"format": "moe-gpu-check", "version": 1, "mode": "%s", "command": ' \
            "$([ "$MODE" = gpu ] && echo gpu || echo emulator)"
        json_str "$CMDLINE"
        printf ',\n "started": "%s", "updated": "%s", "finished": %s, "budget_s": %s, "elapsed_s": %s,\n "system": ' \
            "$STARTED" "$(NOW)" "$FINISHED" "$BUDGET" "$(secs $(($(now_us) - T0)))"
        json_object_of_tsv "$OUT/system.tsv"
        printf ',\n "stages": [\n'
        for i in "${!STAGES[@]}"; do
            IFS='|' read -r name need limit desc <<< "${STAGES[$i]}"
            [ "$i" = 0 ] || printf ',\n'
            printf '  {"name": "%s", "description": ' "$name"; json_str "$desc"
            printf ', "status": "%s", "time_s": %s, "limit_s": %s, "note": ' "${S_STATUS[$i]:-pending}" \
                "${S_TIME[$i]:-0}" "${S_LIMIT[$i]:-0}"
            json_str "${S_NOTE[$i]:-}"
            printf ',\n   "log": "%s", "figures": ' "$(stage_log "$i" "$name")"
            json_object_of_tsv "$(stage_fig "$i" "$name")"
            printf ', "failure": ['
            sep=""
            if is_failed "${S_STATUS[$i]:-}"; then
                while IFS= read -r line; do printf '%s' "$sep"; json_str "$line"; sep=", "; done \
                    < <(failure_lines "$OUT/$(stage_log "$i" "$name")")
            fi
            printf ']}'
        done
        printf '\n]}\n'
    } > "$OUT/report.json.tmp"
    mv "$OUT/report.json.tmp" "$OUT/report.json"
    {
        echo "# GPU check"
        echo
        echo "\`$CMDLINE\` ($([ "$MODE" = gpu ] && echo "on a GPU" || echo "dry mode: the CPU emulator, not a GPU")):"
        echo "started $STARTED, $(secs $(($(now_us) - T0))) s of the $BUDGET s budget used, $([ $FINISHED = true ] &&
            echo finished || echo "not finished (as of $(NOW))")."
        echo
        echo "| system | |"
        echo "|---|---|"
        while IFS=$'\t' read -r k v; do echo "| $k | ${v//|//} |"; done < "$OUT/system.tsv"
        echo
        echo "| # | stage | status | time (s) | limit (s) | key figures | note |"
        echo "|---|---|---|---|---|---|---|"
        for i in "${!STAGES[@]}"; do
            IFS='|' read -r name need limit desc <<< "${STAGES[$i]}"
            figs=""
            if [ "$name" = versions ]; then figs="the system table"
            elif [ -f "$(stage_fig "$i" "$name")" ]; then
                while IFS=$'\t' read -r k v; do figs+="${figs:+; }$k: $v"; done < "$(stage_fig "$i" "$name")"
            fi
            line=${S_NOTE[$i]:-}
            echo "| $((i + 1)) | $name | ${S_STATUS[$i]:-pending} | ${S_TIME[$i]:-} | ${S_LIMIT[$i]:-} | ${figs//|//} | ${line//|//} |"
        done
        for i in "${!STAGES[@]}"; do
            IFS='|' read -r name need limit desc <<< "${STAGES[$i]}"
            if is_failed "${S_STATUS[$i]:-}"; then
                printf '\n## %s: %s (%s)\n\n```\n' "$name" "${S_STATUS[$i]}" "$(stage_log "$i" "$name")"
                failure_lines "$OUT/$(stage_log "$i" "$name")"
                printf '```\n'
            fi
        done
        for d in "$OUT"/bench-*/; do
            if [ -f "$d/gpu_bench.md" ]; then printf '\n## Throughput (bench/gpu_bench.sh)\n\n'; cat "$d/gpu_bench.md"; fi
        done
        for d in peers peers-1b; do
            if [ -f "$OUT/$d/compare.md" ]; then printf '\n## PyTorch peers (%s, bench/compare.sh)\n\n' "$d"; cat "$OUT/$d/compare.md"; fi
        done
    } > "$OUT/report.md.tmp"
    mv "$OUT/report.md.tmp" "$OUT/report.md"
}

# ----------------------------------------------------------------------------
# Running the stages

CURRENT=-1
STAGE_PID=""
on_signal() {
    if [ "$CURRENT" -ge 0 ]; then
        S_STATUS[$CURRENT]=interrupted
        S_NOTE[$CURRENT]="gpu_check.sh was stopped by a signal"
        [ -n "$STAGE_PID" ] && kill -TERM "$STAGE_PID" 2> /dev/null && wait "$STAGE_PID" 2> /dev/null
        S_TIME[$CURRENT]=$(secs $(($(now_us) - STAGE_T0)))
    fi
    write_report
    echo "gpu_check.sh: stopped by a signal; the report so far: $OUT/report.md" >&2
    exit 143
}
trap on_signal INT TERM

echo "gpu_check.sh: $([ "$MODE" = gpu ] && echo GPU || echo "dry mode (CPU emulator)"), budget $BUDGET s, report in $OUT/report.md"
bad=0
for i in "${!STAGES[@]}"; do
    IFS='|' read -r name need limit desc <<< "${STAGES[$i]}"
    limit=${LIMIT_OVERRIDE[$name]:-$limit}
    [ "$need" -le "$limit" ] || need=$limit
    left=$((BUDGET - ($(now_us) - T0) / 1000000))
    reason=""
    if [ -n "$SELECTED" ] && ! grep -qx -- "$name" <<< "${SELECTED//,/$'\n'}"; then reason="not selected (--stages)"
    else reason=$(skip_reason "$name")
        [ -z "$reason" ] && [ "$left" -lt "$need" ] && reason="budget: $left s left, it needs at least $need s"
    fi
    if [ -n "$reason" ]; then
        S_STATUS[$i]=skipped
        S_NOTE[$i]=$reason
        printf '%-14s skipped: %s\n' "$name" "$reason"
        write_report
        continue
    fi
    [ "$limit" -le "$left" ] || limit=$left
    S_STATUS[$i]=running
    S_LIMIT[$i]=$limit
    CURRENT=$i
    write_report
    LOG=$OUT/$(stage_log "$i" "$name")
    FIG=$(stage_fig "$i" "$name")
    STAGE_T0=$(now_us)
    # Line-buffered output (stdbuf), so that the log keeps the order of events.
    LOG=$LOG FIG=$FIG LIMIT=$limit timeout --kill-after=10 "$limit" stdbuf -oL -eL bash -c "stage_$name" > "$LOG" 2>&1 &
    STAGE_PID=$!
    wait "$STAGE_PID"
    rc=$?
    STAGE_PID=""
    S_TIME[$i]=$(secs $(($(now_us) - STAGE_T0)))
    case $rc in
        0) S_STATUS[$i]=pass ;;
        124|137) S_STATUS[$i]=timeout; S_NOTE[$i]="stopped after its limit of $limit s"; bad=1 ;;
        *) S_STATUS[$i]=fail; S_NOTE[$i]="exit status $rc"; bad=1 ;;
    esac
    # The grouped-GEMM probe's verdict, once per build, with the system facts.
    for p in FP32 BF16; do
        if ! grep -q "^grouped_gemm_$p" "$OUT/grouped_gemm.tsv" 2> /dev/null; then
            line=$(grep -m1 "expert GEMMs: C $([ $p = FP32 ] && echo fp32 || echo bf16) via" "$LOG")
            [ -n "$line" ] && printf 'grouped_gemm_%s\t%s\n' "$p" "${line#expert GEMMs: }" >> "$OUT/grouped_gemm.tsv"
        fi
    done
    grep -h 'note: cublasGemmGroupedBatchedEx' "$LOG" | sort -u | while read -r line; do
        grep -qF "$line" "$OUT/grouped_gemm.tsv" 2> /dev/null || printf 'grouped_gemm_note\t%s\n' "$line" >> "$OUT/grouped_gemm.tsv"
    done
    CURRENT=-1
    printf '%-14s %s in %s s%s\n' "$name" "${S_STATUS[$i]}" "${S_TIME[$i]}" "${S_NOTE[$i]:+ (${S_NOTE[$i]})}"
    write_report
done
FINISHED=true
write_report
echo "gpu_check.sh: report in $OUT/report.md and $OUT/report.json"
exit $bad
