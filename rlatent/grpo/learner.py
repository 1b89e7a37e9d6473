"""The policy being trained in phase 2: its model, optimizer and the GRPO update.

The same object runs in the driver process (local backend) or inside a Ray
actor (ray backend); the loop in `rlatent.grpo.loop` talks to it through the
backend. An update takes `num_iterations` optimizer steps on one batch of
rollouts, each recomputing the actions' log-probs with the current weights
(`rlatent.latent.policy`) against the stored sampling log-probs
(`rlatent.grpo.losses`), accumulated over micro-batches with the full batch's
normaliser, so micro-batching does not change the gradient.

With beta > 0 every action kind that has a reference (`rlatent.grpo.reference`)
gets a KL term, logged per kind (`kl_token`, `kl_start`, ...). Updates run with
dropout off by default, and `ratio_first_max_deviation` logs how far the first
iteration's ratio is from 1 (0 to float tolerance when the old log-probs and
the training forward agree, which the tests check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import get_scheduler

from rlatent.grpo.reference import ReferencePolicy
from rlatent.latent.batch import LatentBatch
from rlatent.latent.policy import PolicyOutput, recompute_actions
from rlatent.latent.trajectory import ACTION_KINDS, Actions, Trajectories
from rlatent.config import RunConfig
from rlatent.errors import TrainingError
from rlatent.grpo.losses import grpo_loss, normaliser
from rlatent.model.latent_model import LatentModel
from rlatent.optim import build_optimizer
from rlatent.workers.weight_sync import load_trainable_state, trainable_state


def max_actions(cfg: RunConfig) -> int:
    """Dr. GRPO's constant per completion (`grpo.dr_grpo_constant`): the token budget, or the most actions a
    completion can hold (tokens, a start decision at every language position, a stop decision and a latent
    density at every latent)."""
    if cfg.grpo.dr_grpo_constant == "max_new_tokens":
        return cfg.grpo.max_new_tokens
    return 2 * cfg.grpo.max_new_tokens + 1 + 2 * cfg.latent.max_total_latents


@dataclass(frozen=True)
class BatchTotals:
    """Whole-batch quantities every micro-batch (and every learner rank) divides by."""

    normaliser: float  # the aggregation's divisor (`grpo.losses.normaliser`)
    actions: float  # real actions in the batch
    kinds: tuple[float, ...]  # actions of each kind (`ACTION_KINDS`) in the batch


def batch_totals(cfg: RunConfig, old: Actions) -> BatchTotals:
    """From the whole batch's stored actions."""
    _, mask_flat = old.flat()
    return BatchTotals(normaliser(mask_flat, cfg.grpo.loss_type, max_actions(cfg)), float(mask_flat.sum()),
                       tuple(float(n) for n in old.mask.sum((0, 1))))


