"""Phase 2: GRPO with verifiable rewards on the latent policy.

One step, top to bottom:
1. rollout: G completions per prompt, sampled in seeded chunks of whole groups
   (`rlatent.workers.rollout`) with sampled start/stop decisions, tokens (temperature,
   top-p) and optional exploration noise on latents; the sampler stores the
   log-prob of every action and each chunk carries the weights' version;
2. reward: every configured reward scores the batch; the weighted sum gives
   group-relative advantages. With `grpo.dynamic_sampling_rounds` > 1, groups
   whose rewards are all equal (no advantage) are replaced by groups of further
   rounds of prompts (`rlatent.grpo.dynamic_sampling`);
3. update: the learner's GRPO update (`rlatent.grpo.learner`), then the new
   trainable weights go to engines that hold their own copy.

The backend (`distributed.backend`) decides where each stage runs: in this
process (`rlatent.distributed.local_backend`) or on Ray actors (`rlatent.distributed.ray_backend`).
With `distributed.async_rollouts` the next step's rollouts are launched before
the update (one step off-policy; the ratio is against the stored sampling
log-probs), on either backend.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from rlatent.config import RunConfig
from rlatent.data.gsm8k import Problem
from rlatent.errors import LearnerFailure, TrainingError
from rlatent.data.grading import answer_concentration, flexible_extract, strict_match
from rlatent.data.examples import format_prompt, special_token_ids
from rlatent.data.marks import extract_final_answer
from rlatent.grpo.dynamic_sampling import (ScoredRound, assemble, enough_informative, informative_groups,
                                           pick_groups)
from rlatent.grpo.losses import group_advantages
from rlatent.model.latent_model import LatentModel
from rewards.registry import reward_stats
from rlatent.workers.rollout import STREAM_OFFSET, make_chunks
from rlatent.io.run_dir import MetricsLogger, RunDir
from rlatent.latent.trajectory import ACTION_KINDS, Trajectories


def prompt_order(count: int, step: int, per_step: int, seed: int, stream: int = 0) -> list[int]:
    """Problem indices for `step`: epochs of a seeded permutation, so a resumed run sees the same prompts.
    `stream` 1 is the second sequence dynamic sampling's further rounds draw from."""
    indices = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(i, count)
        generator = torch.Generator().manual_seed(seed + epoch + stream * STREAM_OFFSET)
        indices.append(int(torch.randperm(count, generator=generator)[offset]))
    return indices


