"""How hard were the prompts a phase-2 run drew, for the policy it started from?

    python experiments/tools/drawn_prompts.py GRPO_RUN [--checkpoint DIR] [--prompt-seed S] [--json OUT] [key=value ...]

Phase 2 draws `grpo.prompts_per_step` training problems a step from a permutation seeded by the run's
`seed` (`rlatent.grpo.loop.prompt_order`), so over a short run (12 steps x 8 prompts) two seeds see two
different samples of ~100 problems. When two seeds of the same recipe end far apart, this separates the
draw from the updates: it samples CHECKPOINT (default: the run's start, `grpo.init_checkpoint`) once per
drawn problem exactly as the rollouts sample (`rlatent.distributed.rollout_settings`: temperature, top-p, sampled
decisions, caps, noise) and, for comparison, on as many held-out problems (or all there are). `--prompt-seed` replays another
seed's draw (the same start on a second seed's prompts). With dynamic sampling (`grpo.dynamic_sampling_rounds`)
these are each step's first round; the further rounds depend on the rewards the run saw. Scored as evaluations are
(`rlatent.run.evaluate.evaluate_problems`); the per-problem samples go next to OUT.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlatent.config import RunConfig, load_config
from rlatent.data.splits import load_split
from rlatent.distributed import rollout_settings
from rlatent.grpo.loop import prompt_order
from rlatent.model.latent_model import LatentModel
from rlatent.model.loading import model_dtype, resolve_device
from rlatent.run.evaluate import evaluate_problems
from rlatent.run.stages import seed_everything


def drawn_problems(cfg: RunConfig, prompt_seed: int | None = None) -> list:
    """The training problems phase 2 draws over its `grpo.steps` steps, in order (one per prompt, not per
    rollout), for the run's seed or `prompt_seed`."""
    train = load_split(cfg.data, "train", cfg.data.train_limit)[0]
    seed = cfg.seed if prompt_seed is None else prompt_seed
    return [train[i] for step in range(cfg.grpo.steps)
            for i in prompt_order(len(train), step, cfg.grpo.prompts_per_step, seed)]


def measure(run: Path, checkpoint: str | None, prompt_seed: int | None, out: Path | None,
            overrides: list[str]) -> dict:
    cfg = load_config(str(run / "config.yaml"), overrides)
    checkpoint = checkpoint or cfg.grpo.init_checkpoint
    if checkpoint is None:
        raise SystemExit(f"{run}: grpo.init_checkpoint is not set; name the policy with --checkpoint")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.model.device)
    model, tokenizer = LatentModel.load(checkpoint, model_dtype(cfg.model.dtype, device), device,
                                        cache_dir=cfg.model.cache_dir)
    settings = rollout_settings(cfg, tokenizer)
    drawn = drawn_problems(cfg, prompt_seed)
    splits = {"drawn": drawn, "held_out": load_split(cfg.data, "test", len(drawn))[0]}
    result = {"run": str(run), "checkpoint": str(checkpoint),
              "prompt_seed": cfg.seed if prompt_seed is None else prompt_seed}
    for name, problems in splits.items():
        samples = out.with_suffix(f".{name}.jsonl") if out else None
        metrics = evaluate_problems(model, tokenizer, problems, settings, cfg.eval.batch_size, samples,
                                    num_samples=len(problems))
        result[name] = {"right": round(metrics["accuracy"] * len(problems)), "problems": len(problems),
                        "accuracy": metrics["accuracy"]}
        print(f"{name}: {result[name]['right']} of {len(problems)} right ({metrics['accuracy']:.1%})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a phase-2 run directory (its config.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value on top of the run's config")
    parser.add_argument("--checkpoint", help="the policy to sample (default: the run's grpo.init_checkpoint)")
    parser.add_argument("--prompt-seed", type=int, help="replay this seed's draw instead of the run's")
    parser.add_argument("--json", type=Path, help="write the result here (samples beside it)")
    args = parser.parse_args()
    result = measure(args.run, args.checkpoint, args.prompt_seed, args.json, args.overrides)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
