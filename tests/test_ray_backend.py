"""The Ray backend on a local 4-CPU Ray instance: same metrics as the local backend, and faults survived.

Every fault here is real: actors are killed with `ray.kill` while they hold a
submitted call. Rollout chunks are seeded, so a redone chunk is the same
sample, and a faulted run must end with the same metrics as a clean one.
"""

from __future__ import annotations

import gc
import math
import os
import signal

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

import torch  # noqa: E402

from rlatent.run.cli import main  # noqa: E402
from rlatent.config import load_config  # noqa: E402
from rlatent.model.latent_model import LatentModel  # noqa: E402
from rlatent.distributed.ray_backend import RayBackend  # noqa: E402
from rlatent.io.run_dir import read_metrics  # noqa: E402
from rlatent.workers.weight_sync import state_bytes, trainable_state  # noqa: E402

CONFIG = "configs/tiny.yaml"
STEPS = 4
PER_STEP = 4  # prompts_per_step x group_size
# Ray-only metrics, and wall times, are not compared.
NOT_COMPARED = ("time_", "step_seconds", "sync_", "rollout_", "reward_restarts", "stale_refused", "ray_nodes",
                "wall_seconds")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One Ray instance for the module (runs find it initialised and leave it up). 4 logical CPUs: the
    actors reserve fractions (ENVIRONMENT.md's hang trap on 2 CPUs)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else ray.init sets it to "token" for later tests
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    gc.collect()  # actor handles caught in reference cycles go while their session is up
    ray.shutdown()


pytestmark = pytest.mark.usefixtures("repo_root")  # config paths are relative to the repository


def run_grpo(tmp_path, tiny_model_dir, name, *extra, resume=False) -> int:
    if resume:
        return main(["grpo", "--resume", str(tmp_path / name)])
    return main(["grpo", CONFIG, f"model.name_or_path={tiny_model_dir}", f"output.dir={tmp_path}",
                 f"output.name={name}", f"grpo.steps={STEPS}", "grpo.prompts_per_step=2", "grpo.group_size=2",
                 "grpo.rollout_chunks=2", "grpo.max_new_tokens=12", "eval.limit=2", "distributed.timeout_s=120",
                 *extra])


def grpo_rows(run_dir) -> list[dict]:
    rows = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["phase"] == "grpo"}
    return [rows[s] for s in sorted(rows)]


def assert_same_metrics(a, b):
    rows_a, rows_b = grpo_rows(a), grpo_rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == list(range(1, STEPS + 1))
    for ra, rb in zip(rows_a, rows_b):
        keys = {k for k in ra if not k.startswith(NOT_COMPARED)} & set(rb)
        assert keys >= {"reward_mean", "loss", "grad_norm", "tokens_per_completion", "latents_per_completion"}
        for key in keys:
            if isinstance(ra[key], float):
                # Bounded, not bitwise: the learner actor may run another number of torch threads. A deviation of
                # the first ratio from 1 is itself float32 rounding (a few ulps of 1.0), so only its size is compared.
                abs_tol = 1e-5 if key.endswith("_deviation") else 1e-7
                assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=abs_tol), (ra["step"], key, ra[key], rb[key])


@pytest.mark.slow
@pytest.mark.parametrize("async_rollouts,rounds", [(False, 1), (True, 1), (True, 3)])
def test_ray_backend_matches_local(tmp_path, tiny_model_dir, async_rollouts, rounds):
    """With dynamic sampling (`rounds` 3: the tiny model hardly ever scores, so steps sample further rounds) the
    further rounds go to the workers with the weights of the step, after the first round's one-step lag."""
    flags = [f"distributed.async_rollouts={str(async_rollouts).lower()}", f"grpo.dynamic_sampling_rounds={rounds}"]
    assert run_grpo(tmp_path, tiny_model_dir, "local", *flags) == 0
    assert run_grpo(tmp_path, tiny_model_dir, "ray", *flags, "distributed.backend=ray") == 0
    assert_same_metrics(tmp_path / "local", tmp_path / "ray")
    rows = grpo_rows(tmp_path / "ray")
    drawn = [r["sampling_rounds"] for r in rows]
    assert max(drawn) == rounds and min(drawn) >= 1, drawn  # further rounds were sampled on the workers
    assert [r["policy_lag"] for r in rows] == [0.0] + [float(async_rollouts)] * (STEPS - 1)
    assert all(r["rollout_samples"] == PER_STEP and r["stale_refused"] == 0 for r in rows)
    cfg = load_config(CONFIG, [f"model.name_or_path={tiny_model_dir}"])
    synced = state_bytes(trainable_state(LatentModel.from_config(cfg.model, cfg.latent, torch.float32,
                                                                 torch.device("cpu"))[0]))
    assert all(r["sync_bytes"] == synced and 0 < r["sync_fraction"] < 0.1 for r in rows)  # never the base


