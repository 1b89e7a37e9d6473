"""Phase 2's objective end to end on the tiny model: KL only where a reference exists, the reference is the
policy GRPO starts from (and stays so across a resume), the first ratio is 1, configs that cannot work refused."""

from __future__ import annotations

import math

import pytest

from rlatent.config import load_config
from rlatent.errors import ConfigError
from rlatent.io.run_dir import read_metrics
from rlatent.run.cli import main

CONFIG = "configs/tiny.yaml"
KINDS = ("token", "start", "stop", "latent")


pytestmark = pytest.mark.usefixtures("repo_root")  # config paths are relative to the repository


def grpo_run(tmp_path, model_dir, name, *overrides, command="train"):
    args = [command, CONFIG, f"model.name_or_path={model_dir}", "sft.steps=2", "sft.eval_every=2",
            "eval.limit=2", f"output.dir={tmp_path}", f"output.name={name}", *overrides]
    assert main(args) == 0
    return [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["phase"] == "grpo"]


def test_initial_reference_kl_is_zero_at_the_first_step_for_every_kind(tiny_model_dir, tmp_path, one_torch_thread):
    """The done-check of the issue on the tiny model: noise 1.0 and beta > 0 run to the end with finite
    losses; the reference is the policy phase 2 starts from, so every kind's KL is 0 at the first step and
    moves afterwards. (Before: decisions and latents were charged against a log-prob of 0, the loss inf.)"""
    steps = grpo_run(tmp_path, tiny_model_dir, "initial", "grpo.beta=0.04", "grpo.latent_noise_std=1.0",
                     "grpo.steps=3", "grpo.prompts_per_step=2", "grpo.group_size=4")
    assert all(math.isfinite(s["loss"]) for s in steps)
    first, last = steps[0], steps[-1]
    assert first["actions_latent"] > 0 and first["actions_start"] > 0  # every kind was acted on
    for kind in KINDS:
        if first[f"actions_{kind}"] > 0:
            assert abs(first[f"kl_{kind}"]) < 1e-6, kind
    assert abs(first["kl"]) < 1e-6
    assert last["kl"] > 0


def test_base_reference_charges_token_actions_only(tiny_model_dir, tmp_path, one_torch_thread):
    steps = grpo_run(tmp_path, tiny_model_dir, "base", "grpo.beta=0.04", "grpo.reference=base",
                     "grpo.latent_noise_std=1.0")
    for step in steps:
        assert math.isfinite(step["loss"]) and "kl_token" in step
        assert not any(f"kl_{kind}" in step for kind in ("start", "stop", "latent"))
        assert 0 < step["kl_token"] < 10  # the base differs from the phase-1 policy, by a bounded amount


def test_reference_is_kept_across_a_resume(tiny_model_dir, tmp_path, one_torch_thread):
    """A run resumed from a phase-2 checkpoint compares with the policy phase 2 started from, not with the
    checkpoint's weights: its KL continues where the uninterrupted run's does."""
    common = ("grpo.beta=0.04", "grpo.steps=3", "grpo.save_every=1")
    full = grpo_run(tmp_path, tiny_model_dir, "full", *common)
    run = tmp_path / "cut"
    grpo_run(tmp_path, tiny_model_dir, "cut", *common[:-2], "grpo.steps=2", "grpo.save_every=1")
    config = (run / "config.yaml").read_text().replace("steps: 2\n  prompts_per_step", "steps: 3\n  prompts_per_step")
    (run / "config.yaml").write_text(config)
    assert main(["train", "--resume", str(run)]) == 0
    resumed = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "grpo"}
    assert resumed[3]["kl"] == pytest.approx(full[2]["kl"], rel=1e-4, abs=1e-9)
    assert resumed[3]["kl"] > 0


