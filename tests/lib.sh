# The frame every shell test (tests/test_*.sh) shares. Sourced, not run:
#
#   . "$(dirname "$0")/lib.sh"
#   test_begin NAME [--tmp]   unset variables are errors (set -u); work from the
#                             repository root; no failures yet; with --tmp, TMP
#                             is a fresh directory removed at exit
#   ok WHAT                   prints "ok   NAME: WHAT"
#   bad WHAT                  prints "FAIL NAME: WHAT" and counts a failure
#   test_shards DIR [TRAIN VAL [SEED]]
#                             the synthetic corpus of tests/gen_shards.c in DIR
#   test_end                  prints "NAME: all passed" and exits 0, or
#                             "NAME: N failure(s)" and exits 1
#
# Other scripts read these lines: tests/mutants.sh quotes the FAIL lines of
# the check that caught a mutant, and scripts/gpu_check.sh counts the "ok"
# and FAIL lines of tests/test_gpu_trainer.sh and keeps its summary line.
# A test that cannot go on (its inputs could not be made) says why with bad
# and ends with test_end, so that it exits 1 like any other failure.

test_begin() { # NAME [--tmp]
    set -u
    TEST_NAME=$1
    cd "$(dirname "$0")/.." || exit 1
    fails=0
    if [ "${2:-}" = --tmp ]; then
        TMP=$(mktemp -d) || exit 1
        trap 'rm -rf "$TMP"' EXIT
    fi
}

ok() { echo "ok   $TEST_NAME: $*"; }
bad() { echo "FAIL $TEST_NAME: $*"; fails=$((fails + 1)); }

# A Markov chain over 64 tokens in DIR (created if missing): TRAIN training and
# VAL validation tokens (default 20000 and 4000), from SEED (default 1). The
# tool comes from MOE_BUILD (make test-asan: the sanitizer build), else BUILD,
# else build. A failure ends the test.
test_shards() { # DIR [TRAIN VAL [SEED]]
    local gen=${MOE_BUILD:-${BUILD:-build}}/gen_shards
    mkdir -p "$1" && "$gen" "$1" 64 "${2:-20000}" "${3:-4000}" "${4:-1}" > /dev/null ||
        { bad "$gen $1 ${2:-20000} ${3:-4000} ${4:-1} failed"; test_end; }
}

test_end() {
    if [ "$fails" = 0 ]; then echo "$TEST_NAME: all passed"; exit 0; fi
    echo "$TEST_NAME: $fails failure(s)"
    exit 1
}
