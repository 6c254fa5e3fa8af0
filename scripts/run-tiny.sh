#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv, then trains configs/tiny.yaml on CPU
# (the Python standard library as corpus, metrics in runs/tiny and runs/tiny/mlflow.db).
#   bash scripts/run-tiny.sh [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/modmoe train configs/tiny.yaml "$@"
