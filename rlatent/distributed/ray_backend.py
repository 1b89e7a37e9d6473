"""Phase 2 on Ray: rollout workers, reward workers and the learner are actors.

The GRPO loop (`rlatent.grpo.loop`) is the same as on the local backend; this
module decides where its stages run and keeps them honest:

- weight sync: after each update the learner's trainable tensors (LoRA, heads,
  projection; never the frozen base) are put in the object store once and
  loaded by every rollout worker, with a version number (learner steps). Bytes
  and seconds are logged.
- versions: every chunk comes back with the version it was sampled with; a
  chunk older than the loop allows (0 steps behind, 1 with async rollouts) is
  refused, counted, and sampled again with current weights.
- faults: a call on a dead or unresponsive rollout/reward worker restarts that
  worker (a fresh actor, the last weights replayed) and runs the same call
  again; chunks are seeded, so a redone chunk is the same sample and nothing is
  lost or counted twice. A learner that dies stops the run: the loop writes a
  checkpoint from the learner's last snapshot and names the resume command.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rlatent.io.atomic import restore_rng_state
from rlatent.io.checkpoint import read_reference, read_training_state, save_checkpoint
from rlatent.config import RunConfig
from rlatent.errors import ConfigError, LearnerFailure, TrainingError, first_line
from rlatent.model.latent_model import LatentModel
from rlatent.grpo.learner import GRPOLearner, batch_totals
from rlatent.model.loading import resolve_device
from rewards.registry import RewardSet
from rlatent.workers.rollout import RolloutChunk, make_engine
from rlatent.latent.sampler import SamplingSettings
from rlatent.latent.trajectory import Trajectories
from rlatent.workers.weight_sync import load_trainable_state, model_bytes, state_bytes, trainable_state

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
except ImportError:  # the `ray` extra is optional; the backend says so when chosen
    ray = None


# ---- the actors (plain classes; `ray.remote` wraps them when the backend starts) ---------------

class Probe:
    """Where an actor runs: for placement reports and fault-injection tests."""

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


class RolloutWorker(Probe):
    """A model built from the learner's settings plus an engine; weights arrive by `load_trainable`."""

    def __init__(self, cfg: RunConfig, settings, dtype: torch.dtype, sampling: SamplingSettings):
        model, tokenizer = LatentModel.from_settings(settings, dtype, resolve_device(cfg.model.device),
                                                     cfg.model.cache_dir)
        self.engine = make_engine(cfg.grpo.engine, model, tokenizer, sampling, cfg.model.cache_dir)
        self.version = -1

    def load_trainable(self, state: dict[str, torch.Tensor], version: int) -> int:
        self.engine.load_trainable(state, version)
        self.version = version
        return version

    def sample(self, chunk: RolloutChunk) -> tuple[Trajectories, int]:
        return self.engine.sample(chunk.prompts, chunk.seed).to(torch.device("cpu")), self.version


class RewardWorker(Probe):
    def __init__(self, cfg: RunConfig):
        self.rewards = RewardSet(cfg.grpo.rewards, cfg.grpo.reward_errors)

    def score(self, prompts: list[str], completions: list[str], facts: dict):
        return self.rewards.score(prompts, completions, facts)


class LearnerWorker(Probe):
    """One learner rank. Built in two calls: `rendezvous` on rank 0 first names the address every rank joins,
    then `setup` on all ranks at once (DeepSpeed's process group forms only when every rank has joined)."""

    def rendezvous(self) -> tuple[str, int]:
        from rlatent.optim.deepspeed_optimizer import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, cfg: RunConfig, settings, dtype: torch.dtype, initial: dict[str, torch.Tensor], rank: int,
              world: int, address: tuple[str, int]) -> None:
        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so the local rank is always 0.
        os.environ.update({"MASTER_ADDR": address[0], "MASTER_PORT": str(address[1]), "RANK": str(rank),
                           "WORLD_SIZE": str(world), "LOCAL_RANK": "0"})
        model, _ = LatentModel.from_settings(settings, dtype, resolve_device(cfg.model.device), cfg.model.cache_dir)
        self.learner = GRPOLearner(cfg, model, trainable=initial)

    def update(self, traj: Trajectories, advantages: torch.Tensor, step: int, totals) -> dict[str, float]:
        return self.learner.update(traj, advantages, step, totals)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.learner.trainable_state()

    def checkpoint_state(self) -> dict:
        return self.learner.checkpoint_state()

    def load_training_state(self, optimizer: dict, reference: dict[str, torch.Tensor] | None) -> None:
        self.learner.load_training_state(optimizer, reference)