class GRPOTrainer:
    def __init__(self, cfg: RunConfig, model: LatentModel, tokenizer, problems: list[Problem], run: RunDir,
                 logger: MetricsLogger, backend, checkpoint_offset: int = 0):
        """`backend`: where rollouts, rewards and updates run (`rlatent.distributed.make_backend`).
        `checkpoint_offset`: steps already checkpointed in this run directory by phase 1, so that
        checkpoint numbers keep growing across phases and the latest is always the newest."""
        if not problems:
            raise TrainingError("grpo: no training problems")
        self.cfg, self.model, self.tokenizer, self.problems, self.run, self.logger = (
            cfg, model, tokenizer, problems, run, logger)
        self.eos_id, self.pad_id = special_token_ids(tokenizer)
        self.backend = backend
        self.step = 0
        self.checkpoint_offset = checkpoint_offset

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> Path:
        """Run the remaining steps; returns the last checkpoint. The backend is closed at the end, also on
        errors (Ray actors do not outlive the run)."""
        g = self.cfg.grpo
        progress = tqdm(total=g.steps, initial=self.step, desc="grpo", dynamic_ncols=True)
        checkpoint = None
        try:
            self.backend.sync(self.step)
            launched = self.launch(self.step, version=self.step) if self.step < g.steps else None
            while self.step < g.steps:
                started = time.perf_counter()
                metrics, launched = self.train_step(launched)
                metrics["step_seconds"] = time.perf_counter() - started  # with async rollouts: overlapped
                self.step += 1
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics.get('accuracy', 0):.2f}")
                if self.step % g.log_every == 0:
                    self.logger.log(self.step, metrics, phase="grpo")
                if g.save_every and self.step % g.save_every == 0 or self.step == g.steps:
                    checkpoint = self.save_checkpoint()
            checkpoint = checkpoint or self.save_checkpoint()
            self.backend.finish(self.model)
        except LearnerFailure as exc:
            raise TrainingError(f"{exc}; the run stopped at step {self.step}. {self.rescue_checkpoint()}") from None
        finally:
            progress.close()
            self.backend.close()
        return checkpoint

    def launch(self, step: int, version: int, round_index: int = 0):
        """Start sampling `step`'s prompts with the weights the engines hold now, which must be `version`
        (the learner's steps so far); a chunk sampled with other weights is refused. Round 0 is the step's
        own prompts; round r > 0 of dynamic sampling takes the next `prompts_per_step` of the second stream."""
        g = self.cfg.grpo
        count = len(self.problems)
        if round_index == 0:
            order = prompt_order(count, step, g.prompts_per_step, self.cfg.seed)
        else:
            extra = g.dynamic_sampling_rounds - 1
            order = prompt_order(count, step * extra + round_index - 1, g.prompts_per_step, self.cfg.seed, stream=1)
        group = [self.problems[i] for i in order for _ in range(g.group_size)]  # (P*G,), groups consecutive
        prompts = [format_prompt(p.question, self.tokenizer) for p in group]
        chunks = make_chunks(prompts, g.group_size, self.cfg.rollout_chunks(), self.cfg.seed, step, round_index)
        return group, version, time.perf_counter(), self.backend.launch(chunks, version)

    def train_step(self, launched) -> tuple[dict[str, float], object]:
        """One step on the rollouts `launched` for it (plus dynamic sampling's further rounds); returns its
        metrics and the next step's launch."""
        g = self.cfg.grpo
        group, version, started, handle = launched
        parts, rollout_metrics = self.backend.collect(handle, version)
        rolled = time.perf_counter()
        rounds = [self.score(group, Trajectories.concat(parts, self.pad_id))]
        scored = time.perf_counter()
        while len(rounds) < g.dynamic_sampling_rounds and not enough_informative(rounds, g.group_size,
                                                                                 g.prompts_per_step):
            extra_group, _, _, handle = self.launch(self.step, version=self.step, round_index=len(rounds))
            parts, more_metrics = self.backend.collect(handle, self.step)
            rollout_metrics.update(more_metrics)
            rounds.append(self.score(extra_group, Trajectories.concat(parts, self.pad_id)))
        resampled = time.perf_counter()
        next_step = self.step + 1
        overlap = self.cfg.distributed.async_rollouts and next_step < g.steps
        upcoming = self.launch(next_step, version=self.step) if overlap else None  # pre-update weights
        picks = pick_groups(rounds, g.group_size, g.prompts_per_step)
        traj, rewards = assemble(rounds, picks, g.group_size, self.pad_id)
        advantages = group_advantages(rewards, g.group_size, g.scale_rewards, g.advantage_std)
        metrics = self.backend.update(traj, advantages, next_step)
        updated = time.perf_counter()
        metrics.update(self.backend.sync(next_step))
        if not overlap and next_step < g.steps:
            upcoming = self.launch(next_step, version=next_step)
        metrics.update(rollout_metrics)
        metrics.update(self.reward_metrics(rounds))
        metrics.update(self.trajectory_metrics(traj, advantages))
        metrics.update({"sampling_rounds": float(len(rounds)),
                        "groups_informative": float(informative_groups(rewards, g.group_size).sum()),
                        "time_rollout": rolled - started, "time_reward": scored - rolled,
                        "time_resample": resampled - scored, "time_update": updated - resampled,
                        "policy_lag": float(self.step - version)})
        return metrics, upcoming

    def score(self, problems: list[Problem], traj: Trajectories) -> ScoredRound:
        counts = traj.counts()
        completions = [self.tokenizer.decode(traj.completion_ids(row), skip_special_tokens=True)
                       for row in range(len(problems))]
        prompts = [p.question for p in problems]
        facts = {
            "latents": counts["latents"].tolist(), "blocks": counts["blocks"].tolist(),
            "tokens": counts["tokens"].tolist(),
            "forward_passes": (counts["latents"] + counts["tokens"]).tolist(),
            "truncated": (~traj.finished).tolist(),
            "question": prompts, "answer": [p.final_answer for p in problems], "solution": [p.answer for p in problems],
            "source": [p.source for p in problems],
        }
        total, per_reward, zeroed = self.backend.score(prompts, completions, facts, self.cfg.grpo.group_size)
        return ScoredRound(problems, traj, torch.tensor(total, dtype=torch.float32), per_reward, zeroed, completions)

    def reward_metrics(self, rounds: list[ScoredRound]) -> dict[str, float]:
        """Rewards and accuracy over every rollout the step sampled (all rounds): the policy's, not the
        update's selection."""
        problems = [p for r in rounds for p in r.problems]
        completions = [c for r in rounds for c in r.completions]
        answers = [p.final_answer for p in problems]
        per_reward = {name: [v for r in rounds for v in r.per_reward[name]] for name in rounds[0].per_reward}
        rewards = torch.cat([r.rewards for r in rounds])
        metrics = reward_stats(per_reward)
        metrics.update({f"reward/{name}_zeroed": float(sum(r.zeroed[name] for r in rounds))
                        for name in rounds[0].zeroed})
        metrics["reward_mean"] = float(rewards.mean())
        metrics["reward_std"] = float(rewards.std(unbiased=False))
        if "gsm8k_correct" in per_reward:
            metrics["accuracy"] = sum(per_reward["gsm8k_correct"]) / len(problems)
        # lm-evaluation-harness's two GSM8K filters, so rollout accuracy compares with published tables.
        metrics["strict_match"] = sum(map(strict_match, completions, answers)) / len(problems)
        metrics["flexible_extract"] = sum(map(flexible_extract, completions, answers)) / len(problems)
        # A policy that learns one answer for every problem shows here before it shows in an evaluation.
        finished = [done for r in rounds for done in r.traj.finished.tolist()]
        predicted = [extract_final_answer(text, done) for text, done in zip(completions, finished)]
        metrics.update(answer_concentration(predicted, answers))
        metrics["groups_drawn"] = float(len(problems) // self.cfg.grpo.group_size)
        return metrics

    # ---- logging and state ------------------------------------------------------------------

    def trajectory_metrics(self, traj: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        counts = traj.counts()
        old = traj.actions(self.cfg.grpo.latent_noise_std > 0)
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
        return self.backend.save_checkpoint(self.run.checkpoint_path(self.checkpoint_offset + self.step), self.step)

    def rescue_checkpoint(self) -> str:
        """After a learner failure: a checkpoint of the last completed step (from the learner's snapshot)
        where possible, and how to continue."""
        try:
            path = self.save_checkpoint()
        except TrainingError:
            path = self.run.latest_checkpoint()
        if path is None:
            return f"No checkpoint was written; start again, or resume from phase 1 with `--resume {self.run.path}`."
        return f"Latest checkpoint: {path}; continue with the same command and `--resume {self.run.path}`."

    def resume(self, checkpoint: Path) -> None:
        """Continue from a checkpoint of this phase (the caller loads the model); the data position
        follows from the step."""
        self.step = self.backend.restore(checkpoint)
