"""Phase 1: the supervised warm start.

Teaches the model to predict each next step through latent blocks placed at
GSM8K calculator marks, the start head to open blocks there and the stop head
to close them (losses in `sft_losses`). The loop reads top to bottom: batches
of examples, `grad_accum` micro-batches per optimizer step, AdamW with warm-up
and decay, gradient clipping, periodic diagnostics (LM loss, classifier
precision/recall/F1, latent gain, latent norms) and atomic checkpoints.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm
from transformers import get_scheduler

from rlatent.io.checkpoint import restore_training_state, save_checkpoint
from rlatent.latent.batch import LatentBatch, collate
from rlatent.config import RunConfig
from rlatent.errors import TrainingError
from rlatent.data.examples import SFTExample
from rlatent.latent.forward import forward
from rlatent.model.latent_model import LatentModel
from rlatent.optim import build_optimizer
from rlatent.io.run_dir import MetricsLogger, RunDir, read_metrics
from rlatent.sft.compress import chain_inputs, compress_loss, decoder_loss
from rlatent.sft.curriculum import Curriculum
from rlatent.sft.distill import distill_counts, distill_terms
from rlatent.sft.diagnostics import latent_diagnostics
from rlatent.sft.losses import LossTotals, sft_loss

LOSS_GROWTH_WARNING = 10.0
"""A step whose loss exceeds this many times the run's first is diverging, nearly always from too high a
learning rate: a console warning, once per process. The run stops only when the weights turn NaN/inf (the
optimizer's guard), and a loss can grow a hundred-thousandfold while they stay finite (`sft.lr=1e6`, now
refused by the config, took the tiny model's 9.6 to 1.4e6 at step 2; `sft.lr=1`, accepted, full fine-tuning
to 11x at step 3). A healthy run's loss falls from its first step's: ten times above it is no noise."""


def epoch_batches(examples: list[SFTExample], batch_size: int, seed: int) -> Iterator[list[SFTExample]]:
    """Endless batches, reshuffled each epoch from `seed` (same seed, same order)."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]
        epoch += 1


