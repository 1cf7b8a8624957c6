#!/usr/bin/env bash
# scripts/deps.sh: what `make test`, `make run` and CI install on a fresh
# machine. Each case pretends some tools are missing (DEPS_PRETEND_MISSING)
# and checks, without installing anything (--dry-run), that exactly the
# Debian packages or the virtual environment that provide them are asked for,
# and that --no-install refuses with the list.
. "$(dirname "$0")/lib.sh"
test_begin test_deps

# case NAME PRETEND GROUPS EXPECTED_REGEX
case_install() {
    local name=$1 pretend=$2 groups=$3 want=$4 out
    out=$(DEPS_PRETEND_MISSING="$pretend" bash scripts/deps.sh --dry-run $groups 2>&1)
    if grep -Eq -- "$want" <<< "$out"; then ok "$name"; else bad "$name: wanted /$want/ in:"; echo "$out"; fi
}
case_install "mpirun missing -> apt-get install openmpi-bin" "mpirun" "test" \
    'apt-get install .*openmpi-bin'
case_install "mpicc missing -> libopenmpi-dev" "mpicc" "test" 'apt-get install .*libopenmpi-dev'
case_install "g++ missing -> g++" "g++" "test" 'apt-get install .* g\+\+'
case_install "matplotlib missing -> python3-matplotlib" "matplotlib" "test" 'apt-get install .*python3-matplotlib'
case_install "scipy missing -> python3-scipy" "scipy" "test" 'apt-get install .*python3-scipy'
case_install "make missing (build) -> build-essential" "make" "build" 'apt-get install .*build-essential'
case_install "venv missing -> pip install torch transformers" "venv" "venv" \
    'pip install .*torch transformers safetensors'
case_install "bible missing (quickstart) -> bible-kjv" "bible" "quickstart" 'apt-get install .*bible-kjv'

# Nothing pretended missing for groups whose tools exist here: no install at all.
out=$(bash scripts/deps.sh --dry-run build 2>&1)
if grep -q 'everything needed' <<< "$out" && ! grep -q 'apt-get' <<< "$out"; then ok "nothing missing -> nothing installed"
else bad "build group on this machine asked to install:"; echo "$out"; fi

# --no-install refuses, names what is missing, exits 1.
out=$(DEPS_PRETEND_MISSING=mpirun bash scripts/deps.sh --no-install test 2>&1); rc=$?
if [ $rc = 1 ] && grep -q 'openmpi-bin' <<< "$out" && ! grep -q '^+ ' <<< "$out"; then
    ok "--no-install refuses with the list (exit 1)"
else bad "--no-install: rc $rc, output:"; echo "$out"; fi
out=$(DEPS_NO_INSTALL=1 DEPS_PRETEND_MISSING=gcc bash scripts/deps.sh build 2>&1); rc=$?
[ $rc = 1 ] && grep -q 'build-essential' <<< "$out" && ok "DEPS_NO_INSTALL=1 refuses" || { bad "DEPS_NO_INSTALL=1: rc $rc"; echo "$out"; }

# A bad group is an error naming it.
out=$(bash scripts/deps.sh nosuchgroup 2>&1); rc=$?
[ $rc = 2 ] && grep -q "nosuchgroup" <<< "$out" && ok "unknown group rejected (exit 2)" || { bad "unknown group: rc $rc"; echo "$out"; }

test_end
