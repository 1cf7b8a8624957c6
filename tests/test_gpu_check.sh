#!/usr/bin/env bash
# scripts/gpu_check.sh in its dry mode (--emu: the CPU emulator's builds,
# tiny sizes), as make test runs it after make emu-build. Three runs:
#  A. versions, build, the FP32 trainer stage with a 3 s limit, memcheck,
#     bench, peers and bench-large, with the emulator's memory limited (EMU_MEM_LIMIT_GB):
#     the stages run, pass, time out or are skipped as their rules say; the
#     bench's series ends at the first micro-batch that does not fit; the
#     versions and the grouped-GEMM probe line are recorded; both report
#     files exist and parse;
#  B. a budget too small for the build (skipped) and a bench whose trainer
#     refuses the emulated GPU (EMU_DEVICE_CC=80, an sm_80 GPU for an sm_90
#     build): reported as failed, with the trainer's message;
#  C. a run stopped by SIGTERM while a stage runs: the report says so.
# And bad usage: an unknown option, an OUTDIR that already holds a report;
# and the peak table's lookup of device names (bench/gpu_peaks.h).
#
#   tests/test_gpu_check.sh PYTHON      (a Python with PyTorch: the Makefile's $(PY_VENV)/bin/python)
. "$(dirname "$0")/lib.sh"
test_begin test_gpu_check --tmp
PY=${1:?usage: tests/test_gpu_check.sh PYTHON}

# One line per stage of a report.json: name, status, time, note, figures (k=v;...), failure lines (joined).
stages() {
    /usr/bin/python3 - "$1" << 'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["format"] == "moe-gpu-check" and r["version"] == 1
for s in r["stages"]:
    figs = ";".join("%s=%s" % kv for kv in s["figures"].items())
    print("\t".join([s["name"], s["status"], str(s["time_s"]), s["note"], figs, " / ".join(s["failure"])]))
EOF
}
field() { awk -F'\t' -v n="$2" -v f="$3" '$1 == n { print $f }' "$1"; }
expect() { # stages-file stage status [note-regex]
    local st note
    st=$(field "$1" "$2" 2)
    note=$(field "$1" "$2" 4)
    if [ "$st" = "$3" ] && { [ -z "${4:-}" ] || grep -qE -- "$4" <<< "$note"; }; then
        ok "$(basename "$(dirname "$1")"): $2 $st${note:+ ($note)}"
    else
        bad "$(basename "$(dirname "$1")"): $2 is '$st' ($note), expected $3${4:+ with a note like /$4/}"
    fi
}

# The peak table (bench/gpu_peaks.h): names as CUDA reports them; whole words
# only, the specific variant first; an unknown GPU gets no figure.
make -s --no-print-directory build/gpu_peak || { bad "make build/gpu_peak failed"; test_end; }
peaks=""
for n in "NVIDIA H100 80GB HBM3=989.40" "NVIDIA H100 PCIe=756.50" "NVIDIA H200=989.40" "NVIDIA H200 NVL=835.50" \
         "NVIDIA A100-SXM4-80GB=312.00" "NVIDIA A10=125.00" "NVIDIA L40S=362.05" "NVIDIA L4=121.00" \
         "NVIDIA GeForce RTX 4090=165.20" "NVIDIA GH200 480GB=989.40" "NVIDIA A10G=none" "NVIDIA H800=none" \
         "CPU emulator (tests/emu), not a GPU=none"; do
    got=$(./build/gpu_peak "${n%=*}" 2> /dev/null | cut -f1)
    [ "${got:-none}" = "${n##*=}" ] || peaks+=" '${n%=*}' gives '${got:-none}', expected ${n##*=};"
done
[ -z "$peaks" ] && ok "gpu_peak: 13 device names give their datasheet peak or none" || bad "gpu_peak:$peaks"

