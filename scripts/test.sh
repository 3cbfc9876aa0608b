#!/usr/bin/env bash
# Lint, type-check and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
start=$SECONDS
ruff check .
ruff format --check .
mypy
echo "test.sh: lint and type check took $((SECONDS - start)) s" >&2
start=$SECONDS
status=0
pytest -q "$@" || status=$?
echo "test.sh: pytest took $((SECONDS - start)) s" >&2
exit $status
