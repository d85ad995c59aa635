#!/usr/bin/env bash
# Install what the tests need into .venv and run the whole suite. Extra args go to pytest
# (`-n 0`: one process; `-m slow`: the slow tests only; a test file or test id: that alone).
# Fails when pytest fails and when it collects no test (pytest exit code 5).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# The suite is compile-bound: many tests (and the subprocesses of the device-count tests)
# compile the same train and evaluation programs again. JAX's persistent compilation cache, fresh
# for each run and removed after it, lets a program compiled once be loaded after that; a cached
# program is the same executable, so no result changes.
cache="$(mktemp -d "${TMPDIR:-/tmp}/alphafuse-test-jit.XXXXXX")"
trap 'rm -rf "$cache"' EXIT
export JAX_COMPILATION_CACHE_DIR="$cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.2 \
       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
# XLA:CPU's classic loop emitters compile these small programs about a quarter faster than its
# fusion emitters (the default); they compute the same operations, and every float32 comparison in
# the suite allows for a change of fusion. Tests hand XLA_FLAGS on to the processes they start
# (tests/cpu_env.py). BENCHMARKS.md, "The test suite's wall time", has the measurement. To test
# with the default emitters: XLA_FLAGS=--xla_cpu_use_fusion_emitters=true bash launch/test.sh
case "${XLA_FLAGS:-}" in
  *xla_cpu_use_fusion_emitters*) ;;
  *) export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_use_fusion_emitters=false" ;;
esac
# pytest-xdist: one worker per core, at most 4; a test file runs whole on one worker, so its
# module fixtures (e.g. the prepared MovieLens-1M) are built once.
# Test files or ids among the arguments (tests/test_train.py, tests/test_x.py::test_y) run alone;
# otherwise the whole of tests/.
targets=(tests)
for arg in "$@"; do
  case "$arg" in tests/*|*.py|*.py::*) targets=(); break ;; esac
done
set +e
python -m pytest "${targets[@]}" -q --numprocesses=auto --maxprocesses=4 --dist=loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing." >&2
  exit 1
fi
exit "$rc"
