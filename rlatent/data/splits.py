"""The train and eval problems a run's `data` section names, and their SFT examples."""

from __future__ import annotations

from rlatent.config import DataConfig, LatentConfig
from rlatent.modes import latent_mode
from rlatent.data.gsm8k import Problem, load_gsm8k
from rlatent.data.examples import SFTExample, build_example
from rlatent.data.synthetic import generate_problems

# Synthetic eval problems come from a different seed stream than training ones.
EVAL_SEED_OFFSET = 1_000_003


def load_split(data: DataConfig, split: str, limit: int | None = None) -> tuple[list[Problem], int]:
    """Problems of `split` ("train" or "test") and how many malformed rows were skipped."""
    if data.source == "synthetic":
        s = data.synthetic
        count = s.num_train if split == "train" else s.num_eval
        seed = s.seed if split == "train" else s.seed + EVAL_SEED_OFFSET
        problems = generate_problems(count, seed, s.min_steps, s.max_steps, s.max_operand, s.operators)
        return problems[:limit], 0
    return load_gsm8k(split, data.path, data.hub_name, data.hub_config, data.on_bad_line, limit)


def sft_examples(problems: list[Problem], tokenizer, latent: LatentConfig, max_length: int
                 ) -> tuple[list[SFTExample], int]:
    """Examples for the latent mode (`none`: marks stripped, no latents); drops and counts over-long ones."""
    k = latent.k if latent_mode(latent.mode).has_slots else 0
    examples = [build_example(p, tokenizer, k, latent.placement) for p in problems]
    kept = [e for e in examples if len(e.input_ids) <= max_length]
    return kept, len(examples) - len(kept)