# --- A
# The emulator's memory limit: micro-batch 1 of tiny needs 0.0323 GiB there
# (measured; the 32 MiB cuBLASLt workspace is most of it) and each sequence
# about 0.1 MiB more, so 0.0335 fits a few sizes and not 64.
EMU_MEM_LIMIT_GB=0.0335 bash scripts/gpu_check.sh "$TMP/A" --emu --python "$PY" --budget 900 \
    --stages versions,build,fp32-trainer,memcheck,bench,peers,bench-large --limit fp32-trainer=3 > "$TMP/A.out" 2>&1
rc=$?
if stages "$TMP/A/report.json" > "$TMP/A/stages" 2> "$TMP/A.err"; then
    ok "A: report.json parses ($(wc -l < "$TMP/A/stages") stages)"
else
    bad "A: report.json does not parse:"; cat "$TMP/A.err" "$TMP/A.out"
fi
[ $rc = 1 ] && ok "A: exit status 1 (a stage timed out)" || bad "A: exit status $rc, expected 1"
expect "$TMP/A/stages" versions pass
expect "$TMP/A/stages" build pass
expect "$TMP/A/stages" fp32-unit skipped 'not selected'
expect "$TMP/A/stages" fp32-trainer timeout 'limit of 3 s'
expect "$TMP/A/stages" memcheck skipped 'compute-sanitizer'
expect "$TMP/A/stages" bench pass
expect "$TMP/A/stages" peers pass
expect "$TMP/A/stages" bench-large skipped 'beyond the emulator'
expect "$TMP/A/stages" peers-1b skipped 'not selected'
t=$(field "$TMP/A/stages" fp32-trainer 3)
awk -v t="$t" 'BEGIN { exit !(t >= 2.5 && t < 20) }' && ok "A: the 3 s limit stopped the stage after $t s" ||
    bad "A: the stage with a 3 s limit ran $t s"
/usr/bin/python3 - "$TMP/A/report.json" > "$TMP/A/system" << 'EOF'
import json, sys
for k, v in json.load(open(sys.argv[1]))["system"].items():
    print("%s\t%s" % (k, v))
EOF
if command -v nvcc > /dev/null; then
    grep -qP '^cublas\t\d+\.\d+\.\d+$' "$TMP/A/system" && grep -qP '^nccl\t\d+\.\d+\.\d+$' "$TMP/A/system" &&
        ok "A: loaded library versions recorded: $(grep -P '^(cublas|nccl)\t' "$TMP/A/system" | tr '\t\n' '  ')" ||
        { bad "A: no cuBLAS / NCCL versions in the system record:"; cat "$TMP/A/system"; }
fi
grep -q '^grouped_gemm_BF16	C bf16 via [a-zA-Z-]* *cublasGemm' "$TMP/A/system" &&
    ok "A: the grouped-GEMM probe recorded: $(grep '^grouped_gemm_BF16' "$TMP/A/system" | cut -f2)" ||
    { bad "A: no grouped-GEMM probe line in the system record:"; cat "$TMP/A/system"; }
# The bench: micro-batches doubling from 1, measured, until the first that does not fit, then nothing.
tsv=$TMP/A/bench-tiny/gpu_bench.tsv
if [ -f "$tsv" ] && awk -F'\t' 'NR == 1 { next } { n++ }
        $9 == "ok" { if (oom || $2 != (ok_n ? 2 * prev : 1) || !($4 > 0)) e = 1; prev = $2; ok_n++ }
        $9 ~ /^out of memory/ { if (oom || $2 != 2 * prev) e = 1; oom = 1 }
        $9 != "ok" && $9 !~ /^out of memory/ { e = 1 }
        END { exit e || !oom || ok_n < 1 }' "$tsv"; then
    ok "A: bench: $(awk -F'\t' '$9 == "ok" { n++ } $9 ~ /^out/ { b = $2 } END { print n " sizes measured, out of memory at micro-batch " b }' "$tsv")"
else
    bad "A: bench table (EMU_MEM_LIMIT_GB=0.0335 should fit micro-batch 1 and not 64: did the trainer's allocations change?):"
    cat "$tsv" 2> /dev/null
