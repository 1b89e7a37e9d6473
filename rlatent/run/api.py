"""The Python API: load a trained run and answer questions with latents, or build a model for your own loop.

    import rlatent

    policy = rlatent.load("runs/quickstart-20261125-120000")      # a run directory or a checkpoint
    for answer in policy.generate(["Tom has 3 apples and buys 4 more. How many?"], max_new_tokens=64):
        print(answer.text, answer.final_answer, answer.latents)
        print(answer.with_latents)                                  # the completion with [z] at each latent
        print(answer.latent_tokens)                                 # each latent's nearest tokens

    model, tokenizer = rlatent.build_model("configs/quickstart.yaml", ["latent.trunk=two"])

A loaded run answers as `rlatent eval` evaluates it: `generate` runs the sampler that evaluation and
GRPO rollouts use, with the run's own evaluation settings (its config.yaml's `latent` caps and
thresholds, `eval` sampling, stop strings and batch size, `seed`), so a run trained with 16 latents a
block is not cut at some library default; each keyword argument overrides one of them. A checkpoint
outside a run directory has no config and takes `SamplingSettings`' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rlatent.config import ModelConfig, RunConfig, load_config
from rlatent.data.examples import encode_stop_sequences, format_prompt, render_example, special_token_ids
from rlatent.data.marks import extract_final_answer
from rlatent.errors import CheckpointError
from rlatent.io.checkpoint import check_checkpoint_files
from rlatent.io.run_dir import RunDir
from rlatent.latent.sampler import SamplingSettings, sample
from rlatent.model.latent_model import SETTINGS_FILE, LatentModel
from rlatent.model.loading import model_dtype, resolve_device
from rlatent.run.evaluate import nearest_tokens


@dataclass
class Answer:
    question: str
    text: str  # the completion, latents left out
    final_answer: str | None  # the number after `####` (or the last number of a finished answer), as graded
    with_latents: str  # the completion with a marker at each latent slot
    latents: int
    blocks: int
    tokens: int
    truncated: bool  # hit max_new_tokens without EOS
    latent_tokens: list[dict[str, list[str]]] = field(default_factory=list)
    """Per latent: the top tokens of the LM head on it and its nearest input embeddings."""


class LatentPolicy:
    """A trained latent policy (model + tokenizer) that answers questions; `cfg` (its run's config, or None)
    gives the defaults of `generate`."""

    def __init__(self, model: LatentModel, tokenizer, cfg: RunConfig | None = None):
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg
        self.settings = SamplingSettings() if cfg is None else SamplingSettings.from_config(
            cfg.latent, cfg.eval, stop_sequences=encode_stop_sequences(cfg.eval.stop, tokenizer))
        self.batch_size, self.seed = (16, 0) if cfg is None else (cfg.eval.batch_size, cfg.seed)

    @torch.no_grad()
    def generate(self, questions: list[str], *, temperature: float | None = None, top_p: float | None = None,
                 decisions: str | None = None, max_new_tokens: int | None = None,
                 start_threshold: float | None = None, stop_threshold: float | None = None,
                 max_latents_per_block: int | None = None, max_blocks: int | None = None,
                 max_total_latents: int | None = None, stop: list[str] | None = None,
                 batch_size: int | None = None, seed: int | None = None) -> list[Answer]:
        """One answer per question; every argument left None is the run's (`eval.*`, `latent.*`, `seed`).
        `temperature` 0 = greedy tokens; `decisions` `greedy` thresholds the start/stop heads at
        `start_threshold`/`stop_threshold` (raise the first for fewer latents), `sample` draws them. `stop`:
        strings that end an answer like EOS. Seeded: the same call gives the same answers."""
        chosen = dict(temperature=temperature, top_p=top_p, decisions=decisions, max_new_tokens=max_new_tokens,
                      start_threshold=start_threshold, stop_threshold=stop_threshold,
                      max_latents_per_block=max_latents_per_block, max_blocks=max_blocks,
                      max_total_latents=max_total_latents,
                      stop_sequences=None if stop is None else encode_stop_sequences(list(stop), self.tokenizer))
        settings = replace(self.settings, **{name: value for name, value in chosen.items() if value is not None})
        batch_size = batch_size or self.batch_size
        eos_id, pad_id = special_token_ids(self.tokenizer)
        answers = []
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed if seed is None else seed)
        try:
            for offset in range(0, len(questions), batch_size):
                chunk = questions[offset:offset + batch_size]
                traj = sample(self.model, [format_prompt(q, self.tokenizer) for q in chunk], eos_id, pad_id,
                              settings)
                counts = traj.counts()
                for row, question in enumerate(chunk):
                    answers.append(self._answer(question, traj, counts, row))
        finally:
            torch.random.set_rng_state(generator_state)
        return answers

    def _answer(self, question: str, traj, counts, row: int) -> Answer:
        batch = traj.batch
        start, length = int(batch.prompt_lengths[row]), int(batch.lengths[row])
        slots = batch.latent_mask[row, :length]
        text = self.tokenizer.decode(traj.completion_ids(row), skip_special_tokens=True)
        return Answer(
            question=question, text=text, final_answer=extract_final_answer(text, bool(traj.finished[row])),
            with_latents=render_example(batch.input_ids[row, start:length].tolist(), slots[start:].tolist(),
                                        self.tokenizer),
            latents=int(counts["latents"][row]), blocks=int(counts["blocks"][row]),
            tokens=int(counts["tokens"][row]), truncated=not bool(traj.finished[row]),
            latent_tokens=nearest_tokens(self.model, self.tokenizer, traj.slot_inputs[row, :length][slots]),
        )


def locate(path: str | Path) -> tuple[Path | None, Path | None]:
    """(checkpoint, its run's config.yaml) of a run directory (its latest checkpoint, None before the first)
    or of a checkpoint directory (`RUN/checkpoints/step_N`: the config two levels up, None without one)."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return RunDir(path, create=False).latest_checkpoint(), path / "config.yaml"
    if not (path / SETTINGS_FILE).is_file():
        raise CheckpointError(f"{path}: neither a run directory (config.yaml) nor a checkpoint ({SETTINGS_FILE})")
    config = path.parent.parent / "config.yaml"
    return path, config if config.is_file() else None


def load(path: str | Path, device: str | None = None, dtype: str | None = None, cache_dir: str | None = None,
         overrides: list[str] = ()) -> LatentPolicy:
    """A run directory (its latest checkpoint) or a checkpoint directory, ready to `generate` as the run
    evaluates. `device`, `dtype` and `cache_dir` default to the run's `model.*` (`auto` without a config);
    `overrides` (`key.sub=value`) apply to the run's config, e.g. for one that a newer check refuses."""
    checkpoint, config = locate(path)
    if checkpoint is None:
        raise CheckpointError(f"{path}: run directory has no checkpoint")
    check_checkpoint_files(checkpoint)  # a LoRA checkpoint without its adapter would load as the base model
    cfg = None if config is None else load_config(config, list(overrides))
    run_model = cfg.model if cfg is not None else ModelConfig()  # without a config: `auto` device and dtype
    resolved = resolve_device(device or run_model.device)
    model, tokenizer = LatentModel.load(checkpoint, model_dtype(dtype or run_model.dtype, resolved), resolved,
                                        cache_dir=cache_dir or run_model.cache_dir)
    return LatentPolicy(model, tokenizer, cfg)


def build_model(config: str | Path | RunConfig | None = None, overrides: list[str] = ()
                ) -> tuple[LatentModel, object]:
    """A fresh latent model (base + LoRA + heads + projection) and its tokenizer, as a run builds them, for
    your own training loop: `config` is a YAML path, a `RunConfig`, or None for the defaults."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, list(overrides))
    device = resolve_device(cfg.model.device)
    return LatentModel.from_config(cfg.model, cfg.latent, model_dtype(cfg.model.dtype, device), device)
