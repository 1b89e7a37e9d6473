"""Phase 2 end to end on the tiny model: stored vs recomputed log-probs, learning, kill-and-resume."""

import json

import pytest
import torch

from rlatent.latent.policy import recompute_actions
from rlatent.run.cli import main
from rlatent.data.examples import format_prompt
from rlatent.distributed import make_backend
from rlatent.grpo.loop import GRPOTrainer
from rlatent.grpo.metrics import reward_metrics
from rlatent.io.run_dir import read_metrics
from rlatent.latent.sampler import SamplingSettings, sample
from test_invariant import build_model

CONFIG = "configs/tiny.yaml"


pytestmark = pytest.mark.usefixtures("repo_root")  # config paths are relative to the repository


@pytest.mark.parametrize("trunk", ["shared", "two"])
@pytest.mark.parametrize("gradient", ["recurrent", "detached"])
@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_stored_logprobs_equal_recomputed(tiny_model_dir, trunk, gradient, noise):
    model, tokenizer = build_model(tiny_model_dir, trunk)
    prompts = [tokenizer(t).input_ids for t in ["Tom has 3 apples", "12 + 7 =", "She buys 4 pens"]]
    torch.manual_seed(0)
    settings = SamplingSettings(max_new_tokens=12, temperature=0.7, top_p=0.9, decisions="sample",
                                max_latents_per_block=3, max_blocks=4, max_total_latents=8, latent_noise_std=noise)
    traj = sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, settings)
    stored = traj.actions(noise > 0)
    assert stored.mask[..., 1].any() and stored.mask[..., 2].any()  # start and stop decisions were taken
    assert stored.mask[..., 3].any() == (noise > 0)  # latent densities are actions only with noise
    out = recompute_actions(model, traj.batch, traj.slot_inputs, stored.mask, 0.7, noise, gradient)
    recomputed, entropy = out.actions, out.entropy
    assert torch.allclose(recomputed.logprobs, stored.logprobs.to(recomputed.logprobs.dtype), atol=1e-9, rtol=0)
    assert entropy.shape[0] == int(stored.mask[..., 0].sum()) and (entropy > 0).all()


def run_cli(tmp_path, name, *overrides):
    args = ["train", CONFIG, f"output.dir={tmp_path}", f"output.name={name}", *overrides]
    assert main(args) == 0
    return tmp_path / name


def tiny_overrides(model_dir, *extra):
    return [f"model.name_or_path={model_dir}", "sft.steps=2", "sft.eval_every=2", *extra]


def phase_metric(run_dir, phase, name):
    rows = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["phase"] == phase}  # last per step
    return [rows[s].get(name) for s in sorted(rows)]


def test_a_learnable_reward_rises_and_a_zero_weighted_one_does_not(tiny_model_dir, tmp_path):
    """Paying 0.1 per latent teaches the start head to open blocks; at weight 0 nothing moves."""
    pay = "grpo.rewards=[{function: latent_cost, weight: %s, kwargs: {cost: -0.1}}]"
    common = ["grpo.steps=12", "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.lr=0.05",
              "grpo.max_new_tokens=12", "grpo.micro_batch_size=16", "eval.limit=2"]
    paid = run_cli(tmp_path, "paid", *tiny_overrides(tiny_model_dir, pay % 1.0, *common))
    unpaid = run_cli(tmp_path, "unpaid", *tiny_overrides(tiny_model_dir, pay % 0.0, *common))
    paid_latents = phase_metric(paid, "grpo", "latents_per_completion")
    unpaid_latents = phase_metric(unpaid, "grpo", "latents_per_completion")
    assert len(paid_latents) == len(unpaid_latents) == 12
    early, late = sum(paid_latents[:3]) / 3, sum(paid_latents[-3:]) / 3
    assert late > early + 1.0, paid_latents
    assert sum(unpaid_latents[-3:]) / 3 < late - 1.0, (unpaid_latents, paid_latents)
    assert phase_metric(unpaid, "grpo", "advantage_abs_max") == [0.0] * 12  # zero weight: no signal at all
    # Phase 2 ends with the diagnostics of its final model: moved by the paid reward, not by the unpaid one.
    diagnosed = ["lm_loss", "start_loss", "stop_loss", "latent_gain_zeros", "latent_gain_noise", "latent_gain_shuffle"]
    for run, moved in ((paid, True), (unpaid, False)):
        records = read_metrics(run / "metrics.jsonl")
        phase1 = [r for r in records if r["phase"] == "eval"][-1]
        [phase2] = [r for r in records if r["phase"] == "eval_grpo"]
        assert all(isinstance(phase2[key], float) for key in diagnosed), phase2
        assert ({key: phase2[key] for key in diagnosed} != {key: phase1[key] for key in diagnosed}) == moved
        report = (run / "report.md").read_text()
        assert "After phase 1: " in report and "After phase 2: " in report