# ---- restarting pools -----------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """A submitted actor call: enough to run it again on a restarted actor."""

    index: int  # worker index in the pool
    method: str
    args: tuple
    actor: Any  # the handle it went to (a restart replaces the pool's)
    ref: Any  # its result

class WorkerPool:
    """Actors of one role. A call whose actor died (or timed out) restarts that actor, replays the last
    broadcast on it, and runs again on it; Python errors inside a call are not retried."""

    def __init__(self, role: str, make: Callable[[int], Any], count: int, cfg: RunConfig):
        self.role, self.make, self.cfg = role, make, cfg
        self.actors = [make(i) for i in range(count)]
        self.setup: tuple[str, tuple] | None = None  # the last broadcast, replayed on restarted actors
        self.restarts = 0

    def submit(self, calls: list[tuple[int, str, tuple]]) -> list["Call"]:
        """Start calls (worker index, method, args); returns them for `gather`."""
        return [Call(index, method, args, self.actors[index], getattr(self.actors[index], method).remote(*args))
                for index, method, args in calls]

    def gather(self, calls: list["Call"]) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        pending = {call.ref: (i, call) for i, call in enumerate(calls)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.cfg.distributed.timeout_s)
            if not ready:  # the oldest call is stuck: treat its actor as dead
                ready = [next(iter(pending))]
                ray.kill(pending[ready[0]][1].actor, no_restart=True)
            for ref in ready:
                i, call = pending.pop(ref)
                try:
                    results[i] = ray.get(ref, timeout=self.cfg.distributed.timeout_s)
                except RayTaskError as exc:
                    raise TrainingError(f"{self.role} worker {call.index}: {call.method} failed: {reason(exc)}") from None
                except (RayActorError, GetTimeoutError) as exc:
                    if self.actors[call.index] is call.actor:  # not yet restarted for another of its calls
                        self.restart(call.index, exc)
                    retry = self.submit([(call.index, call.method, call.args)])[0]
                    pending[retry.ref] = (i, retry)
        return results

    def run(self, calls: list[tuple[int, str, tuple]]) -> list[Any]:
        return self.gather(self.submit(calls))

    def broadcast(self, method: str, *args) -> list[Any]:
        """The same call on every actor; remembered and replayed on actors started later."""
        self.setup = (method, args)
        return self.run([(i, method, args) for i in range(len(self.actors))])

    def restart(self, index: int, cause: Exception) -> None:
        self.restarts += 1
        if self.restarts > self.cfg.distributed.max_restarts:
            raise TrainingError(f"{self.role} worker {index} died ({reason(cause)}) and distributed.max_restarts "
                                f"({self.cfg.distributed.max_restarts}) restarts are used up")
        print(f"{self.role} worker {index} died ({reason(cause)}); restarting it", file=sys.stderr)
        self.actors[index] = self.make(index)
        if self.setup is not None:
            method, args = self.setup
            self.run([(index, method, args)])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors.clear()


def reason(exc: BaseException) -> str:
    """One line for a Ray error: the worker's own exception when it raised one (a `RayTaskError` prints a
    whole traceback), else Ray's message."""
    cause = getattr(exc, "cause", None)
    return f"{type(cause).__name__}: {first_line(cause)}" if cause is not None else first_line(exc)


# ---- the backend --------------------------------------------------------------------------

