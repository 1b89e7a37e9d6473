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

import time
from dataclasses import dataclass

import torch
from transformers import get_scheduler

from rlatent.grpo.reference import ReferencePolicy
from rlatent.latent.batch import LatentBatch
from rlatent.latent.policy import PolicyOutput, recompute_actions
from rlatent.latent.trajectory import ACTION_KINDS, Actions, Trajectories, kinds_mask
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

    normalisers: tuple[float, ...]  # each loss part's divisor (`loss_parts`, `grpo.losses.normaliser`)
    actions: float  # real actions in the batch
    kinds: tuple[float, ...]  # actions of each kind (`ACTION_KINDS`) in the batch


def batch_totals(cfg: RunConfig, old: Actions) -> BatchTotals:
    """From the whole batch's stored actions."""
    rows = old.mask.shape[0]
    normalisers = tuple(normaliser(kinds_mask(old.mask, part.kinds).reshape(rows, -1), part.loss_type,
                                   max_actions(cfg)) for part in loss_parts(cfg))
    return BatchTotals(normalisers, float(old.mask.sum()), tuple(float(n) for n in old.mask.sum((0, 1))))


@dataclass(frozen=True)
class LossPart:
    kinds: tuple[str, ...]  # the action kinds aggregated together
    loss_type: str  # their aggregation (`grpo.losses.AGGREGATIONS`)
    weight: float


def loss_parts(cfg: RunConfig) -> list[LossPart]:
    """How the actions are aggregated (`grpo.decision_loss`). `joint`: every action by `grpo.loss_type`, a
    start decision counting like a token. `decoupled` (Thinkless's decoupled GRPO, arXiv 2505.13379): tokens
    by `grpo.loss_type`, and the decisions and latents apart, token-level over their own count and weighted
    by `grpo.decision_weight`, so a handful of start decisions is not drowned by hundreds of tokens."""
    g = cfg.grpo
    if g.decision_loss == "joint":
        return [LossPart(ACTION_KINDS, g.loss_type, 1.0)]
    return [LossPart(("token",), g.loss_type, 1.0), LossPart(DECISION_KINDS, "dapo", g.decision_weight)]


DECISION_KINDS = ("start", "stop", "latent")


def partitioned_loss(logprobs: torch.Tensor, old: torch.Tensor, kl: torch.Tensor | None, advantages: torch.Tensor,
                     mask: torch.Tensor, parts: list[LossPart], normalisers: tuple[float, ...],
                     **clip_and_kl) -> tuple[torch.Tensor, dict[str, float]]:
    """One GRPO loss per part of the actions, each over its own kinds with its whole-batch normaliser,
    weighted and summed. logprobs, old, kl, mask: (B, T, K); advantages (B,). Stats are action-weighted
    averages over the parts (and `actions`, their count)."""
    rows = mask.shape[0]
    flat = lambda x: None if x is None else x.reshape(rows, -1)  # noqa: E731 - (B, T, K) -> (B, T*K)
    loss, sums = logprobs.sum() * 0.0, {}
    for part, part_normaliser in zip(parts, normalisers):
        part_mask = kinds_mask(mask, part.kinds)
        if not part_mask.any():
            continue
        part_loss, stats = grpo_loss(flat(logprobs), flat(old), flat(kl), advantages, flat(part_mask),
                                     loss_type=part.loss_type, normaliser=part_normaliser, **clip_and_kl)
        loss = loss + part.weight * part_loss
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + (value if name == "actions" else value * stats["actions"])
    actions = max(sums.get("actions", 0.0), 1.0)
    return loss, {name: value if name == "actions" else value / actions for name, value in sums.items()}