class SFTTrainer:
    def __init__(self, cfg: RunConfig, model: LatentModel, tokenizer, train: list[SFTExample],
                 evaluation: list[SFTExample], run: RunDir, logger: MetricsLogger,
                 earlier_stages: list[tuple[list[SFTExample], list[SFTExample]]] = (),
                 teachers: list[list[SFTExample]] | None = None):
        """`train`, `evaluation`: the examples of the final (all-latent) stage. `earlier_stages`: with
        `sft.curriculum`, the (train, evaluation) examples of stages 0 .. stages-1, aligned with `train` by
        problem (`rlatent.sft.curriculum.staged_examples`). `teachers`: with `sft.distill`, each stage's
        written-chain teachers of the training problems, aligned the same way."""
        if len(train) < cfg.sft.batch_size:
            raise TrainingError(f"sft.batch_size {cfg.sft.batch_size} exceeds the {len(train)} training examples")
        self.cfg, self.model, self.run, self.logger = cfg, model, run, logger
        self.pad_id = tokenizer.pad_token_id
        self.curriculum = Curriculum.from_config(cfg.sft)
        self.stages = [*earlier_stages, (train, evaluation)]
        if len(self.stages) != self.curriculum.stages + 1:
            raise ValueError(f"{len(self.stages)} example stages for a curriculum of {self.curriculum.stages}")
        if (teachers is None) != (cfg.sft.distill.weight == 0) or teachers and len(teachers) != len(self.stages):
            raise ValueError("sft.distill needs the teachers of every stage, and only sft.distill does")
        self.teachers = teachers
        sft = cfg.sft
        self.optimizer = build_optimizer(
            cfg.deepspeed, model, sft.lr, sft.weight_decay, sft.max_grad_norm,
            lambda opt: get_scheduler(sft.schedule, opt, num_warmup_steps=sft.warmup_steps,
                                      num_training_steps=max(sft.steps, 1)))
        self.step = 0
        self.first_loss: float | None = None  # the run's first step's, for `LOSS_GROWTH_WARNING`
        self.warned_loss = False

    def batch(self, examples: list[SFTExample]) -> LatentBatch:
        return collate(examples, self.pad_id).to(self.model.device)

    def train(self) -> Path:
        """Run all steps; returns the final checkpoint directory."""
        sft = self.cfg.sft
        # Batches of problem indices: the same order at every stage, and for a resumed run.
        micro_batches = epoch_batches(list(range(len(self.stages[-1][0]))), sft.batch_size, self.cfg.seed)
        for _ in range(self.step * sft.grad_accum):  # a resumed run continues at its data position
            next(micro_batches)
        progress = tqdm(total=sft.steps, initial=self.step, desc="sft", dynamic_ncols=True)
        while self.step < sft.steps:
            started = time.perf_counter()
            stage = self.enter_stage()
            examples = self.stages[stage][0]
            chosen = [next(micro_batches) for _ in range(sft.grad_accum)]
            teachers = None if self.teachers is None else [
                self.batch([self.teachers[stage][i] for i in rows]) for rows in chosen]
            metrics = self.train_step([self.batch([examples[i] for i in rows]) for rows in chosen], teachers)
            if self.curriculum.stages:
                metrics["curriculum_stage"] = stage
            self.step += 1
            metrics["step_seconds"] = time.perf_counter() - started
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", lm=f"{metrics['lm_loss']:.3f}")
            self.watch_loss(metrics["loss"])
            if self.step % sft.log_every == 0:
                self.logger.log(self.step, metrics, phase="train")
            if self.step % sft.eval_every == 0 and self.step < sft.steps:
                self.evaluate()
            if sft.save_every and self.step % sft.save_every == 0 and self.step < sft.steps:
                self.save_checkpoint()
        progress.close()
        path = self.save_checkpoint()  # training is kept even if the final diagnostics fail
        self.evaluate()
        return path

    def watch_loss(self, loss: float) -> None:
        """Warn once when a step's loss exceeds `LOSS_GROWTH_WARNING` times the run's first."""
        if self.first_loss is None:
            self.first_loss = loss
        elif not self.warned_loss and loss > LOSS_GROWTH_WARNING * self.first_loss:
            self.warned_loss = True
            tqdm.write(f"WARNING sft step {self.step}: loss {loss:.4g} is {loss / self.first_loss:.0f}x the first "
                       f"step's ({self.first_loss:.4g}): training is diverging; sft.lr {self.cfg.sft.lr:g} is "
                       "likely too high")

    def enter_stage(self) -> int:
        """The curriculum stage of the coming step; at a stage change, say so and reset the optimizer's
        moments if configured (`sft.curriculum`)."""
        stage = self.curriculum.stage(self.step)
        if self.step and stage != self.curriculum.stage(self.step - 1):
            tqdm.write(f"sft step {self.step}: curriculum stage {stage} of {self.curriculum.stages} "
                       f"({'all marks' if self.curriculum.latent_marks(stage) is None else f'{stage} marks'} "
                       "converted)")
            if self.cfg.sft.curriculum.reset_optimizer:
                self.optimizer.reset_moments()
        return stage

    def train_step(self, micro_batches: list[LatentBatch], teachers: list[LatentBatch] | None = None
                   ) -> dict[str, float]:
        """One optimizer step over `micro_batches` (with `sft.distill`, `teachers`: their written chains)."""
        sft = self.cfg.sft
        self.model.train()
        # One normaliser for the whole step: each micro-batch's loss is its share of the whole batch's
        # loss (sums over the step's token and decision counts), so the shares add up to it.
        counts = LossTotals.of(micro_batches)
        totals = {"loss": 0.0, "lm_loss": 0.0, "start_loss": 0.0, "stop_loss": 0.0}
        if teachers is not None:
            totals.update(distill_loss=0.0, teacher_lm_loss=0.0)
            distill_totals = distill_counts(micro_batches, teachers)
        compress, decode = sft.compress.weight > 0, sft.compress.decoder_weight > 0
        if compress:
            totals["compress_loss"] = 0.0
        if decode:
            totals["decoder_loss"] = 0.0
        slots = sum(int(batch.latent_mask.sum()) for batch in micro_batches)
        tokens = 0
        for index, batch in enumerate(micro_batches):
            anchors = None if teachers is None else batch.anchor_mask  # set by `distill_pair`
            # Pause slots keep their pause inputs: the chain-supervised pause control differs from the
            # latent row only in what is fed back.
            forced = (compress and sft.compress.teacher_forcing and self.model.latent_mode.recurrent
                      and bool(batch.latent_mask.any()))
            inputs = chain_inputs(self.model, batch) if forced else None
            out = forward(self.model, batch, self.cfg.latent.gradient, slot_inputs=inputs,
                          pass_cost=self.cfg.latent.pass_cost, anchors=anchors)
            loss = sft_loss(self.model, batch, out, sft.lambda_start, sft.lambda_stop, sft.start_pos_weight, counts)
            total, parts = loss.total, [loss.total, loss.lm, loss.start, loss.stop]
            chain_parts = []
            if compress:
                chain_parts.append(compress_loss(self.model, batch, out) / max(slots, 1))
                total = total + sft.compress.weight * chain_parts[-1]
            if decode:
                chain_parts.append(decoder_loss(self.model, batch, out) / max(slots, 1))
                total = total + sft.compress.decoder_weight * chain_parts[-1]
            if chain_parts:
                parts = [total, loss.lm, loss.start, loss.stop, *chain_parts]
            if teachers is not None:
                distill, teacher_lm = distill_terms(self.model, batch, out, teachers[index], distill_totals)
                total = total + sft.distill.weight * distill + sft.distill.teacher_weight * teacher_lm
                parts = [total, loss.lm, loss.start, loss.stop, distill, teacher_lm]
            if not torch.isfinite(total):
                raise TrainingError(f"sft step {self.step + 1}: loss is {total.item()} (lm {loss.lm.item()}, "
                                    f"start {loss.start.item()}, stop {loss.stop.item()}); lower sft.lr or check the data")
            self.optimizer.backward(total)
            for name, value in zip(totals, parts):
                totals[name] += value.item()
            tokens += int(batch.attention_mask.sum())
        grad_norm = self.optimizer.step(f"sft step {self.step + 1}")
        return {**totals, "grad_norm": grad_norm, "lr": self.optimizer.lr, "positions": tokens}

    def evaluate(self) -> dict[str, float]:
        """Diagnostics (`rlatent.sft.diagnostics`) on the eval split at the current curriculum stage."""
        evaluation = self.stages[self.curriculum.stage(max(self.step - 1, 0))][1]
        sums = latent_diagnostics(self.model, evaluation, self.pad_id, self.cfg, f"step {self.step}")
        self.logger.log(self.step, sums, phase="eval")
        return sums

    def resume(self, checkpoint: Path) -> None:
        """Continue from a checkpoint of this phase (the caller loads the model); the data position
        follows from the step, the first loss from metrics.jsonl (its first logged step's)."""
        self.step = restore_training_state(checkpoint, "sft", self.optimizer)
        self.first_loss = next((record["loss"] for record in read_metrics(self.run.metrics_path)
                                if record.get("phase") == "train"), None)

    def save_checkpoint(self) -> Path:
        path = self.run.checkpoint_path(self.step)
        with self.optimizer.full_parameters():
            return save_checkpoint(path, self.model, "sft", self.step, self.optimizer.state_dict())