def test_kill_and_resume_reaches_the_same_metrics(tiny_model_dir, tmp_path, monkeypatch):
    overrides = tiny_overrides(tiny_model_dir, "sft.steps=4", "sft.save_every=2", "grpo.steps=4", "grpo.save_every=2",
                               "eval.limit=2")
    whole = run_cli(tmp_path, "whole", *overrides)

    original = GRPOTrainer.train_step

    def killed_at_step_3(self, launched):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self, launched)

    monkeypatch.setattr(GRPOTrainer, "train_step", killed_at_step_3)
    assert main(["train", CONFIG, f"output.dir={tmp_path}", "output.name=killed", *overrides]) == 130
    killed = tmp_path / "killed"
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_000002", "step_000004", "step_000006"]
    monkeypatch.setattr(GRPOTrainer, "train_step", original)
    assert main(["train", "--resume", str(killed)]) == 0

    for phase, name in [("grpo", "reward_mean"), ("grpo", "loss"), ("grpo", "latents_per_completion"),
                        ("sft", "loss"), ("test", "accuracy"), ("test", "tokens_per_answer"),
                        ("eval_grpo", "latent_gain_shuffle")]:
        phase_name = "train" if phase == "sft" else phase
        assert phase_metric(killed, phase_name, name) == phase_metric(whole, phase_name, name), (phase, name)
    # Every step says how much its rollouts agree on one answer, and that answer's part of the accuracy.
    shares = list(zip(*(phase_metric(whole, "grpo", name)
                        for name in ("answer_top_share", "accuracy_top_answer", "accuracy"))))
    assert len(shares) == 4
    for top_share, top_accuracy, accuracy in shares:
        assert 0.0 <= top_accuracy <= min(top_share, accuracy) and top_share <= 1.0
    assert json.loads((killed / "run.json").read_text())["command"] == "train"
    assert len([r for r in read_metrics(killed / "metrics.jsonl") if r["phase"] == "eval_grpo"]) == 1


def test_resume_of_a_run_killed_in_phase_1(tiny_model_dir, tmp_path, monkeypatch):
    from rlatent.sft.trainer import SFTTrainer

    overrides = tiny_overrides(tiny_model_dir, "sft.steps=4", "sft.save_every=2", "grpo.steps=2", "eval.limit=2")
    whole = run_cli(tmp_path, "whole", *overrides)
    original = SFTTrainer.train_step

    def killed_at_step_3(self, batches, teachers=None):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self, batches, teachers)

    monkeypatch.setattr(SFTTrainer, "train_step", killed_at_step_3)
    assert main(["train", CONFIG, f"output.dir={tmp_path}", "output.name=killed", *overrides]) == 130
    monkeypatch.setattr(SFTTrainer, "train_step", original)
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    for phase, name in [("train", "loss"), ("eval", "lm_loss"), ("grpo", "reward_mean"), ("test", "accuracy")]:
        assert phase_metric(tmp_path / "killed", phase, name) == phase_metric(whole, phase, name), (phase, name)