class GRPOLearner:
    def __init__(self, cfg: RunConfig, model: LatentModel, trainable: dict[str, torch.Tensor] | None = None):
        """`trainable`: weights to load into `model` first (a Ray learner rank gets the driver's); the
        reference policy (`grpo.reference: initial`) is the policy as it stands after that."""
        g = cfg.grpo
        self.cfg, self.model = cfg, model
        self.optimizer = build_optimizer(
            cfg.deepspeed, model, g.lr, g.weight_decay, g.max_grad_norm,
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
        clock = _Clock(self.model.device)
        micro_batches = self.micro_batches(traj, stored, clock)
        sums: dict[str, float] = {}
        for iteration in range(g.num_iterations):
            for mb in micro_batches:
                new = self.recompute(mb)
                kl = None if mb.reference is None else self.reference.kl(new, mb.reference, g.latent_noise_std,
                                                                         g.kl_bias_correction)
                loss, stats = self.loss(mb, new, kl, advantages[mb.rows], totals)
                if not torch.isfinite(loss):
                    raise TrainingError(f"grpo step {step}: loss is {loss.item()}; lower grpo.lr")
                clock.lap("forward")
                self.optimizer.backward(loss)
                self.log_micro_batch(sums, mb, new, kl, loss, stats, totals, first=iteration == 0)
                clock.lap("backward")
            _add(sums, "grad_norm", self.optimizer.step(f"grpo step {step}") / g.num_iterations)
            clock.lap("optimizer")
        sums["lr"] = self.optimizer.lr
        sums.update(clock.totals)
        return sums

    def loss(self, mb: "MicroBatch", new: PolicyOutput, kl: torch.Tensor | None, advantages: torch.Tensor,
             totals: BatchTotals) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's share of the batch loss (`partitioned_loss` over `loss_parts`)."""
        g = self.cfg.grpo
        return partitioned_loss(new.actions.logprobs, mb.old.logprobs, kl, advantages, mb.old.mask,
                                loss_parts(self.cfg), totals.normalisers, epsilon_low=g.epsilon_low,
                                epsilon_high=g.epsilon_high, beta=g.beta, max_actions=max_actions(self.cfg),
                                kl_bias_correction=g.kl_bias_correction)

    def log_micro_batch(self, sums: dict[str, float], mb: "MicroBatch", new: PolicyOutput, kl: torch.Tensor | None,
                        loss: torch.Tensor, stats: dict[str, float], totals: BatchTotals, first: bool) -> None:
        """Add the micro-batch's share of each step metric (shares of the whole batch, so ranks add up)."""
        iterations = self.cfg.grpo.num_iterations
        share = stats.get("actions", 0.0) / max(totals.actions, 1.0) / iterations
        for name in ("clip_low", "clip_high", "clip_fraction", "ratio_mean"):
            _add(sums, name, stats.get(name, 0.0) * share)
        if first:
            log_ratio = (new.actions.logprobs.detach() - mb.old.logprobs)[mb.old.mask]
            deviation = float(log_ratio.exp().sub(1).abs().max()) if log_ratio.numel() else 0.0
            _add(sums, "ratio_first_max_deviation", deviation, reduce=max)
        if kl is not None:
            for k, kind in enumerate(ACTION_KINDS):
                if kind in self.reference.kinds:
                    counted = mb.reference.actions.mask[..., k]
                    _add(sums, f"kl_{kind}", float(kl[..., k].detach()[counted].sum()) /
                         max(totals.kinds[k], 1.0) / iterations)
            _add(sums, "kl", float(kl.detach().sum()) / max(totals.actions, 1.0) / iterations)
        _add(sums, "entropy", float(new.entropy.sum()) / max(totals.kinds[0], 1.0) / iterations)
        _add(sums, "loss", loss.item() / iterations)

    def micro_batches(self, traj: Trajectories, stored: Actions, clock: "_Clock") -> list["MicroBatch"]:
        """The update's micro-batches (`grpo.micro_batch_size` rows, trimmed to their longest), each with its old
        log-probs (`grpo.old_logprobs`) and, with a KL term, its reference outputs: both fixed for every
        iteration on this batch, and computed without gradient over wider slices of rows
        (`grpo.logprob_micro_batch_size`, a multiple of the micro-batch)."""
        g = self.cfg.grpo
        rows = torch.arange(traj.batch.input_ids.shape[0], device=self.model.device)
        wide = -(-g.logprob_micro_batch_size // g.micro_batch_size) * g.micro_batch_size
        micro_batches = []
        for slice_rows in rows.split(wide):
            whole = self.micro_batch(traj, stored, slice_rows, clock)
            for part in slice_rows.split(g.micro_batch_size):
                local = part - slice_rows[0]
                width = int(whole.batch.lengths[local].max())
                micro_batches.append(MicroBatch(
                    part, whole.batch.select(local), whole.slot_inputs[local, :width], whole.old.select(local, width),
                    None if whole.reference is None else whole.reference.select(local, width)))
        return micro_batches

    def micro_batch(self, traj: Trajectories, stored: Actions, rows: torch.Tensor, clock: "_Clock") -> "MicroBatch":
        """`rows`, trimmed to their longest, with their old log-probs and reference outputs (no gradient)."""
        g = self.cfg.grpo
        batch = traj.batch.select(rows)
        width = batch.input_ids.shape[1]
        mb = MicroBatch(rows, batch, traj.slot_inputs[rows, :width], stored.select(rows, width))
        if g.old_logprobs == "recompute":
            with torch.no_grad():
                mb.old = self.recompute(mb).actions
            clock.lap("old_logprobs")
        if self.reference is not None:
            mb.reference = self.reference.outputs(self.model, batch, mb.slot_inputs, mb.old.mask, g.temperature,
                                                  g.latent_noise_std, self.cfg.latent.pass_cost)
            clock.lap("reference")
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


class _Clock:
    """Wall time of the update's parts (`time_update_<part>` in the step's metrics): where a step goes,
    without a profiler. On a GPU each lap waits for the queued work first, so it is charged to the part
    that queued it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, part: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        name = f"time_update_{part}"
        self.totals[name] = self.totals.get(name, 0.0) + now - self.last
        self.last = now


def _add(sums: dict[str, float], name: str, value: float, reduce=lambda a, b: a + b) -> None:
    sums[name] = reduce(sums[name], value) if name in sums else value
