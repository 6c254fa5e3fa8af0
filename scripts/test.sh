#!/usr/bin/env bash
# Sets up .venv with the test extras (dev, deepspeed, export, megatron, data, gpu: torchao for the FP8 tests),
# checks ruff (lint + format), then runs the whole test suite.
#   bash scripts/test.sh [pytest args]      (MODMOE_SLOW=1 adds the long soak tests)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,deepspeed,export,megatron,data,gpu
# Lint and format are part of the suite: a tree that ruff rejects does not pass.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python -m pytest -q "$@"
