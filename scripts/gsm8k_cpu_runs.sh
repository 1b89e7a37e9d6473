#!/usr/bin/env bash
# The short CPU-scale GSM8K runs recorded in docs/results.md: SmolLM2-135M-Instruct, both phases for
# latent mode and the text baseline, phase 1 for the pause control. Same data, seeds and budgets.
# Usage: scripts/gsm8k_cpu_runs.sh GSM8K_DIR OUT_DIR      (about 45 minutes on 2 CPU cores)
set -euo pipefail
data="$1"
out="$2"
common=(data.path="$data" output.dir="$out"
        sft.steps=30 sft.batch_size=4 sft.eval_every=15 eval.gain_batches=2
        eval.limit=40 eval.batch_size=20 eval.max_new_tokens=200 eval.num_samples=40
        grpo.steps=4 grpo.prompts_per_step=2 grpo.group_size=4 grpo.max_new_tokens=160
        grpo.micro_batch_size=8 grpo.lr=0.00002)
rlatent train configs/gsm8k_smollm2.yaml "${common[@]}" latent.mode=latent output.name=gsm8k-latent
rlatent train configs/gsm8k_smollm2.yaml "${common[@]}" latent.mode=none output.name=gsm8k-none
rlatent sft configs/gsm8k_smollm2.yaml "${common[@]}" latent.mode=pause output.name=gsm8k-pause
