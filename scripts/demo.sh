#!/usr/bin/env bash
# Install into .venv/ (pinned set) and run the end-to-end demo on this machine. Arguments go to `landmarks demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock -e . 2>&1 \
  | grep -v -E "is ignored: it is neither a file nor a directory" || true
exec .venv/bin/landmarks demo "$@"
