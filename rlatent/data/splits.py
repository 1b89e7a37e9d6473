"""The train and eval problems a run's `data` section names, and their SFT examples."""

from __future__ import annotations

from dataclasses import replace

from rlatent.config import DataConfig, LatentConfig
from rlatent.errors import ConfigError
from rlatent.modes import latent_mode
from rlatent.data.gsm8k import Problem, load_gsm8k
from rlatent.data.examples import SFTExample, build_example, split_marks
from rlatent.data.graphs import generate_graph_problems
from rlatent.data.synthetic import generate_problems

# Seeded eval problems come from other seed streams than training ones, the
# out-of-distribution split (longer chains) from a third.
EVAL_SEED_OFFSET = 1_000_003
OOD_SEED_OFFSET = 2_000_003
SEEDED_SPLITS = ("train", "test", "ood")


def has_ood_split(data: DataConfig) -> bool:
    """Whether `data` has an `ood` split: the seeded tasks do (chains longer than trained), GSM8K does not."""
    return data.source in ("synthetic", "graph")


def load_split(data: DataConfig, split: str, limit: int | None = None) -> tuple[list[Problem], int]:
    """Problems of `split` ("train", "test" or, for the seeded tasks, "ood") and how many malformed rows
    were skipped. A limit generates only that many seeded problems: the first ones of the full split.
    With `data.split_steps`, answers are written one step per operation."""
    problems, skipped = _load_split(data, split, limit)
    if data.split_steps:
        problems = [replace(p, answer=split_marks(p.answer, data.split_steps)[0]) for p in problems]
    return problems, skipped


def _load_split(data: DataConfig, split: str, limit: int | None) -> tuple[list[Problem], int]:
    if data.source == "gsm8k":
        if split == "ood":
            raise ConfigError("data.source gsm8k has no out-of-distribution split")
        return load_gsm8k(split, data.path, data.hub_name, data.hub_config, data.on_bad_line, limit)
    if split not in SEEDED_SPLITS:
        raise ValueError(f"split must be one of {SEEDED_SPLITS} for data.source {data.source}, got {split!r}")
    cfg = data.synthetic if data.source == "synthetic" else data.graph
    count = {"train": cfg.num_train, "test": cfg.num_eval, "ood": cfg.num_ood or cfg.num_eval}[split]
    count = count if limit is None else min(count, limit)
    seed = cfg.seed + {"train": 0, "test": EVAL_SEED_OFFSET, "ood": OOD_SEED_OFFSET}[split]
    if data.source == "synthetic":
        low, high = cfg.ood_steps if split == "ood" else (cfg.min_steps, cfg.max_steps)
        problems = generate_problems(count, seed, low, high, cfg.max_operand, cfg.operators,
                                     cfg.max_multiplier, cfg.multi_op, cfg.allow_zero)
    else:
        low, high = cfg.ood_hops if split == "ood" else (cfg.min_hops, cfg.max_hops)
        problems = generate_graph_problems(count, seed, low, high, cfg.distractors)
    return problems, 0


def sft_examples(problems: list[Problem], tokenizer, latent: LatentConfig, max_length: int | None,
                 latent_marks: int | None = None) -> tuple[list[SFTExample], int]:
    """Examples for the latent mode (`none`: no latents, marks stripped with `insert` or removed with their
    expressions with `replace`), with the first `latent_marks` marks converted (all when None; the
    curriculum's stages); drops and counts those longer than `max_length` (None: keeps all)."""
    k = latent.k if latent_mode(latent.mode).has_slots else 0
    examples = [build_example(p, tokenizer, k, latent.placement, latent_marks) for p in problems]
    kept = [e for e in examples if max_length is None or len(e.input_ids) <= max_length]
    return kept, len(examples) - len(kept)