fi
grep -q 'tiny=.*tokens/s at micro-batch' <<< "$(field "$TMP/A/stages" bench 5)" && ok "A: bench key figure: $(field "$TMP/A/stages" bench 5)" ||
    bad "A: bench key figures: '$(field "$TMP/A/stages" bench 5)'"
f=$(field "$TMP/A/stages" peers 5)
grep -q 'project=[0-9.]* tokens/s' <<< "$f" && grep -q 'peer-eager=[0-9.]* tokens/s.*project/this [0-9.]*' <<< "$f" &&
    ok "A: peers key figures: $f" || bad "A: peers key figures: '$f'"
n=$(grep -cE '^\| [0-9]+ \| [a-z0-9-]+ \| (pass|fail|timeout|skipped) \|' "$TMP/A/report.md")
[ "$n" = "$(wc -l < "$TMP/A/stages")" ] && grep -q '^## fp32-trainer: timeout' "$TMP/A/report.md" &&
    grep -q '^## Throughput' "$TMP/A/report.md" && ok "A: report.md: $n stage rows, the timeout's lines, the bench table" ||
    { bad "A: report.md ($n stage rows):"; cat "$TMP/A/report.md"; }

# --- B
EMU_DEVICE_CC=80 bash scripts/gpu_check.sh "$TMP/B" --emu --python "$PY" --budget 59 --stages build,bench \
    --limit bench=50 > "$TMP/B.out" 2>&1
rc=$?
stages "$TMP/B/report.json" > "$TMP/B/stages" 2> "$TMP/B.err" || { bad "B: report.json does not parse"; cat "$TMP/B.err"; }
[ $rc = 1 ] && ok "B: exit status 1 (a stage failed)" || bad "B: exit status $rc, expected 1"
expect "$TMP/B/stages" build skipped 'budget: [0-9]+ s left, it needs at least 60 s'
expect "$TMP/B/stages" bench fail
grep -q 'built for sm_90 but GPU 0 is sm_80' <<< "$(field "$TMP/B/stages" bench 6)" &&
    ok "B: the failure's lines name the cause: $(field "$TMP/B/stages" bench 6 | cut -c1-150)" ||
    bad "B: failure lines: '$(field "$TMP/B/stages" bench 6)'"

# --- C
bash scripts/gpu_check.sh "$TMP/C" --emu --python "$PY" --stages fp32-dist > "$TMP/C.out" 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q '"status": "running"' "$TMP/C/report.json" 2> /dev/null && break; sleep 0.1; done
sleep 1
kill -TERM $pid
wait $pid
rc=$?
stages "$TMP/C/report.json" > "$TMP/C/stages" 2> "$TMP/C.err" || { bad "C: report.json does not parse"; cat "$TMP/C.err"; }
[ $rc = 143 ] && ok "C: exit status 143 after SIGTERM" || bad "C: exit status $rc after SIGTERM"
expect "$TMP/C/stages" fp32-dist interrupted 'signal'
grep -q '"finished": false' "$TMP/C/report.json" && ok "C: the report says the run did not finish" ||
    bad "C: report.json does not say the run did not finish"

# --- bad usage; an existing report is not touched
bash scripts/gpu_check.sh "$TMP/D" --emu --no-such-option > "$TMP/D.out" 2>&1
rc=$?
[ $rc = 2 ] && grep -q "unknown option '--no-such-option'" "$TMP/D.out" && ok "unknown option: exit 2, named" ||
    { bad "unknown option: exit $rc:"; cat "$TMP/D.out"; }
cp "$TMP/B/report.json" "$TMP/B.json"
bash scripts/gpu_check.sh "$TMP/B" --emu > "$TMP/E.out" 2>&1
rc=$?
[ $rc = 2 ] && grep -q 'already holds a GPU check report' "$TMP/E.out" && cmp -s "$TMP/B.json" "$TMP/B/report.json" &&
    ok "an OUTDIR with a report is refused (exit 2) and left as it was" || { bad "existing OUTDIR: exit $rc:"; cat "$TMP/E.out"; }

test_end
