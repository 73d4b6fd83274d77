#!/usr/bin/env bash
# Creates .venv (once) with the CPU build of torch 2.13.0 and distill's pinned dependencies.
# Usage: bash scripts/setup.sh [EXTRAS]     (default extras: dev,all; see pyproject.toml)
# torch is installed first and held by constraints.txt, so no later install can swap in a CUDA build.
# Rerunning it is instant unless pyproject.toml, constraints.txt or the extras changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-dev,all}
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$extras"
stamp=.venv/.distill-installed
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "setting up .venv: torch 2.13.0 (CPU build) + pinned dependencies [$extras], one to three minutes ..."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
log=.venv/pip-install.log
: > "$log"
pipi() {  # pip install, its chatter kept in the log and shown only on failure
  if ! .venv/bin/python -m pip install "$@" >> "$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -40; echo "pip install $* failed; full log: $log" >&2; exit 1
  fi
}
pipi --upgrade pip
pipi torch==2.13.0
pipi -c constraints.txt -e ".[$extras]"
.venv/bin/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} was installed, expected 2.13.0')"
echo "$want" > "$stamp"
echo ".venv ready"
