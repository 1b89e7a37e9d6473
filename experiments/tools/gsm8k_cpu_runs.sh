#!/usr/bin/env bash
# The short CPU-scale GSM8K runs recorded in experiments/2026-11-22-real-gsm8k-cpu-scale.md: SmolLM2-135M-Instruct; phase 1 then phase 2
# for latent mode and the text baseline, phase 1 for the pause control. Same data, seeds and budgets.
# Phase 2 of latent mode runs from phase 1's checkpoint with micro-batches of 2 and at most 16 latents per
# completion: the exact recurrent forward keeps every pass's KV cache for backward, and 8 rows x 60 passes x
# 30 layers of SmolLM2 ran this 24 GiB machine out of memory.
# Usage: experiments/tools/gsm8k_cpu_runs.sh GSM8K_DIR OUT_DIR      (about 40 minutes on 2 idle CPU cores)
set -euo pipefail
data="$1"
out="$2"
common=(data.path="$data" output.dir="$out"
        data.max_length=320 sft.steps=20 sft.batch_size=4 sft.eval_every=10 eval.gain_batches=1
        eval.limit=30 eval.batch_size=30 eval.max_new_tokens=160 eval.num_samples=30
        grpo.steps=3 grpo.prompts_per_step=2 grpo.group_size=4 grpo.max_new_tokens=160
        grpo.micro_batch_size=2 grpo.lr=0.00002 latent.max_total_latents=16)
rlatent sft configs/gsm8k_smollm2.yaml "${common[@]}" latent.mode=latent output.name=gsm8k-latent
rlatent grpo configs/gsm8k_smollm2.yaml "${common[@]}" latent.mode=latent output.name=gsm8k-latent-grpo \
  grpo.init_checkpoint="$out/gsm8k-latent/checkpoints/step_000020"
rlatent train configs/gsm8k_smollm2.yaml "${common[@]}" latent.mode=none output.name=gsm8k-none
rlatent sft configs/gsm8k_smollm2.yaml "${common[@]}" latent.mode=pause output.name=gsm8k-pause
