#!/usr/bin/env bash
# The whole demo: sets up .venv if needed, then runs all six stages of recipes/demo.yaml on the bundled logs.
# Rerunning it skips every stage whose inputs and settings did not change.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/distill run recipes/demo.yaml "$@"
.venv/bin/distill status recipes/demo.yaml
