"""The policy being trained in phase 2: its model, optimizer and the GRPO update.

The same object runs in the driver process (local backend) or inside a Ray
actor (ray backend); the loop in `rlatent.grpo.loop` talks to it through the
backend. An update takes `num_iterations` optimizer steps on one batch of
rollouts, each recomputing the actions' log-probs with the current weights
(`rlatent.latent.policy`) against the stored sampling log-probs
(`rlatent.grpo.losses`), accumulated over micro-batches with the full batch's
normaliser, so micro-batching does not change the gradient.

KL (beta > 0) is taken on token actions against the base with adapters
disabled, evaluated on the sampled sequence (stored latents as inputs).
Decisions and latents have no KL term: the heads have no reference copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import get_scheduler

from rlatent.latent.policy import recompute_actions
from rlatent.latent.trajectory import Actions, Trajectories
from rlatent.config import RunConfig
from rlatent.errors import TrainingError
from rlatent.grpo.losses import grpo_loss, normaliser
from rlatent.model.latent_model import LatentModel
from rlatent.optim import build_optimizer
from rlatent.workers.weight_sync import load_trainable_state, trainable_state


def max_actions(cfg: RunConfig) -> int:
    """Dr. GRPO's constant: the most actions a completion can hold (tokens, a start decision at every
    language position, a stop decision and a latent density at every latent)."""
    return 2 * cfg.grpo.max_new_tokens + 1 + 2 * cfg.latent.max_total_latents


@dataclass(frozen=True)
class BatchTotals:
    """Whole-batch quantities every micro-batch (and every learner rank) divides by."""

    normaliser: float  # the aggregation's divisor (`grpo_losses.normaliser`)
    actions: float  # real actions in the batch
    tokens: float  # token actions in the batch


def batch_totals(cfg: RunConfig, old: Actions) -> BatchTotals:
    """From the whole batch's stored actions."""
    _, mask_flat = old.flat()
    return BatchTotals(normaliser(mask_flat, cfg.grpo.loss_type, max_actions(cfg)), float(mask_flat.sum()),
                       float(old.mask[..., 0].sum()))


class GRPOLearner:
    def __init__(self, cfg: RunConfig, model: LatentModel):
        g = cfg.grpo
        self.cfg, self.model = cfg, model
        self.optimizer = build_optimizer(
            cfg, model, g.lr, g.weight_decay, g.max_grad_norm,
            lambda opt: get_scheduler("constant_with_warmup", opt, num_warmup_steps=g.warmup_steps))

    def update(self, traj: Trajectories, advantages: torch.Tensor, step: int,
               totals: "BatchTotals | None" = None) -> dict[str, float]:
        """`step` (1-based) names the step in errors. `totals`: the whole batch's, when this learner is one
        rank of several and `traj` its share of the rows (default: `traj` is the whole batch). Each rank's
        loss is its share of the batch loss and its metrics its share of the batch's, so summing over
        ranks gives what one learner would compute."""
        g = self.cfg.grpo
        self.model.train()
        traj = traj.to(self.model.device)
        batch = traj.batch
        old = traj.actions(g.latent_noise_std > 0)
        totals = totals or batch_totals(self.cfg, old)
        limit = max_actions(self.cfg)
        advantages = advantages.to(self.model.device)
        reference = self.reference_token_logprobs(traj, old) if g.beta > 0 else None
        sums: dict[str, float] = {}
        for _ in range(g.num_iterations):
            for rows in torch.arange(len(advantages), device=self.model.device).split(g.micro_batch_size):
                sub = batch.select(rows)
                width = sub.input_ids.shape[1]  # micro-batches are trimmed to their own longest row
                sub_old = old.select(rows, width)
                new, entropy = recompute_actions(
                    self.model, sub, traj.slot_inputs[rows, :width], sub_old.mask, g.temperature,
                    g.latent_noise_std, self.cfg.latent.gradient, self.cfg.latent.pass_cost)
                old_flat, mask_flat_sub = sub_old.flat()
                ref_flat = None if reference is None else reference.select(rows, width).flat()[0]
                loss, stats = grpo_loss(
                    new.flat()[0], old_flat, ref_flat, advantages[rows], mask_flat_sub, loss_type=g.loss_type,
                    epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, beta=g.beta, max_actions=limit,
                    normaliser=totals.normaliser)
                if not torch.isfinite(loss):
                    raise TrainingError(f"grpo step {step}: loss is {loss.item()}; lower grpo.lr")
                self.optimizer.backward(loss)
                weight = stats["actions"] / max(totals.actions, 1.0) / g.num_iterations
                for name in ("clip_low", "clip_high", "clip_fraction", "ratio_mean", "kl"):
                    if name in stats:
                        sums[name] = sums.get(name, 0.0) + stats[name] * weight
                sums["entropy"] = sums.get("entropy", 0.0) + float(entropy.sum()) / max(totals.tokens, 1.0) / g.num_iterations
                sums["loss"] = sums.get("loss", 0.0) + loss.item() / g.num_iterations
            sums["grad_norm"] = self.optimizer.step() / g.num_iterations
        sums["lr"] = self.optimizer.lr
        return sums

    @torch.no_grad()
    def reference_token_logprobs(self, traj: Trajectories, old: Actions) -> Actions:
        """Token log-probs under the reference (adapters off), on the sampled sequence and latents."""
        token_only = old.mask.clone()
        token_only[..., 1:] = False
        with self.model.adapters_disabled():
            reference, _ = recompute_actions(self.model, traj.batch, traj.slot_inputs, token_only,
                                             self.cfg.grpo.temperature, 0.0, "detached", self.cfg.latent.pass_cost)
        return Actions(reference.logprobs, old.mask)

    # ---- what the driver reads and writes ------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights rollout workers need (see `rlatent.workers.weight_sync`)."""
        with self.optimizer.full_parameters():
            return trainable_state(self.model)

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        with self.optimizer.full_parameters():
            load_trainable_state(self.model, state)

    def checkpoint_state(self) -> dict:
        """Trainable weights and portable optimizer state: the driver writes the checkpoint, so it lands in
        the run directory wherever the learner runs."""
        return {"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
