"""Phase 2: GRPO with verifiable rewards on the latent policy.

One step, top to bottom:
1. rollout: G completions per prompt from the latent sampler, with sampled
   start/stop decisions, tokens (temperature, top-p) and optional exploration
   noise on latents; the sampler stores the log-prob of every action;
2. reward: every configured reward scores the batch; the weighted sum gives
   group-relative advantages;
3. update: `num_iterations` optimizer steps on the batch, each recomputing the
   actions' log-probs with the current weights (`rlatent.actions`) and taking
   the clipped-ratio loss against the stored sampling log-probs
   (`rlatent.grpo_losses`), accumulated over micro-batches with the full
   batch's normaliser, so micro-batching does not change the gradient.

KL (beta > 0) is taken on token actions against the base with adapters
disabled, evaluated on the sampled sequence (stored latents as inputs).
Decisions and latents have no KL term: the heads have no reference copy.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import get_scheduler

from rlatent.actions import ACTION_KINDS, Actions, recompute_actions, stored_actions
from rlatent.checkpoint import restore_training_state, save_checkpoint
from rlatent.batch import LatentBatch
from rlatent.config import RunConfig
from rlatent.data import Problem
from rlatent.errors import TrainingError
from rlatent.examples import format_prompt, special_token_ids
from rlatent.grpo_losses import group_advantages, grpo_loss, normaliser
from rlatent.latent_model import LatentModel
from rlatent.reward_fns import RewardSet, reward_stats
from rlatent.run_dir import MetricsLogger, RunDir
from rlatent.sampler import SamplingSettings, Trajectories, sample

def max_actions(cfg: RunConfig) -> int:
    """Dr. GRPO's constant: the most actions a completion can hold (tokens, a start decision at every
    language position, a stop decision and a latent density at every latent)."""
    return 2 * cfg.grpo.max_new_tokens + 1 + 2 * cfg.latent.max_total_latents


def prompt_order(count: int, step: int, per_step: int, seed: int) -> list[int]:
    """Problem indices for `step`: epochs of a seeded permutation, so a resumed run sees the same prompts."""
    indices = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(i, count)
        permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
        indices.append(int(permutation[offset]))
    return indices


class GRPOTrainer:
    def __init__(self, cfg: RunConfig, model: LatentModel, tokenizer, problems: list[Problem], run: RunDir,
                 logger: MetricsLogger, checkpoint_offset: int = 0):
        """`checkpoint_offset`: steps already checkpointed in this run directory by phase 1, so that
        checkpoint numbers keep growing across phases and the latest is always the newest."""
        if not problems:
            raise TrainingError("grpo: no training problems")
        self.cfg, self.model, self.tokenizer, self.problems, self.run, self.logger = (
            cfg, model, tokenizer, problems, run, logger)
        self.eos_id, self.pad_id = special_token_ids(tokenizer)
        self.rewards = RewardSet(cfg.grpo.rewards, cfg.grpo.reward_errors)
        self.params = model.trainable_parameters()
        g = cfg.grpo
        self.optimizer = torch.optim.AdamW(self.params, lr=g.lr, weight_decay=g.weight_decay)
        self.scheduler = get_scheduler("constant_with_warmup", self.optimizer, num_warmup_steps=g.warmup_steps)
        self.settings = SamplingSettings(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, decisions="sample",
            max_latents_per_block=cfg.latent.max_latents_per_block, max_blocks=cfg.latent.max_blocks,
            max_total_latents=cfg.latent.max_total_latents, latent_noise_std=g.latent_noise_std,
        )
        self.step = 0
        self.checkpoint_offset = checkpoint_offset

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> Path:
        g = self.cfg.grpo
        progress = tqdm(total=g.steps, initial=self.step, desc="grpo", dynamic_ncols=True)
        checkpoint = None
        while self.step < g.steps:
            metrics = self.train_step()
            self.step += 1
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics.get('accuracy', 0):.2f}")
            if self.step % g.log_every == 0:
                self.logger.log(self.step, metrics, phase="grpo")
            if g.save_every and self.step % g.save_every == 0 or self.step == g.steps:
                checkpoint = self.save_checkpoint()
        progress.close()
        return checkpoint or self.save_checkpoint()

    def train_step(self) -> dict[str, float]:
        g = self.cfg.grpo
        started = time.perf_counter()
        chosen = [self.problems[i] for i in prompt_order(len(self.problems), self.step, g.prompts_per_step,
                                                          self.cfg.seed)]
        group = [p for p in chosen for _ in range(g.group_size)]  # (P*G,), groups consecutive
        traj = self.rollout(group)
        rolled = time.perf_counter()
        rewards, reward_metrics = self.score(group, traj)
        scored = time.perf_counter()
        advantages = group_advantages(rewards, g.group_size, g.scale_rewards)
        metrics = self.update(traj, advantages)
        updated = time.perf_counter()
        metrics.update(reward_metrics)
        metrics.update(self.trajectory_metrics(traj, advantages))
        metrics.update({"time_rollout": rolled - started, "time_reward": scored - rolled, "time_update": updated - scored,
                        "lr": self.scheduler.get_last_lr()[0]})
        return metrics

    # ---- the three stages -------------------------------------------------------------------

    def rollout(self, problems: list[Problem]) -> Trajectories:
        self.model.eval()
        prompts = [format_prompt(p.question, self.tokenizer) for p in problems]
        return sample(self.model, prompts, self.eos_id, self.pad_id, self.settings)

    def score(self, problems: list[Problem], traj: Trajectories) -> tuple[torch.Tensor, dict[str, float]]:
        counts = traj.counts()
        completions = [self.tokenizer.decode(traj.completion_ids(row), skip_special_tokens=True)
                       for row in range(len(problems))]
        prompts = [p.question for p in problems]
        facts = {
            "latents": counts["latents"].tolist(), "blocks": counts["blocks"].tolist(),
            "tokens": counts["tokens"].tolist(),
            "forward_passes": (counts["latents"] + counts["tokens"]).tolist(),
            "truncated": (~traj.finished).tolist(),
            "question": prompts, "answer": [p.final_answer for p in problems], "source": [p.source for p in problems],
        }
        total, per_reward, zeroed = self.rewards.score(prompts, completions, facts)
        metrics = reward_stats(per_reward)
        metrics.update({f"reward/{name}_zeroed": float(n) for name, n in zeroed.items()})
        rewards = torch.tensor(total, dtype=torch.float32)
        metrics["reward_mean"] = float(rewards.mean())
        metrics["reward_std"] = float(rewards.std(unbiased=False))
        if "gsm8k_correct" in per_reward:
            metrics["accuracy"] = sum(per_reward["gsm8k_correct"]) / len(problems)
        return rewards, metrics

    def update(self, traj: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        g = self.cfg.grpo
        self.model.train()
        batch = traj.batch
        old = stored_actions(traj, g.latent_noise_std > 0)
        _, mask_flat = old.flat()
        limit = max_actions(self.cfg)
        norm = normaliser(mask_flat, g.loss_type, limit)
        advantages = advantages.to(self.model.device)
        reference = self.reference_token_logprobs(traj, old) if g.beta > 0 else None
        sums: dict[str, float] = {}
        for _ in range(g.num_iterations):
            for rows in torch.arange(len(advantages), device=self.model.device).split(g.micro_batch_size):
                sub = select_rows(batch, rows)
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
                    normaliser=norm)
                if not torch.isfinite(loss):
                    raise TrainingError(f"grpo step {self.step + 1}: loss is {loss.item()}; lower grpo.lr")
                loss.backward()
                weight = stats["actions"] / max(float(mask_flat.sum()), 1.0) / g.num_iterations
                for name in ("clip_low", "clip_high", "clip_fraction", "ratio_mean", "kl"):
                    if name in stats:
                        sums[name] = sums.get(name, 0.0) + stats[name] * weight
                sums["entropy"] = sums.get("entropy", 0.0) + float(entropy.sum()) / max(float(old.mask[..., 0].sum()), 1.0) / g.num_iterations
                sums["loss"] = sums.get("loss", 0.0) + loss.item() / g.num_iterations
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, g.max_grad_norm)) / g.num_iterations
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
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

    # ---- logging and state ------------------------------------------------------------------

    def trajectory_metrics(self, traj: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        counts = traj.counts()
        old = stored_actions(traj, self.cfg.grpo.latent_noise_std > 0)
        metrics = {
            "latents_per_completion": float(counts["latents"].float().mean()),
            "blocks_per_completion": float(counts["blocks"].float().mean()),
            "tokens_per_completion": float(counts["tokens"].float().mean()),
            "truncated": float((~traj.finished).float().mean()),
            "advantage_mean": float(advantages.mean()), "advantage_std": float(advantages.std(unbiased=False)),
            "advantage_abs_max": float(advantages.abs().max()),
        }
        start_mask, start_labels, stop_mask, stop_labels = traj.batch.decision_labels()
        free_start, free_stop = traj.start_decided, traj.stop_decided
        metrics["start_rate"] = float(start_labels[free_start].mean()) if free_start.any() else 0.0
        metrics["stop_rate"] = float(stop_labels[free_stop].mean()) if free_stop.any() else 0.0
        total = old.logprobs.sum()
        for k, kind in enumerate(ACTION_KINDS):
            kind_sum = old.logprobs[..., k][old.mask[..., k]].sum()
            metrics[f"logprob_share_{kind}"] = float(kind_sum / total) if total != 0 else 0.0
            metrics[f"actions_{kind}"] = float(old.mask[..., k].sum())
        return metrics

    def save_checkpoint(self) -> Path:
        path = self.run.checkpoint_path(self.checkpoint_offset + self.step)
        return save_checkpoint(path, self.model, "grpo", self.step, self.optimizer, self.scheduler)

    def resume(self, checkpoint: Path) -> None:
        """Continue from a checkpoint of this phase (the caller loads the model); the data position
        follows from the step."""
        self.step = restore_training_state(checkpoint, "grpo", self.optimizer, self.scheduler)


def select_rows(batch: LatentBatch, rows: torch.Tensor) -> LatentBatch:
    """A sub-batch, trimmed to its own longest row."""
    width = int(batch.lengths[rows].max())
    return LatentBatch(batch.input_ids[rows, :width], batch.latent_mask[rows, :width],
                       batch.attention_mask[rows, :width], batch.prompt_lengths[rows])
