"""The Python API: load a trained run and answer questions with latents, or build a model for your own loop.

    import rlatent

    policy = rlatent.load("runs/quickstart-20261125-120000")      # a run directory or a checkpoint
    for answer in policy.generate(["Tom has 3 apples and buys 4 more. How many?"], max_new_tokens=64):
        print(answer.text, answer.final_answer, answer.latents)
        print(answer.with_latents)                                  # the completion with [z] at each latent
        print(answer.latent_tokens)                                 # each latent's nearest tokens

    model, tokenizer = rlatent.build_model("configs/quickstart.yaml", ["latent.trunk=two"])

`generate` takes the test-time budget knobs of `rlatent eval` as arguments
(`start_threshold`, `stop_threshold` and the latent caps); it runs the same
sampler that evaluation and GRPO rollouts use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlatent.config import RunConfig, load_config
from rlatent.data.examples import encode_stop_sequences, format_prompt, render_example, special_token_ids
from rlatent.data.marks import extract_final_answer
from rlatent.errors import CheckpointError
from rlatent.io.checkpoint import check_checkpoint_files
from rlatent.io.run_dir import RunDir
from rlatent.latent.sampler import SamplingSettings, sample
from rlatent.model.latent_model import LatentModel
from rlatent.model.loading import model_dtype, resolve_device
from rlatent.run.evaluate import nearest_tokens


@dataclass
class Answer:
    question: str
    text: str  # the completion, latents left out
    final_answer: str | None  # the number after `####` (or the last number), as graded
    with_latents: str  # the completion with a marker at each latent slot
    latents: int
    blocks: int
    tokens: int
    truncated: bool  # hit max_new_tokens without EOS
    latent_tokens: list[dict[str, list[str]]] = field(default_factory=list)
    """Per latent: the top tokens of the LM head on it and its nearest input embeddings."""


class LatentPolicy:
    """A trained latent policy (model + tokenizer) that answers questions."""

    def __init__(self, model: LatentModel, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer

    @torch.no_grad()
    def generate(self, questions: list[str], *, temperature: float = 0.0, top_p: float = 1.0,
                 decisions: str = "greedy", max_new_tokens: int = 256, start_threshold: float = 0.5,
                 stop_threshold: float = 0.5, max_latents_per_block: int = 8, max_blocks: int = 16,
                 max_total_latents: int = 64, stop: list[str] = (), batch_size: int = 16,
                 seed: int = 0) -> list[Answer]:
        """One answer per question. `temperature` 0 = greedy tokens; `decisions` `greedy` thresholds the
        start/stop heads at `start_threshold`/`stop_threshold` (raise the first for fewer latents), `sample`
        draws them. `stop`: strings that end an answer like EOS. Seeded: the same call gives the same answers."""
        settings = SamplingSettings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, decisions=decisions,
            start_threshold=start_threshold, stop_threshold=stop_threshold,
            max_latents_per_block=max_latents_per_block, max_blocks=max_blocks, max_total_latents=max_total_latents,
            stop_sequences=encode_stop_sequences(list(stop), self.tokenizer))
        eos_id, pad_id = special_token_ids(self.tokenizer)
        answers = []
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
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
            question=question, text=text, final_answer=extract_final_answer(text),
            with_latents=render_example(batch.input_ids[row, start:length].tolist(), slots[start:].tolist(),
                                        self.tokenizer),
            latents=int(counts["latents"][row]), blocks=int(counts["blocks"][row]),
            tokens=int(counts["tokens"][row]), truncated=not bool(traj.finished[row]),
            latent_tokens=nearest_tokens(self.model, self.tokenizer, traj.slot_inputs[row, :length][slots]),
        )


def load(path: str | Path, device: str = "auto", dtype: str = "auto", cache_dir: str | None = None) -> LatentPolicy:
    """A run directory (its latest checkpoint) or a checkpoint directory, ready to `generate`."""
    path = Path(path)
    checkpoint = RunDir(path, create=False).latest_checkpoint() if (path / "config.yaml").is_file() else path
    if checkpoint is None:
        raise CheckpointError(f"{path}: run directory has no checkpoint")
    check_checkpoint_files(checkpoint)  # a LoRA checkpoint without its adapter would load as the base model
    resolved = resolve_device(device)
    model, tokenizer = LatentModel.load(checkpoint, model_dtype(dtype, resolved), resolved, cache_dir=cache_dir)
    return LatentPolicy(model, tokenizer)


def build_model(config: str | Path | RunConfig | None = None, overrides: list[str] = ()
                ) -> tuple[LatentModel, object]:
    """A fresh latent model (base + LoRA + heads + projection) and its tokenizer, as a run builds them, for
    your own training loop: `config` is a YAML path, a `RunConfig`, or None for the defaults."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, list(overrides))
    device = resolve_device(cfg.model.device)
    return LatentModel.from_config(cfg.model, cfg.latent, model_dtype(cfg.model.dtype, device), device)
