#!/usr/bin/env bash
# CUDA correctness and GPU benchmarks in one go, on a machine with one NVIDIA GPU:
#
#   bash scripts/gpu_checks.sh OUT_DIR [MODEL]
#
# 1. The CUDA tests (`-m gpu` in tests/test_cuda.py and tests/test_loading.py, files that need no Ray, TRL or
#    DeepSpeed): the sampler, the packed recurrent forward and its gradients, the compiled decode step:
#    the same as on the CPU, in float64; plus an end-to-end `rlatent train`
#    in the GPU's default dtype (bf16).
# 2. benchmarks/bench_latent.py on MODEL in bf16: the sampler on a GRPO rollout workload (16 prompts x G=8 = 128
#    rows, sampled decisions, ragged lengths) against Hugging Face `generate`, with and without continuous
#    batching and `compile`, and the recurrent training step against a plain one.
# 3. benchmarks/bench_update_memory.py: peak GPU memory of a GRPO update of 8 rows with up to 60 latents each,
#    against a plain forward+backward of the same tokens.
# 4. benchmarks/bench_phase2.py: two phase-2 steps of configs/multiop_compress.yaml on the GPU, from a short
#    phase 1 (PHASE1_STEPS, default 30) of the latent row and of its pause control, with the update's parts.
# MODEL defaults to a random model with SmolLM2-135M's shapes (`python -m rlatent.model.tiny DIR --like
# smollm2`): speed and memory depend on the shapes, not the weights, and it needs no download. Results: OUT_DIR/
# {gpu_tests.log,bench_latent.json,bench_latent.txt,update_memory.json,update_memory.txt,phase2.json,phase2.txt}. Each step runs even
# if an earlier one failed; the exit status is the number of failed steps.
set -uo pipefail
out="${1:?usage: gpu_checks.sh OUT_DIR [MODEL]}"; model="${2:-}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"  # absolute: later steps run from the repository root
here="$(cd "$(dirname "$0")/.." && pwd)"
failed=0
python3 - <<'EOF' | tee "$out/environment.txt"
import platform, torch, transformers, peft
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, device {torch.cuda.get_device_name(0)}")
EOF
(cd "$here" && python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py tests/test_loading.py) 2>&1 | tee "$out/gpu_tests.log" | tail -25 \
  || failed=$((failed + 1))
if [ -z "$model" ]; then
  model="$(mktemp -d)/smollm2-shape"
  python3 -m rlatent.model.tiny "$model" --like smollm2 >/dev/null || failed=$((failed + 1))
fi
questions=()
[ -n "${GSM8K_TEST:-}" ] && questions=(--questions "$GSM8K_TEST")
python3 "$here/benchmarks/bench_latent.py" --model "$model" --device cuda --dtype bfloat16 --batch 8 --seq-len 256 \
  --rollout-prompts 16 --group-size 8 --rollout-new-tokens 128 --slots 64 --repeats 2 --max-wait 10 \
  "${questions[@]}" --json "$out/bench_latent.json" 2>&1 | grep -v "Loading weights\|Writing model" \
  | tee "$out/bench_latent.txt" | tail -40 || failed=$((failed + 1))
python3 "$here/benchmarks/bench_update_memory.py" --device cuda --cases smollm2-shape --rows 8 --new-tokens 192 \
  --latents 60 --json "$out/update_memory.json" 2>&1 | tee "$out/update_memory.txt" | tail -6 || failed=$((failed + 1))
starts="$out/phase1"
recipe=(configs/multiop_compress.yaml "model.name_or_path=$model" model.device=cuda seed=10)
for row in latent pause; do
  mode=(); [ "$row" = pause ] && mode=(latent.mode=pause)
  (cd "$here" && python3 -m rlatent.run.cli sft "${recipe[@]}" "${mode[@]}" "sft.steps=${PHASE1_STEPS:-30}" \
    "sft.curriculum.steps_per_stage=$(( ${PHASE1_STEPS:-30} / 3 ))" \
    sft.eval_every=100000 eval.limit=1 eval.gain_batches=1 "output.dir=$starts" "output.name=$row") \
    >"$out/phase1_$row.log" 2>&1 || failed=$((failed + 1))
done
(cd "$here" && python3 benchmarks/bench_phase2.py "${recipe[@]}" --steps 2 \
  --row latent "$starts/latent/checkpoints/step_$(printf %06d "${PHASE1_STEPS:-30}")" \
  --row pause "$starts/pause/checkpoints/step_$(printf %06d "${PHASE1_STEPS:-30}")" latent.mode=pause \
  --json "$out/phase2.json") 2>&1 | grep -v "Loading weights\|Writing model" | tee "$out/phase2.txt" | tail -16 \
  || failed=$((failed + 1))
exit "$failed"