class GRPOLearner:
    def __init__(self, cfg: RunConfig, model: LatentModel, trainable: dict[str, torch.Tensor] | None = None):
        """`trainable`: weights to load into `model` first (a Ray learner rank gets the driver's); the
        reference policy (`grpo.reference: initial`) is the policy as it stands after that."""
        g = cfg.grpo
        self.cfg, self.model = cfg, model
        self.optimizer = build_optimizer(
            cfg, model, g.lr, g.weight_decay, g.max_grad_norm,
            lambda opt: get_scheduler("constant_with_warmup", opt, num_warmup_steps=g.warmup_steps))
        if trainable is not None:
            self.load_trainable(trainable)
        self.reference = ReferencePolicy(g.reference, model) if g.beta > 0 else None

    def update(self, traj: Trajectories, advantages: torch.Tensor, step: int,
               totals: "BatchTotals | None" = None) -> dict[str, float]:
        """`step` (1-based) names the step in errors. `totals`: the whole batch's, when this learner is one
        rank of several and `traj` its share of the rows (default: `traj` is the whole batch). Each rank's
        loss is its share of the batch loss and its metrics its share of the batch's, so summing over
        ranks gives what one learner would compute."""
        g = self.cfg.grpo
        self.model.train(not g.disable_dropout)
        traj = traj.to(self.model.device)
        stored = traj.actions(g.latent_noise_std > 0)
        totals = totals or batch_totals(self.cfg, stored)
        advantages = advantages.to(self.model.device)
        micro_batches = [self.micro_batch(traj, stored, rows)
                         for rows in torch.arange(len(advantages), device=self.model.device).split(g.micro_batch_size)]
        sums: dict[str, float] = {}
        for iteration in range(g.num_iterations):
            for mb in micro_batches:
                new = self.recompute(mb)
                old_flat, mask_flat = mb.old.flat()
                new_flat = new.actions.flat()[0]
                kl = None if mb.reference is None else self.reference.kl(new, mb.reference, g.latent_noise_std)
                loss, stats = grpo_loss(
                    new_flat, old_flat, None if kl is None else kl.reshape(new_flat.shape), advantages[mb.rows],
                    mask_flat, loss_type=g.loss_type, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high,
                    beta=g.beta, max_actions=max_actions(self.cfg), normaliser=totals.normaliser,
                    kl_bias_correction=g.kl_bias_correction)
                if not torch.isfinite(loss):
                    raise TrainingError(f"grpo step {step}: loss is {loss.item()}; lower grpo.lr")
                self.optimizer.backward(loss)
                share = stats["actions"] / max(totals.actions, 1.0) / g.num_iterations
                for name in ("clip_low", "clip_high", "clip_fraction", "ratio_mean"):
                    _add(sums, name, stats[name] * share)
                if iteration == 0:
                    log_ratio = (new_flat.detach() - old_flat)[mask_flat]
                    _add(sums, "ratio_first_max_deviation", float(log_ratio.exp().sub(1).abs().max()) if
                         log_ratio.numel() else 0.0, reduce=max)
                if kl is not None:
                    for k, kind in enumerate(ACTION_KINDS):
                        counted = mb.reference.actions.mask[..., k]
                        if kind in self.reference.kinds:
                            _add(sums, f"kl_{kind}", float(kl[..., k].detach()[counted].sum()) /
                                 max(totals.kinds[k], 1.0) / g.num_iterations)
                    _add(sums, "kl", float(kl.detach().sum()) / max(totals.actions, 1.0) / g.num_iterations)
                _add(sums, "entropy", float(new.entropy.sum()) / max(totals.kinds[0], 1.0) / g.num_iterations)
                _add(sums, "loss", loss.item() / g.num_iterations)
            _add(sums, "grad_norm", self.optimizer.step() / g.num_iterations)
        sums["lr"] = self.optimizer.lr
        return sums

    def micro_batch(self, traj: Trajectories, stored: Actions, rows: torch.Tensor) -> "MicroBatch":
        """One micro-batch's rows, trimmed to their longest, with its old log-probs (`grpo.old_logprobs`)
        and, with a KL term, its reference outputs: both fixed for every iteration on this batch."""
        g = self.cfg.grpo
        batch = traj.batch.select(rows)
        width = batch.input_ids.shape[1]
        mb = MicroBatch(rows, batch, traj.slot_inputs[rows, :width], stored.select(rows, width))
        if g.old_logprobs == "recompute":
            with torch.no_grad():
                mb.old = self.recompute(mb).actions
        if self.reference is not None:
            mb.reference = self.reference.outputs(self.model, batch, mb.slot_inputs, mb.old.mask, g.temperature,
                                                  g.latent_noise_std, self.cfg.latent.pass_cost)
        return mb

    def recompute(self, mb: "MicroBatch") -> PolicyOutput:
        g = self.cfg.grpo
        return recompute_actions(self.model, mb.batch, mb.slot_inputs, mb.old.mask, g.temperature,
                                 g.latent_noise_std, self.cfg.latent.gradient, self.cfg.latent.pass_cost)

    # ---- what the driver reads and writes ------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights rollout workers need (see `rlatent.workers.weight_sync`)."""
        with self.optimizer.full_parameters():
            return trainable_state(self.model)

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        with self.optimizer.full_parameters():
            load_trainable_state(self.model, state)

    def checkpoint_state(self) -> dict:
        """Trainable weights, portable optimizer state and the frozen reference: the driver writes the
        checkpoint, so it lands in the run directory wherever the learner runs."""
        return {"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                "reference": {} if self.reference is None else self.reference.state_dict()}

    def load_training_state(self, optimizer: dict, reference: dict[str, torch.Tensor] | None) -> None:
        """What a resumed run restores besides the weights: the optimizer and the reference it started with."""
        self.optimizer.load_state_dict(optimizer)
        if self.reference is not None and reference:
            self.reference.load_state_dict(reference)


@dataclass
class MicroBatch:
    rows: torch.Tensor  # (b,) indices into the step's batch
    batch: LatentBatch  # those rows, trimmed to their longest
    slot_inputs: torch.Tensor  # (b, T, H) stored latent inputs
    old: Actions  # (b, T, K) the ratio's denominators and which actions exist
    reference: PolicyOutput | None = None  # the reference's outputs, with a KL term


def _add(sums: dict[str, float], name: str, value: float, reduce=lambda a, b: a + b) -> None:
    sums[name] = reduce(sums[name], value) if name in sums else value
