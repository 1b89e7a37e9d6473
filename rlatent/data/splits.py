"""The train and eval problems a run's `data` section names, and their SFT examples."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from rlatent.config import DataConfig, LatentConfig
from rlatent.errors import ConfigError
from rlatent.modes import latent_mode
from rlatent.data.gsm8k import Problem, load_gsm8k
from rlatent.data.examples import SFTExample, block_sizes, build_example, split_marks
from rlatent.data.marks import parse_marks
from rlatent.data.graphs import generate_graph_problems
from rlatent.data.synthetic import generate_problems

# Seeded held-out problems come from other seed streams than training ones: the
# test split from one, the dev split (for choosing recipes) from another, the
# out-of-distribution split (longer chains) from a third.
EVAL_SEED_OFFSET = 1_000_003
OOD_SEED_OFFSET = 2_000_003
DEV_SEED_OFFSET = 3_000_017
SEEDED_SPLITS = ("train", "dev", "test", "ood")


def has_ood_split(data: DataConfig) -> bool:
    """Whether `data` has an `ood` split: the seeded tasks do (chains longer than trained), GSM8K does not."""
    return data.source in ("synthetic", "graph")


def load_split(data: DataConfig, split: str, limit: int | None = None) -> tuple[list[Problem], int]:
    """Problems of `split` ("train", "dev", "test" or, for the seeded tasks, "ood") and how many malformed
    rows were skipped. A limit generates only that many seeded problems: the first ones of the full split.
    With `data.split_steps`, answers are written one step per operation; with `data.answer_format:
    equations`, as their calculator steps alone."""
    problems, skipped = _load_split(data, split, limit)
    if data.split_steps:
        problems = [replace(p, answer=split_marks(p.answer, data.split_steps)[0]) for p in problems]
    if data.answer_format == "equations":
        problems = [replace(p, answer=equation_chain(p.answer)) for p in problems]
    return problems, skipped


def _load_split(data: DataConfig, split: str, limit: int | None) -> tuple[list[Problem], int]:
    if data.source == "gsm8k":
        return _gsm8k_split(data, split, limit)
    if split not in SEEDED_SPLITS:
        raise ValueError(f"split must be one of {SEEDED_SPLITS} for data.source {data.source}, got {split!r}")
    cfg = data.synthetic if data.source == "synthetic" else data.graph
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"data.{data.source}.seed {cfg.seed!r}: 'run' is resolved by the run config; "
                          "pass the run's seed")
    count = {"train": cfg.num_train, "dev": cfg.num_dev or cfg.num_eval, "test": cfg.num_eval,
             "ood": cfg.num_ood or cfg.num_eval}[split]
    count = count if limit is None else min(count, limit)
    seed = cfg.seed + {"train": 0, "dev": DEV_SEED_OFFSET, "test": EVAL_SEED_OFFSET, "ood": OOD_SEED_OFFSET}[split]
    if data.source == "synthetic":
        low, high = cfg.ood_steps if split == "ood" else (cfg.min_steps, cfg.max_steps)
        problems = generate_problems(count, seed, low, high, cfg.max_operand, cfg.operators,
                                     cfg.max_multiplier, cfg.multi_op, cfg.allow_zero)
    else:
        low, high = cfg.ood_hops if split == "ood" else (cfg.min_hops, cfg.max_hops)
        problems = generate_graph_problems(count, seed, low, high, cfg.distractors)
    return problems, 0


def _gsm8k_split(data: DataConfig, split: str, limit: int | None) -> tuple[list[Problem], int]:
    """GSM8K's `split`: `test` is the test file; `dev` the last `data.dev_size` problems of the train file,
    which `train` then leaves out."""
    if split == "ood":
        raise ConfigError("data.source gsm8k has no out-of-distribution split")
    if split == "dev" and not data.dev_size:
        raise ConfigError("data.source gsm8k has a dev split only with data.dev_size > 0 (the last N train problems)")
    if split == "test" or not data.dev_size:
        return load_gsm8k(split, data.path, data.hub_name, data.hub_config, data.on_bad_line, limit)
    problems, skipped = load_gsm8k("train", data.path, data.hub_name, data.hub_config, data.on_bad_line)
    if len(problems) <= data.dev_size:
        raise ConfigError(f"data.dev_size {data.dev_size} leaves no GSM8K training problems "
                          f"({len(problems)} in the train split)")
    chosen = problems[-data.dev_size:] if split == "dev" else problems[: -data.dev_size]
    return chosen[:limit], skipped


def compression_factor(problem: Problem, most: int) -> int:
    """A factor in 1 .. `most` drawn for `problem` from its question (not from a global stream), so that every
    curriculum stage, every resumed run and every process gives a problem the same factor."""
    digest = hashlib.blake2b(problem.question.encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % most


def equation_chain(answer: str) -> str:
    """`answer` as GSM8K-Aug writes it: each calculator step on its own line as `expr=<<expr=r>>r`, then the
    final `#### n`. The words go, so each step writes its mark's own expression in full (the natural answer
    may write it otherwise, or not at all); the marks stay, so latents go where they go in the natural format."""
    steps = [f"{mark.expression}=<<{mark.expression}={mark.result}>>{mark.result}" for mark in parse_marks(answer)]
    final = answer[answer.rfind("####"):].strip()
    return "\n".join([*steps, final])


def sft_examples(problems: list[Problem], tokenizer, latent: LatentConfig, max_length: int | None,
                 latent_marks: int | None = None, tokens_per_latent: int | None = None, split_up_to: int = 1,
                 random_factor: bool = False) -> tuple[list[SFTExample], int]:
    """Examples for the latent mode (`none`: no latents, marks stripped with `insert` or removed with their
    expressions with `replace`), with the first `latent_marks` marks converted (all when None; the
    curriculum's stages); drops and counts those longer than `max_length` (None: keeps all). With
    `tokens_per_latent` (c), a block has ceil(its chain's tokens / c) slots, at most `latent.k`
    (`block_sizes`; chains stepwise for marks of up to `split_up_to` operations); with `random_factor`, each
    problem its own c in 1 .. `tokens_per_latent` (`compression_factor`)."""
    has_slots = latent_mode(latent.mode).has_slots

    def slots(problem: Problem) -> int | list[int]:
        if not has_slots:
            return 0
        if tokens_per_latent is None:
            return latent.k
        factor = compression_factor(problem, tokens_per_latent) if random_factor else tokens_per_latent
        return block_sizes(problem.answer, tokenizer, factor, latent.k, split_up_to, latent_marks)

    examples = [build_example(p, tokenizer, slots(p), latent.placement, latent_marks) for p in problems]
    kept = [e for e in examples if max_length is None or len(e.input_ids) <= max_length]
    return kept, len(examples) - len(kept)
