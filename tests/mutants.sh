#!/usr/bin/env bash
# The standing check that the tests can fail (make test-mutants; README
# "Tests"). Every mutant of tests/mutants.txt is a plausible bug planted by a
# sed script into one file of a copy of the tree; the copy is rebuilt and the
# mutant's check (a make target, a part of make test) must fail. A mutant
# whose script no longer changes its file, or whose copy no longer builds, is
# an error of the list, not a catch. Each check must pass on the unchanged
# copy first, so that a failure is the mutant's doing. A mutant whose check
# needs a make target this tree lacks (`needs`) is reported as pending.
#
#   tests/mutants.sh [NAME...]       (default: every mutant; JOBS: parallel build jobs;
#                                     MUTANTS_LOG=DIR keeps each check's output as DIR/NAME.log)
#
# The copy holds the tracked and untracked (not ignored) files as they are in
# the working tree, and the build outputs (build/ without its venv, the
# programs), so that a mutant rebuilds only what its file touches. Prints one
# line per mutant and a table: for each, the check and the first lines of its
# output that report a failure. Exit status 0 when every mutant that could
# run was caught and the list has no error.
set -u
cd "$(dirname "$0")/.."
LIST=tests/mutants.txt
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
TIMEOUT=${MUTANT_TIMEOUT:-1800} # seconds per check; a check that hangs counts as caught, and says so
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- the list
names=() files=() seds=() checks=() needs=() abouts=()
add_mutant() {
    [ -n "$name" ] || return 0
    if [ -z "$file" ] || [ -z "$sedscript" ] || [ -z "$check" ] || [ -z "$about" ]; then
        echo "$LIST: mutant '$name' lacks file, sed, check or about" >&2; exit 2
    fi
    [ -f "$file" ] || { echo "$LIST: mutant '$name': no file $file" >&2; exit 2; }
    names+=("$name") files+=("$file") seds+=("$sedscript") checks+=("$check") needs+=("$need") abouts+=("$about")
}
name='' file='' sedscript='' check='' need='' about=''
while IFS= read -r line || [ -n "$line" ]; do
    case $line in
        '#'*) continue ;;
        '') add_mutant; name='' file='' sedscript='' check='' need='' about=''; continue ;;
    esac
    key=${line%%[[:space:]]*}
    val=$(echo "${line#"$key"}" | sed 's/^[[:space:]]*//')
    case $key in
        mutant) name=$val ;; file) file=$val ;; sed) sedscript=$val ;; check) check=$val ;;
        needs) need=$val ;; about) about=$val ;; area) ;;
        *) echo "$LIST: unknown key '$key' in: $line" >&2; exit 2 ;;
    esac
done < "$LIST"
add_mutant

