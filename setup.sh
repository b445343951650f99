#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs rtq with its pinned dependencies into it.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e ".[dev]" -c constraints.txt
bash scripts/install-prometheus.sh
echo "setup: .venv ready ($(.venv/bin/python --version)); CLI at .venv/bin/rtq"
