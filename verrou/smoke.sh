#!/usr/bin/env bash
# Smoke test of a Valgrind+Verrou install: `nearest` gives the same float sums run after run,
# `random` changes them. Uses the options nanprobe passes (see README.md next to this file).
#   verrou/smoke.sh                      # valgrind from $NANPROBE_VALGRIND, else PATH
#   VALGRIND=/opt/verrou/bin/valgrind PYTHON=python3 verrou/smoke.sh
# Three runs of Python + torch under Verrou: a few minutes.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
valgrind=${VALGRIND:-${NANPROBE_VALGRIND:-valgrind}}
python=${PYTHON:-python3}

if ! "$valgrind" --tool=verrou --help > /dev/null 2>&1; then
    echo "smoke: '$valgrind' has no Verrou tool; build the container (docker/README.md)" >&2
    exit 2
fi
# Valgrind must exec the interpreter binary itself; PYTHONEXECUTABLE keeps a venv visible.
real_python=$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')
PYTHONEXECUTABLE=$("$python" -c 'import sys; print(sys.executable)')
export PYTHONEXECUTABLE
# One thread (Valgrind serialises threads); no AVX-512 override (SIGILL under Valgrind).
unset OPENBLAS_CORETYPE
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

run() {  # run MODE [SEED]
    local opts=(--tool=verrou -q "--rounding-mode=$1" --count-op=no --check-nan=no --check-inf=no)
    if [ $# -gt 1 ]; then opts+=("--vr-seed=$2"); fi
    "$valgrind" "${opts[@]}" "$real_python" "$here/smoke.py"
}

"$valgrind" --version
native=$("$real_python" "$here/smoke.py")
nearest1=$(run nearest)
nearest2=$(run nearest)
random1=$(run random 1)
printf '%s\n' "native:" "$native" "nearest:" "$nearest1" "nearest again:" "$nearest2" \
    "random (seed 1):" "$random1"

status=0
if [ "$nearest1" != "$nearest2" ]; then
    echo "FAIL: nearest is not deterministic" >&2; status=1
fi
if [ "$(grep python_sum <<< "$nearest1")" != "$(grep python_sum <<< "$native")" ]; then
    echo "FAIL: nearest changed the pure-Python double sum" >&2; status=1
fi
if [ "$random1" = "$nearest1" ]; then
    echo "FAIL: random rounding changed no sum" >&2; status=1
fi
if [ $status -eq 0 ]; then echo "OK: random rounding perturbs the sums, nearest does not"; fi
exit $status
