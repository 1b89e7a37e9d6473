"""Answer accuracy with the latent sampler, and samples that show what latents hold.

Each latent in a sample is shown two ways: the top tokens of the LM head applied
to it (what it would decode to) and its nearest input embeddings by cosine
(what token it sits next to as an input). Latents that decode to junk are the
visible sign of latents the model does not use.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rlatent.io.atomic import atomic_write_text
from rlatent.data.gsm8k import Problem
from rlatent.data.examples import format_prompt, render_example, special_token_ids
from rlatent.model.latent_model import LatentModel
from rlatent.data.grading import grade
from rlatent.data.marks import extract_final_answer
from rlatent.latent.sampler import SamplingSettings, sample
from rlatent.latent.trajectory import Trajectories

TOP_TOKENS = 3

_outcome_recorders: list[dict[str, dict]] = []


@contextmanager
def record_outcomes() -> Iterator[dict[str, dict]]:
    """Collect the per-problem outcomes of every `evaluate_problems` call made inside the block.

    Yields a dict filled as evaluations finish: the resolved samples path (the string "None" for a call
    without one) -> {"correct": [0/1 per problem, in problem order], "questions": [...], "references":
    [...], "predictions": [each extracted final answer, or None], "metrics": {...}}; a later call with the
    same path replaces the earlier one. Paired tests (`rlatent ablate`'s McNemar) and its constant-answer
    row need these vectors, but the returned metrics must stay scalars (metrics.jsonl, TensorBoard), and
    the evaluation sits deep inside `run_phases`: recording beside it keeps the training code unaware of it.
    """
    recorded: dict[str, dict] = {}
    _outcome_recorders.append(recorded)
    try:
        yield recorded
    finally:
        _outcome_recorders.remove(recorded)


def outcome_key(samples_path: Path | str | None) -> str:
    """The key `record_outcomes` files an evaluation under."""
    return "None" if samples_path is None else str(Path(samples_path).resolve())


def nearest_tokens(model: LatentModel, tokenizer, latents: torch.Tensor) -> list[dict[str, list[str]]]:
    """(N, H) latent inputs -> per latent, top LM-head tokens and nearest input embeddings."""
    if latents.numel() == 0:
        return []
    head = model.token_logits(latents).topk(TOP_TOKENS, dim=-1).indices
    table = model.backbone.get_input_embeddings().weight  # (V, H)
    cosine = torch.nn.functional.normalize(latents.float(), dim=-1) @ torch.nn.functional.normalize(table.float(), dim=-1).T
    near = cosine.topk(TOP_TOKENS, dim=-1).indices
    return [{"lm_head": [tokenizer.decode([i]) for i in h.tolist()],
             "nearest_embeddings": [tokenizer.decode([i]) for i in n.tolist()]} for h, n in zip(head, near)]


def _row_record(model, tokenizer, problem: Problem, traj: Trajectories, row: int) -> dict:
    batch = traj.batch
    length = int(batch.lengths[row])
    start = int(batch.prompt_lengths[row])
    completion = tokenizer.decode(traj.completion_ids(row), skip_special_tokens=True)
    finished = bool(traj.finished[row])
    predicted = extract_final_answer(completion, finished)
    slots = batch.latent_mask[row, :length]
    return {
        "source": problem.source,
        "question": problem.question,
        "reference": problem.final_answer,
        "predicted": predicted,
        **grade(completion, problem.final_answer, finished),  # correct, strict_match, flexible_extract
        "completion": completion,
        "with_latents": render_example(batch.input_ids[row, start:length].tolist(), slots[start:].tolist(), tokenizer),
        "latents": nearest_tokens(model, tokenizer, traj.slot_inputs[row, :length][slots]),
        "truncated": not finished,
    }


@torch.no_grad()
def evaluate_problems(model: LatentModel, tokenizer, problems: list[Problem], settings: SamplingSettings,
                      batch_size: int, samples_path: Path | None = None, num_samples: int = 20,
                      engine=None) -> dict[str, float]:
    """Sample an answer to every problem; accuracy, latents/blocks/tokens per answer, timing.

    `accuracy` is rlatent's numeric match (`rlatent.data.grading.numeric_match`: the `#### N`
    line, or the last number of a finished answer); `strict_match` and `flexible_extract` are
    lm-evaluation-harness's two GSM8K grades, the numbers published tables report.
    `forward_passes_per_answer` counts the positions an answer generated (tokens +
    latents): each is one sequential model step, however rows are batched. `engine`
    (a vLLM engine for text-only policies) samples instead of rlatent's sampler. Per-problem
    correctness goes to any open `record_outcomes` block, not into the returned scalars.
    """
    model.eval()
    eos_id, pad_id = special_token_ids(tokenizer)
    correct = strict = flexible = latents = blocks = tokens = steps = truncated = 0
    model_calls = 0
    samples = []
    outcomes: list[int] = []
    predictions: list[str | None] = []
    started = time.perf_counter()
    for offset in range(0, len(problems), batch_size):
        chunk = problems[offset : offset + batch_size]
        prompts = [format_prompt(p.question, tokenizer) for p in chunk]
        traj = (sample(model, prompts, eos_id, pad_id, settings) if engine is None
                else engine.sample(prompts, seed=offset, sampling=settings))
        counts = traj.counts()
        model_calls += traj.forward_passes
        for row, problem in enumerate(chunk):
            record = _row_record(model, tokenizer, problem, traj, row)
            correct += record["correct"]
            strict += record["strict_match"]
            flexible += record["flexible_extract"]
            truncated += record["truncated"]
            outcomes.append(int(bool(record["correct"])))
            predictions.append(record["predicted"])
            if len(samples) < num_samples:
                samples.append(record)
        latents += int(counts["latents"].sum())
        blocks += int(counts["blocks"].sum())
        tokens += int(counts["tokens"].sum())
        steps += int((counts["latents"] + counts["tokens"]).sum())
    seconds = time.perf_counter() - started
    n = max(len(problems), 1)
    if samples_path is not None:
        atomic_write_text(samples_path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    metrics = {
        "accuracy": correct / n, "strict_match": strict / n, "flexible_extract": flexible / n,
        "latents_per_answer": latents / n, "blocks_per_answer": blocks / n,
        "tokens_per_answer": tokens / n, "forward_passes_per_answer": steps / n, "truncated": truncated / n,
        "batched_model_calls": model_calls, "wall_seconds": seconds, "problems": len(problems),
    }
    for recorded in _outcome_recorders:
        recorded[outcome_key(samples_path)] = {"correct": list(outcomes), "questions": [p.question for p in problems],
                                              "references": [p.final_answer for p in problems],
                                              "predictions": list(predictions), "metrics": dict(metrics)}
    return metrics
