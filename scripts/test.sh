#!/usr/bin/env bash
# Install into .venv/ (pinned set + dev tools) and run lint and format checks (ruff), the type checker (mypy) and pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow" -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock -e '.[dev]' 2>&1 \
  | grep -v -E "is ignored: it is neither a file nor a directory" || true
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
exec .venv/bin/pytest "$@"
