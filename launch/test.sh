#!/usr/bin/env bash
# Install what the tests need into .venv and run the whole suite. Extra args go to pytest.
# Fails when pytest fails and when it collects no test (pytest exit code 5).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
set +e
python -m pytest tests -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing." >&2
  exit 1
fi
exit "$rc"