def test_resume_needs_a_run_directory(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "config.yaml missing" in capsys.readouterr().err


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batching_does_not_change_the_gradient(tiny_model_dir, tmp_path, loss_type):
    """1 x 8 accumulation equals 8 x 1: micro-batches are trimmed and use the full batch's normaliser; the
    reference's no-grad forward over 8 rows at once equals one per micro-batch."""
    from rlatent.config import load_config
    from rlatent.model.latent_model import LatentModel
    from rlatent.io.run_dir import MetricsLogger, RunDir
    from rlatent.data.splits import load_split

    cfg = load_config(CONFIG, [f"model.name_or_path={tiny_model_dir}", "model.dtype=float64", "grpo.group_size=4",
                               "grpo.prompts_per_step=2", "grpo.max_new_tokens=12", f"grpo.loss_type={loss_type}",
                               "grpo.rewards=[{function: latent_cost, kwargs: {cost: -0.1}}]", "grpo.beta=0.1"])
    torch.manual_seed(0)
    model, tokenizer = LatentModel.from_config(cfg.model, cfg.latent, torch.float64, torch.device("cpu"))
    with torch.no_grad():
        model.start_head.net.bias.fill_(-1.0)
    problems, _ = load_split(cfg.data, "train")
    run = RunDir(tmp_path / "run")
    with MetricsLogger(run) as logger:
        trainer = GRPOTrainer(cfg, model, tokenizer, problems, run, logger, make_backend(cfg, model, tokenizer))
        learner = trainer.backend.learner
        chosen = [problems[i] for i in range(2) for _ in range(4)]
        traj = trainer.backend.engine.sample([format_prompt(p.question, tokenizer) for p in chosen], seed=0)
        assert len(set(traj.batch.lengths.tolist())) > 1  # rows of different lengths: trimming matters
        rewards = trainer.score(chosen, traj).rewards
        from rlatent.grpo.losses import group_advantages

        advantages = group_advantages(rewards, 4, "group")
        assert advantages.abs().sum() > 0
        grads = []

        def record_gradients(where=None):
            grads.append([p.grad.clone() for p in learner.optimizer.params])
            learner.optimizer.optimizer.zero_grad(set_to_none=True)
            return 0.0

        learner.optimizer.step = record_gradients
        for micro, logprob_micro in ((8, 64), (3, 64), (1, 64), (3, 1)):
            trainer.cfg.grpo.micro_batch_size = micro
            trainer.cfg.grpo.logprob_micro_batch_size = logprob_micro
            learner.update(traj, advantages, step=1)
    # A micro-batch computes each prompt once for the rollouts of its group it holds (`shared_prompt_sources`):
    # their gradients meet before the prompt's RMSNorms, which Llama computes in float32 even in a float64
    # model, so the three splits agree to float32 rounding of the gradients, not to float64's.
    for split in grads[1:]:
        for full, part in zip(grads[0], split):
            assert (full - part).abs().max() <= 1e-6 * full.abs().max() + 1e-15


def test_rewards_get_the_reference_solution_and_its_final_answer(tiny_model_dir, tmp_path, monkeypatch):
    """`solution` (the reference with its calculator marks, what `gsm8k_steps` reads) and `answer` (its final
    number) reach every reward, one entry per completion, in the completions' order."""
    from rlatent.config import load_config
    from rlatent.data.splits import load_split
    from rlatent.io.run_dir import MetricsLogger, RunDir
    from rlatent.model.latent_model import LatentModel

    (tmp_path / "seen_reward.py").write_text(
        "SEEN = {}\n"
        "def record(prompts, completions, solution, answer, **kwargs):\n"
        "    SEEN.update(solution=solution, answer=answer)\n"
        "    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(CONFIG, [f"model.name_or_path={tiny_model_dir}", "grpo.group_size=2", "grpo.max_new_tokens=4",
                               "grpo.rewards=[{function: 'seen_reward:record'}, {function: gsm8k_steps}]"])
    model, tokenizer = LatentModel.from_config(cfg.model, cfg.latent, torch.float32, torch.device("cpu"))
    problems, _ = load_split(cfg.data, "train")
    chosen = [problems[i] for i in (0, 0, 3, 3)]
    run = RunDir(tmp_path / "run")
    with MetricsLogger(run) as logger:
        trainer = GRPOTrainer(cfg, model, tokenizer, problems, run, logger, make_backend(cfg, model, tokenizer))
        traj = trainer.backend.engine.sample([format_prompt(p.question, tokenizer) for p in chosen], seed=0)
        metrics = reward_metrics([trainer.score(chosen, traj)], cfg.grpo.group_size)
    import seen_reward

    assert seen_reward.SEEN["solution"] == [p.answer for p in chosen]
    assert "<<" in seen_reward.SEEN["solution"][0]  # the marks are there to read
    assert seen_reward.SEEN["answer"] == [p.final_answer for p in chosen]
    assert "reward/gsm8k_steps_mean" in metrics
