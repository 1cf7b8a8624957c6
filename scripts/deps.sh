#!/usr/bin/env bash
# What the project needs on a Debian machine, checked and installed when
# missing: `make test`, `make run` (scripts/quickstart.sh) and .ci/run all
# come through here, so a fresh machine needs no manual step.
#
#   scripts/deps.sh [--no-install] [--dry-run] GROUP...
#
# Groups:
#   build       gcc, make (build-essential)       (the CPU programs)
#   test        g++ (the CUDA emulator, tests/emu), Open MPI (mpicc, mpirun:
#               the multi-process tests), Debian's python3 with numpy and
#               matplotlib (scripts/report.py, scripts/replay_plots.py and
#               their tests) and scipy (the hindsight solver's LP check)
#   venv        build/venv: a Python virtual environment with PyTorch,
#               transformers and safetensors from PyPI (the tests that compare
#               with PyTorch or transformers); reused when it works
#   quickstart  bible-kjv (the quickstart's corpus)
#
# Only what is missing is installed (apt-get for Debian packages, pip inside
# build/venv). --no-install (or DEPS_NO_INSTALL=1) never installs: it lists
# what is missing and exits 1. --dry-run prints the install commands instead
# of running them. DEPS_PRETEND_MISSING="name ..." treats those checks
# (gcc make g++ mpicc mpirun numpy matplotlib scipy venv bible) as failing, so that
# the install path can be tested on a machine that has everything.
set -euo pipefail
cd "$(dirname "$0")/.."

NO_INSTALL=${DEPS_NO_INSTALL:-0}
DRY_RUN=0
GROUPS_WANTED=()
for a in "$@"; do
    case $a in
        --no-install) NO_INSTALL=1 ;;
        --dry-run) DRY_RUN=1 ;;
        build|test|venv|quickstart) GROUPS_WANTED+=("$a") ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "deps.sh: unknown argument '$a' (groups: build test venv quickstart)" >&2; exit 2 ;;
    esac
done
[ ${#GROUPS_WANTED[@]} -gt 0 ] || { echo "deps.sh: name at least one group: build test venv quickstart" >&2; exit 2; }

VENV=${DEPS_VENV:-build/venv}
# What the venv holds; versions tested are in the README ("Tests").
VENV_PKGS=(torch transformers safetensors numpy)

pretend() { [[ " ${DEPS_PRETEND_MISSING:-} " == *" $1 "* ]]; }
have_cmd() { ! pretend "$1" && command -v "$1" > /dev/null 2>&1; }
have_py() { ! pretend "$1" && /usr/bin/python3 -c "import $1" > /dev/null 2>&1; }
have_venv() {
    ! pretend venv && [ -x "$VENV/bin/python" ] &&
        "$VENV/bin/python" -c 'import torch, transformers, safetensors, numpy' > /dev/null 2>&1
}

APT=()  # Debian packages to install
NEED_VENV=0
for g in "${GROUPS_WANTED[@]}"; do
    case $g in
        build)
            # build-essential: gcc, g++, make and the C library's headers.
            { have_cmd gcc && have_cmd make; } || APT+=(build-essential)
            ;;
        test)
            { have_cmd gcc && have_cmd make; } || APT+=(build-essential)
            have_cmd g++ || APT+=(g++)
            have_cmd mpicc || APT+=(libopenmpi-dev)
            have_cmd mpirun || APT+=(openmpi-bin)
            have_py numpy || APT+=(python3-numpy)
            have_py matplotlib || APT+=(python3-matplotlib)
            have_py scipy || APT+=(python3-scipy)
            ;;
        venv)
            have_venv || NEED_VENV=1
            have_cmd python3 || APT+=(python3)
            # Debian splits venv support (ensurepip) into its own package.
            { ! pretend venv && /usr/bin/python3 -c 'import ensurepip' > /dev/null 2>&1; } || [ "$NEED_VENV" = 0 ] ||
                APT+=(python3-venv)
            ;;
        quickstart)
            have_cmd bible || APT+=(bible-kjv)
            ;;
    esac
done
# Each package once, in order.
if [ ${#APT[@]} -gt 0 ]; then
    mapfile -t APT < <(printf '%s\n' "${APT[@]}" | awk '!seen[$0]++')
fi

missing=("${APT[@]}")
[ "$NEED_VENV" = 1 ] && missing+=("$VENV (pip: ${VENV_PKGS[*]})")
if [ ${#missing[@]} -eq 0 ]; then
    echo "deps: everything needed for ${GROUPS_WANTED[*]} is present"
    exit 0
fi
echo "deps: missing for ${GROUPS_WANTED[*]}: ${missing[*]}"
if [ "$NO_INSTALL" = 1 ]; then
    echo "deps: not installing (--no-install / NO_INSTALL=1); install them and re-run" >&2
    exit 1
fi

run() {
    echo "+ $*"
    [ "$DRY_RUN" = 1 ] || "$@"
}

if [ ${#APT[@]} -gt 0 ]; then
    command -v apt-get > /dev/null || { echo "deps: no apt-get here: install ${APT[*]} by hand" >&2; exit 1; }
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo > /dev/null || { echo "deps: need root or sudo to install ${APT[*]}" >&2; exit 1; }
        SUDO=(sudo)
    fi
    run "${SUDO[@]}" apt-get update -qq
    run "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${APT[@]}"
fi
if [ "$NEED_VENV" = 1 ]; then
    # About 4 GB and 3-4 minutes: PyPI's torch brings its CUDA libraries along.
    run rm -rf "$VENV"
    run /usr/bin/python3 -m venv "$VENV"
    run "$VENV/bin/pip" install -q --disable-pip-version-check "${VENV_PKGS[@]}"
    [ "$DRY_RUN" = 1 ] || have_venv || { echo "deps: $VENV does not import ${VENV_PKGS[*]} after installing" >&2; exit 1; }
fi
echo "deps: installed"
