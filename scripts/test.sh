#!/usr/bin/env bash
# Sets everything up (if needed), lints, and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet .  # the lint pyproject.toml configures
exec .venv/bin/python -m pytest -q "$@"