class RayBackend:
    def __init__(self, cfg: RunConfig, model: LatentModel, tokenizer, settings: SamplingSettings):
        if ray is None:
            raise ConfigError("distributed.backend: ray is not installed (pip install -e '.[ray]')")
        self.cfg, self.model = cfg, model
        d = cfg.distributed
        self.owns_ray = start_ray(d)
        initial = trainable_state(model)
        self.full_bytes = model_bytes(model)
        options = dict(num_cpus=d.rollout_cpus, num_gpus=d.rollout_gpus, max_restarts=0)
        rollout = ray.remote(RolloutWorker).options(**options)
        reward = ray.remote(RewardWorker).options(num_cpus=d.reward_cpus, max_restarts=0)
        learner = ray.remote(LearnerWorker).options(num_cpus=d.learner_cpus, num_gpus=d.learner_gpus, max_restarts=0)
        self.learners = [learner.remote() for _ in range(d.learner_workers)]
        self.rollouts = WorkerPool("rollout", lambda i: rollout.remote(cfg, model.settings, model.dtype, settings),
                                   d.rollout_workers, cfg)
        self.rewards = WorkerPool("reward", lambda i: reward.remote(cfg), d.reward_workers, cfg)
        self.snapshot: tuple[int, Any] | None = None  # (step, ref to the learner's checkpoint_state)
        self.stale_refused = 0
        actors = [*self.rollouts.actors, *self.rewards.actors, *self.learners]
        try:
            address = ray.get(self.learners[0].rendezvous.remote(), timeout=d.timeout_s)
            ray.get([actor.setup.remote(cfg, model.settings, model.dtype, initial, rank, len(self.learners), address)
                     for rank, actor in enumerate(self.learners)], timeout=d.timeout_s)
            self.nodes = len(set(ray.get([actor.node.remote() for actor in actors], timeout=d.timeout_s)))
        except (RayActorError, RayTaskError, GetTimeoutError) as exc:
            self.close()
            raise TrainingError(f"ray: an actor failed to start ({reason(exc)})") from None
        print(f"ray: {len(actors)} actors on {self.nodes} node(s)")

    # ---- rollouts -----------------------------------------------------------------------

    def launch(self, chunks: list[RolloutChunk], version: int) -> list[Call]:
        return self.rollouts.submit([(i % len(self.rollouts.actors), "sample", (chunk,))
                                     for i, chunk in enumerate(chunks)])

    def collect(self, launched: list[Call], version: int) -> tuple[list[Trajectories], dict[str, float]]:
        """Results in chunk order. A chunk sampled with weights older than `version` is refused, counted and
        redone after a resync; newer ones (a worker restarted during async rollouts gets the latest weights)
        are accepted: the ratio is taken against the log-probs they were sampled with."""
        results = self.rollouts.gather(launched)
        for i, ((traj, sampled_with), call) in enumerate(zip(results, launched)):
            if sampled_with < version:
                self.stale_refused += 1
                print(f"rollout chunk {i} was sampled with weights v{sampled_with}, expected v{version}: refused, "
                      "resampling", file=sys.stderr)
                self.rollouts.run([(call.index, *self.rollouts.setup)])
                results[i] = self.rollouts.run([(call.index, call.method, call.args)])[0]
                if results[i][1] < version:
                    raise TrainingError(f"rollout worker {call.index} still samples with v{results[i][1]} after a "
                                        f"resync to v{version}")
        rows = sum(traj.batch.input_ids.shape[0] for traj, _ in results)
        return [traj for traj, _ in results], {"rollout_samples": float(rows), "stale_refused": float(self.stale_refused)}

    # ---- rewards --------------------------------------------------------------------------

    def score(self, prompts: list[str], completions: list[str], facts: dict, group_size: int):
        """Each reward worker scores whole groups; the parts are joined in order."""
        groups = len(prompts) // group_size
        parts = min(len(self.rewards.actors), groups)
        bounds = [round(i * groups / parts) * group_size for i in range(parts + 1)]
        calls = [(i, "score", (prompts[a:b], completions[a:b], {k: list(v[a:b]) for k, v in facts.items()}))
                 for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        total: list[float] = []
        per_reward: dict[str, list[float]] = {}
        zeroed: dict[str, int] = {}
        for part_total, part_rewards, part_zeroed in self.rewards.run(calls):
            total += part_total
            for name, values in part_rewards.items():
                per_reward.setdefault(name, []).extend(values)
            for name, n in part_zeroed.items():
                zeroed[name] = zeroed.get(name, 0) + n
        return total, per_reward, zeroed

    # ---- learner ------------------------------------------------------------------------

    def call_learner(self, method: str, *per_rank_args, step: int, args: tuple = ()):
        """The same call on every learner rank (ZeRO-3 gathers are collective), or rank-specific arguments
        in `per_rank_args` (one tuple per rank); returns every rank's result."""
        calls = per_rank_args or [args] * len(self.learners)
        try:
            return ray.get([getattr(actor, method).remote(*a) for actor, a in zip(self.learners, calls)],
                           timeout=self.cfg.distributed.timeout_s)
        except RayTaskError as exc:
            raise LearnerFailure(f"learner failed in grpo step {step} ({reason(exc)})") from None
        except (RayActorError, GetTimeoutError) as exc:
            raise LearnerFailure(f"learner died in grpo step {step} ({reason(exc)})") from None

    def update(self, traj: Trajectories, advantages: torch.Tensor, step: int) -> dict[str, float]:
        """Each rank trains on a contiguous share of the rows against the whole batch's totals; the ranks'
        metric shares add up, grad norm and learning rate are the same on all."""
        totals = batch_totals(self.cfg, traj.actions(self.cfg.grpo.latent_noise_std > 0))
        rows = len(advantages)
        bounds = [round(i * rows / len(self.learners)) for i in range(len(self.learners) + 1)]
        shares = [(traj.rows(a, b), advantages[a:b], step, totals) for a, b in zip(bounds, bounds[1:])]
        results = self.call_learner("update", *shares, step=step)
        metrics = {key: sum(r[key] for r in results) for key in results[0]}
        metrics.update(grad_norm=results[0]["grad_norm"], lr=results[0]["lr"],
                       ratio_first_max_deviation=max(r["ratio_first_max_deviation"] for r in results))
        # Every rank takes part (ZeRO-3 gathers are collective); rank 0's copy is the one kept.
        self.snapshot = (step, [actor.checkpoint_state.remote() for actor in self.learners][0])
        return metrics

    def sync(self, version: int) -> dict[str, float]:
        """Send the learner's trainable weights to every rollout worker, as `version`. Called at the end of
        each step, so the restart counts it reports include the step's."""
        started = time.perf_counter()
        state = self.call_learner("trainable_state", step=version)[0]
        ref = ray.put(state)
        self.rollouts.broadcast("load_trainable", ref, version)
        size = state_bytes(state)
        return {"sync_bytes": float(size), "sync_fraction": size / self.full_bytes,
                "sync_seconds": time.perf_counter() - started, "rollout_restarts": float(self.rollouts.restarts),
                "reward_restarts": float(self.rewards.restarts), "ray_nodes": float(self.nodes)}

    # ---- checkpoints --------------------------------------------------------------------

    def save_checkpoint(self, path: Path, step: int) -> Path:
        """Written by the driver from the learner's state (from the last snapshot when the learner is gone)."""
        if self.snapshot is not None and self.snapshot[0] == step:
            try:
                state = ray.get(self.snapshot[1], timeout=self.cfg.distributed.timeout_s)
            except (RayActorError, GetTimeoutError, RayTaskError):
                state = self.call_learner("checkpoint_state", step=step)[0]
        else:
            state = self.call_learner("checkpoint_state", step=step)[0]
        load_trainable_state(self.model, state["trainable"])
        return save_checkpoint(path, self.model, "grpo", step, state["optimizer"], state["reference"])

    def restore(self, checkpoint: Path) -> int:
        """The driver loaded the checkpoint's weights (and gave them to the learner at start); the optimizer
        state goes to the learner."""
        state = read_training_state(checkpoint, "grpo")
        self.call_learner("load_training_state", step=int(state["step"]),
                          args=(state["optimizer"], read_reference(checkpoint)))
        restore_rng_state(state["rng"])
        return int(state["step"])

    def finish(self, model: LatentModel) -> None:
        """Bring the final weights into the driver's model, for evaluation."""
        load_trainable_state(model, self.call_learner("trainable_state", step=-1)[0])

    def close(self) -> None:
        """Kill the actors and drop their handles. A handle that outlives its Ray session would, when
        finally collected, release the actor with the same id in the next session of this process."""
        self.rollouts.shutdown()
        self.rewards.shutdown()
        for actor in self.learners:
            ray.kill(actor, no_restart=True)
        self.learners.clear()
        self.snapshot = None
        if self.owns_ray:
            ray.shutdown()


def start_ray(d) -> bool:
    """Connect to Ray as configured; True when this run started the instance (and shuts it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if d.address is not None:
        ray.init(address=d.address, include_dashboard=False, log_to_driver=True)
    else:
        # Workers import rlatent, `rewards` and user reward modules exactly as the driver does.
        path = os.pathsep.join([os.getcwd(), *sys.path])
        ray.init(num_cpus=d.num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_AUTH_MODE": "disabled"}})
    return True