@pytest.mark.slow
def test_killed_workers_and_a_stale_worker_leave_the_run_exact(tmp_path, tiny_model_dir, monkeypatch):
    """Step 2: a rollout worker process is SIGKILLed holding its chunk, then a reward worker process just
    before it is called. Step 4: a worker is handed old weights, so its chunk comes back stale and is refused."""
    assert run_grpo(tmp_path, tiny_model_dir, "clean", "distributed.backend=ray") == 0
    launch, score, sync = RayBackend.launch, RayBackend.score, RayBackend.sync

    def crash(actor, pid):
        """SIGKILL the actor's process and wait until Ray has noticed (the kill itself is asynchronous)."""
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ray.exceptions.RayActorError):
            for _ in range(100):
                ray.get(actor.pid.remote(), timeout=30)

    def launch_then_crash(self, chunks, version):
        pid = ray.get(self.rollouts.actors[0].pid.remote())  # asked first: actor calls run in order
        launched = launch(self, chunks, version)
        if version == 1:
            crash(self.rollouts.actors[0], pid)
        return launched

    def crash_then_score(self, prompts, completions, facts, group_size):
        if self.rollouts.restarts == 1 and self.rewards.restarts == 0:
            crash(self.rewards.actors[0], ray.get(self.rewards.actors[0].pid.remote()))
        return score(self, prompts, completions, facts, group_size)

    def sync_then_regress(self, version):
        metrics = sync(self, version)
        if version == 3:
            ray.get(self.rollouts.actors[1].load_trainable.remote(self.rollouts.setup[1][0], 0))
        return metrics

    monkeypatch.setattr(RayBackend, "launch", launch_then_crash)
    monkeypatch.setattr(RayBackend, "score", crash_then_score)
    monkeypatch.setattr(RayBackend, "sync", sync_then_regress)
    assert run_grpo(tmp_path, tiny_model_dir, "faulted", "distributed.backend=ray") == 0

    assert_same_metrics(tmp_path / "clean", tmp_path / "faulted")
    rows = grpo_rows(tmp_path / "faulted")
    assert [r["rollout_samples"] for r in rows] == [PER_STEP] * STEPS  # nothing lost, nothing counted twice
    assert [r["rollout_restarts"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert [r["reward_restarts"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert [r["stale_refused"] for r in rows] == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.slow
def test_a_dead_learner_stops_the_run_with_a_resumable_checkpoint(tmp_path, tiny_model_dir, monkeypatch, capsys):
    assert run_grpo(tmp_path, tiny_model_dir, "whole", "distributed.backend=ray") == 0
    update = RayBackend.update

    def kill_learner_at_step_3(self, traj, advantages, step):
        if step == 3:
            ray.kill(self.learners[0], no_restart=True)
        return update(self, traj, advantages, step)

    monkeypatch.setattr(RayBackend, "update", kill_learner_at_step_3)
    assert run_grpo(tmp_path, tiny_model_dir, "killed", "distributed.backend=ray") == 2
    err = capsys.readouterr().err
    assert "learner died in grpo step 3" in err and "--resume" in err, err
    killed = tmp_path / "killed"
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_000002"]
    monkeypatch.setattr(RayBackend, "update", update)
    assert run_grpo(tmp_path, tiny_model_dir, "killed", resume=True) == 0
    assert_same_metrics(tmp_path / "whole", killed)


@pytest.mark.slow
def test_two_deepspeed_learner_ranks_match_one(tmp_path, tiny_model_dir):
    """Rows split over two ZeRO-2 ranks (gloo), gradients reduced: the same training as one rank."""
    common = ("distributed.backend=ray", "deepspeed.enabled=true", "deepspeed.zero_stage=2")
    assert run_grpo(tmp_path, tiny_model_dir, "one", *common) == 0
    assert run_grpo(tmp_path, tiny_model_dir, "two", *common, "distributed.learner_workers=2") == 0
    assert_same_metrics(tmp_path / "one", tmp_path / "two")
