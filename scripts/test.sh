#!/usr/bin/env bash
# The test suite: sets up .venv if needed, checks style with ruff, runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