selected=()
if [ $# -gt 0 ]; then
    for want in "$@"; do
        found=0
        for i in "${!names[@]}"; do [ "${names[$i]}" = "$want" ] && { selected+=("$i"); found=1; }; done
        [ $found = 1 ] || { echo "mutants.sh: no mutant named '$want' in $LIST" >&2; exit 2; }
    done
else
    selected=("${!names[@]}")
fi

# ---------------------------------------------------------------- the copy
BASE=$WORK/base
mkdir -p "$BASE"
{ git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
      [ -e "$f" ] && printf '%s\0' "$f"; done; } | tar --null -T - -cf - | tar -xf - -C "$BASE"
for p in build train_moe train_moecu moe_ckpt moe_tok moe_prepare; do
    [ -e "$p" ] && tar --exclude=build/venv -cf - "$p" | tar -xf - -C "$BASE"
done

run_check() { # dir check-words... ; output in $WORK/out
    local dir=$1; shift
    timeout "$TIMEOUT" make -C "$dir" --no-print-directory -j"$JOBS" "$@" > "$WORK/out" 2>&1
}
has_target() { make -C "$BASE" -n "$1" > /dev/null 2>&1; }

# Every check once on the unchanged copy (this also builds what the checks need).
declare -A baseline
for i in "${selected[@]}"; do
    c=${checks[$i]}
    [ -n "${baseline[$c]:-}" ] && continue
    if [ -n "${needs[$i]}" ] && ! has_target "${needs[$i]}"; then continue; fi
    t0=$(date +%s)
    # shellcheck disable=SC2086 # a check is a make target and VAR=VALUE words
    if ! run_check "$BASE" $c; then
        echo "mutants.sh: '$c' fails without any mutant; fix that first:"; tail -30 "$WORK/out"; exit 1
    fi
    baseline[$c]=$(( $(date +%s) - t0 ))
    echo "baseline: make $c passes (${baseline[$c]} s, including its build)"
done

# ---------------------------------------------------------------- the mutants
caught=0 missed=0 pending=0 errors=0
results=()
for i in "${selected[@]}"; do
    n=${names[$i]} f=${files[$i]} c=${checks[$i]}
    if [ -n "${needs[$i]}" ] && ! has_target "${needs[$i]}"; then
        pending=$((pending + 1))
        results+=("$n"$'\t'"$c"$'\t'"pending: this tree has no make ${needs[$i]}")
        echo "pending  $n: needs make ${needs[$i]}, which this tree lacks"
        continue
    fi
    M=$WORK/m
    rm -rf "$M"
    cp -a "$BASE" "$M"
    if ! sed -i -e "${seds[$i]}" "$M/$f" 2> "$WORK/sed.err" || cmp -s "$BASE/$f" "$M/$f"; then
        errors=$((errors + 1))
        results+=("$n"$'\t'"$c"$'\t'"LIST ERROR: the sed script does not change $f $(cat "$WORK/sed.err")")
        echo "ERROR    $n: the sed script does not change $f (the code moved?) $(cat "$WORK/sed.err")"
        continue
    fi
    t0=$(date +%s)
    # shellcheck disable=SC2086
    run_check "$M" $c
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    [ -n "${MUTANTS_LOG:-}" ] && mkdir -p "$MUTANTS_LOG" && cp "$WORK/out" "$MUTANTS_LOG/$n.log"
    # The make target that failed (a test-* target is a test, anything else
    # the build) and the recipe line that failed, e.g. [Makefile:230: test-reference].
    where=$(grep -o '\*\*\* \[[^]]*\]' "$WORK/out" | tail -1 | sed 's/^\*\*\* \[\(.*\)\]$/\1/')
    target=${where##*: }
    cmd=$(echo "$where" | awk -F: 'NF == 3 { print $1, $2 }' | { read -r mk ln && sed -n "${ln}p" "$M/$mk"; } \
          | sed 's/^[[:space:]]*//' | cut -c1-60)
    if [ $rc = 0 ]; then
        missed=$((missed + 1))
        results+=("$n"$'\t'"$c"$'\t'"MISSED: make $c passed with the mutant")
        echo "MISSED   $n: make $c passed (${dt} s)"
    elif [ $rc = 124 ]; then
        caught=$((caught + 1))
        results+=("$n"$'\t'"$c"$'\t'"caught: timed out after $TIMEOUT s")
        echo "caught   $n: make $c timed out after $TIMEOUT s"
    elif [[ $target != test-* ]]; then
        errors=$((errors + 1))
        results+=("$n"$'\t'"$c"$'\t'"LIST ERROR: does not build ($target)")
        echo "ERROR    $n: the mutant does not build:"; grep -m3 -i 'error' "$WORK/out"
    else
        caught=$((caught + 1))
        # What the check printed about it: its failure lines, else error
        # messages, else how the failing command ended (e.g. a crash).
        why=$(grep -E '^FAIL|[ (]FAIL\b|DIFFERS' "$WORK/out" | head -2)
        [ -n "$why" ] || why=$(grep -E 'error|emulator:' "$WORK/out" | grep -v '^make' | head -2)
        [ -n "$why" ] || why=$(grep -o '\*\*\* \[[^]]*\].*' "$WORK/out" | tail -1)
        why=$(echo "$why" | sed 's/^ *//; s/  */ /g' | cut -c1-140 | paste -sd ';' | sed 's/;/; /g')
        results+=("$n"$'\t'"$c"$'\t'"caught by \`$cmd\`: $why")
        echo "caught   $n: make $c failed at \`$cmd\` (${dt} s): $why"
    fi
    rm -rf "$M"
done

echo
echo "mutant | check | result"
echo "---|---|---"
for r in "${results[@]}"; do echo "$r" | sed 's/|/\\|/g; s/\t/ | /g'; done
echo
echo "mutants.sh: $caught caught, $missed missed, $pending pending, $errors list errors (of ${#selected[@]})"
[ $missed = 0 ] && [ $errors = 0 ]