@pytest.mark.parametrize("old_logprobs, bound", [("sampler", 1e-4), ("recompute", 1e-12)])
def test_first_iteration_ratio_is_one_with_dropout_in_the_model(tiny_model_dir, tmp_path, old_logprobs, bound,
                                                                one_torch_thread):
    """LoRA dropout 0.3 is on the adapter, yet updates run with dropout off (the default), so the first
    ratio equals 1 to float32 tolerance; with recomputed old log-probs exactly."""
    steps = grpo_run(tmp_path, tiny_model_dir, old_logprobs, "model.lora_dropout=0.3",
                     f"grpo.old_logprobs={old_logprobs}")
    assert all(s["ratio_first_max_deviation"] < bound for s in steps)


def test_dropout_on_moves_the_first_ratio(tiny_model_dir, tmp_path, one_torch_thread):
    """The defect the default removes: with dropout on during updates the first ratio is noise."""
    steps = grpo_run(tmp_path, tiny_model_dir, "dropout", "model.lora_dropout=0.3", "grpo.disable_dropout=false",
                     "grpo.steps=1")
    assert steps[0]["ratio_first_max_deviation"] > 1e-3


@pytest.mark.parametrize("overrides, message", [
    (["grpo.beta=0.1", "grpo.reference=base", "model.lora_r=0"], "is the policy itself"),
    (["latent.mode=pause", "grpo.latent_noise_std=0.5"], "needs latent.mode 'latent'"),
    (["latent.mode=none", "grpo.latent_noise_std=0.5"], "needs latent.mode 'latent'"),
    (["grpo.beta=0.1", "deepspeed.enabled=true", "deepspeed.zero_stage=3"], "ZeRO-3"),
])
def test_configs_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, ["model.name_or_path=x", *overrides])


def test_decoupled_decisions_are_normalised_by_their_own_count():
    """Two completions of 10 tokens and 1 start decision each, ratio 1, advantages +1 and -1. Jointly (dapo)
    every action weighs 1/22; decoupled, tokens weigh 1/20 and the two decisions 1/2 each (x the weight)."""
    import torch

    from rlatent.grpo.learner import LossPart, partitioned_loss
    from rlatent.latent.trajectory import ACTION_KINDS

    rows, length = 2, 11
    mask = torch.zeros(rows, length, len(ACTION_KINDS), dtype=torch.bool)
    mask[:, 1:, 0] = True  # 10 tokens per row
    mask[:, 0, 1] = True  # one start decision per row
    logprobs = torch.full(mask.shape, -1.0, dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    clip = dict(epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_actions=30)
    joint = [LossPart(ACTION_KINDS, "dapo", 1.0)]
    decoupled = [LossPart(("token",), "dapo", 1.0), LossPart(("start", "stop", "latent"), "dapo", 0.5)]

    grads = {}
    for name, parts, normalisers in (("joint", joint, (22.0,)), ("decoupled", decoupled, (20.0, 2.0))):
        logprobs.grad = None
        loss, stats = partitioned_loss(logprobs, logprobs.detach(), None, advantages, mask, parts, normalisers, **clip)
        loss.backward()
        grads[name] = logprobs.grad.clone()
        assert stats["actions"] == 22
    # d loss / d logp = -A / normaliser (x weight): the policy-gradient weight of each action.
    assert grads["joint"][0, 1, 0].item() == pytest.approx(-1 / 22) and grads["joint"][0, 0, 1].item() == pytest.approx(-1 / 22)
    assert grads["decoupled"][0, 1, 0].item() == pytest.approx(-1 / 20)
    assert grads["decoupled"][0, 0, 1].item() == pytest.approx(-0.5 / 2)
    assert grads["decoupled"][1, 0, 1].item() == pytest.approx(+0.5 / 2)
    assert (grads["decoupled"][~mask] == 0).all()


def test_decoupled_run_end_to_end(tiny_model_dir, tmp_path, one_torch_thread):
    steps = grpo_run(tmp_path, tiny_model_dir, "decoupled", "grpo.decision_loss=decoupled", "grpo.decision_weight=2")
    assert all(math.isfinite(s["loss"]) for s in steps) and steps[0]["actions_start"] > 0
