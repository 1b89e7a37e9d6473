"""Phase 2: GRPO with verifiable rewards on the latent policy.

One step, top to bottom:
1. rollout: G completions per prompt, sampled in seeded chunks of whole groups
   (`rlatent.workers.rollout`) with sampled start/stop decisions, tokens (temperature,
   top-p) and optional exploration noise on latents; the sampler stores the
   log-prob of every action and each chunk carries the weights' version;
2. reward: every configured reward scores the batch; the weighted sum gives
   group-relative advantages. With `grpo.dynamic_sampling_rounds` > 1, groups
   whose `grpo.dynamic_sampling_reward` is the same for every completion are
   replaced by groups of further rounds of prompts (`rlatent.grpo.dynamic_sampling`;
   which prompts each round draws: `rlatent.grpo.prompts`). Rewards that fail
   under `grpo.reward_errors: zero` are printed and bounded (`rlatent.grpo.reward_failures`);
3. update: the learner's GRPO update (`rlatent.grpo.learner`), then the new
   trainable weights go to engines that hold their own copy.

What a step logs is computed in `rlatent.grpo.metrics` (listed in docs/grpo.md).

The backend (`distributed.backend`) decides where each stage runs: in this
process (`rlatent.distributed.local_backend`) or on Ray actors (`rlatent.distributed.ray_backend`).
With `distributed.async_rollouts` the next step's rollouts are launched before
the update (one step off-policy; the ratio is against the stored sampling
log-probs), on either backend.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rlatent.config import RunConfig
from rlatent.data.gsm8k import Problem
from rlatent.errors import LearnerFailure, TrainingError
from rlatent.data.examples import format_prompt, special_token_ids
from rlatent.grpo.dynamic_sampling import (ScoredRound, assemble, enough_informative, informative_groups,
                                           pick_groups)
from rlatent.grpo.losses import group_advantages
from rlatent.grpo.metrics import policy_metrics, reward_metrics, update_metrics
from rlatent.grpo.prompts import prompt_order
from rlatent.grpo.reward_failures import RewardFailures
from rlatent.model.latent_model import LatentModel
from rlatent.workers.rollout import make_chunks
from rlatent.io.run_dir import MetricsLogger, RunDir
from rlatent.latent.trajectory import Trajectories


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
        self.reward_failures = RewardFailures(cfg.grpo.reward_errors_max_steps)

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
            for line in self.reward_failures.summary():
                tqdm.write(line, file=sys.stderr)
        except LearnerFailure as exc:
            raise TrainingError(f"{exc}; the run stopped at step {self.step}. {self.rescue_checkpoint()}") from None
        finally:
            progress.close()
            self.backend.close()
        return checkpoint

    def launch(self, step: int, version: int, round_index: int = 0):
        """Start sampling `step`'s prompts with the weights the engines hold now, which must be `version`
        (the learner's steps so far); a chunk sampled with other weights is refused. Round 0 is the step's
        own prompts; round r > 0 of dynamic sampling takes further ones (`rlatent.grpo.prompts`)."""
        g = self.cfg.grpo
        order = prompt_order(len(self.problems), step, g.prompts_per_step, self.cfg.seed, round_index,
                             g.dynamic_sampling_rounds)
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
        while len(rounds) < g.dynamic_sampling_rounds and not enough_informative(
                rounds, g.group_size, g.prompts_per_step, g.dynamic_sampling_reward):
            extra_group, _, _, handle = self.launch(self.step, version=self.step, round_index=len(rounds))
            parts, more_metrics = self.backend.collect(handle, self.step)
            rollout_metrics.update(more_metrics)
            rounds.append(self.score(extra_group, Trajectories.concat(parts, self.pad_id)))
        resampled = time.perf_counter()
        next_step = self.step + 1
        self.watch_reward_failures(next_step, rounds)
        overlap = self.cfg.distributed.async_rollouts and next_step < g.steps
        upcoming = self.launch(next_step, version=self.step) if overlap else None  # pre-update weights
        traj, rewards = rounds[0].traj, rounds[0].rewards
        if g.dynamic_sampling_rounds > 1:
            picks = pick_groups(rounds, g.group_size, g.prompts_per_step, g.dynamic_sampling_reward)
            traj, rewards = assemble(rounds, picks, g.group_size, self.pad_id)
        advantages = group_advantages(rewards, g.group_size, g.scale_rewards, g.advantage_std)
        metrics = self.backend.update(traj, advantages, next_step)
        updated = time.perf_counter()
        metrics.update(self.backend.sync(next_step))
        if not overlap and next_step < g.steps:
            upcoming = self.launch(next_step, version=next_step)
        metrics.update(rollout_metrics)
        noisy = g.latent_noise_std > 0
        metrics.update(reward_metrics(rounds, g.group_size))
        metrics.update(policy_metrics(Trajectories.concat([r.traj for r in rounds], self.pad_id), noisy))
        metrics.update(update_metrics(traj, advantages, noisy))
        if g.dynamic_sampling_rounds > 1:
            metrics["dynamic_sampling_informative"] = float(sum(
                int(r.informative(g.dynamic_sampling_reward, g.group_size).sum()) for r in rounds))
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

    # ---- logging and state ------------------------------------------------------------------

    def watch_reward_failures(self, step: int, rounds: list[ScoredRound]) -> None:
        """Print the step's reward failures (`grpo.reward_errors: zero`); stop the run on a reward that keeps
        failing on every sample (`rlatent.grpo.reward_failures`)."""
        zeroed = {name: sum(r.zeroed[name] for r in rounds) for name in rounds[0].zeroed}
        samples = sum(len(r.problems) for r in rounds)
        for line in self.reward_failures.observe(step, zeroed, samples):
            tqdm.write(line, file=sys.stderr)

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
