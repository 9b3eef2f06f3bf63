#!/usr/bin/env bash
# Sets everything up (if needed), lints, and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet .  # the lint and import order pyproject.toml configures
.venv/bin/ruff format --check --quiet .  # the layout (`.venv/bin/ruff format .` writes it)
# Two test processes at a time (at most four; one per core): most tests wait on subprocesses,
# and CI's 2 cores finish in about 10 minutes instead of 13. `-n 0` runs them in one process.
workers=$(nproc); workers=$(( workers > 4 ? 4 : (workers < 2 ? 2 : workers) ))
# The commands and ranks the tests start run one thread each: with torch's default (every core)
# the two workers' processes waited on each other's threads, and the suite took 13 min of wall
# time and 25 of CPU on 2 cores where it now takes 9 and 17. The workers themselves keep two
# threads (tests/conftest.py), so the ops' parallel splits are still tested.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -n "$workers" "$@"
