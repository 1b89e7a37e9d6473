"""Hardening, second round (issue 43), through `rlatent.run.cli.main` on the tiny model: a diverging loss is
told on the console; `rlatent eval` refuses overrides it cannot apply to a trained checkpoint and names each
edit of config.yaml it ignores; a missing run directory is named as one. (YAML aliases, `sft.lr` above 1 and
the console line for skipped rows are in `test_hardening.py`'s tables.)"""

from __future__ import annotations

import json
import shutil

import pytest

from rlatent.run.cli import main
from test_hardening import CONFIG, cli, error_line, snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def warnings(out: str) -> list[str]:
    return [line for line in out.split("\n") if line.startswith("WARNING sft step")]


def test_a_loss_grown_tenfold_is_a_warning(tiny_model_dir, tmp_path, capsys):
    """`sft.lr=1` (the largest taken) on full fine-tuning goes 9.6 -> 71 -> 110: one warning, and the run ends
    as asked (exit 0, its checkpoint written). The tiny config's own lr gives none."""
    diverging = ["model.lora_r=0", "sft.lr=1", "sft.schedule=constant", "sft.warmup_steps=0", "sft.steps=4",
                 "sft.eval_every=4"]
    assert main(cli("sft", tiny_model_dir, tmp_path, "high", *diverging)) == 0
    told = warnings(capsys.readouterr().out)
    assert len(told) == 1 and "the first step's" in told[0] and "sft.lr 1 is likely too high" in told[0], told
    assert (tmp_path / "high" / "checkpoints" / "step_000004" / "heads.safetensors").is_file()
    assert main(cli("sft", tiny_model_dir, tmp_path, "calm")) == 0
    assert warnings(capsys.readouterr().out) == []


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A finished phase-1 run of the tiny model."""
    root = tmp_path_factory.mktemp("trained")
    assert main(cli("sft", tiny_model_dir, root, "run")) == 0
    return root / "run"


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


@pytest.mark.parametrize("overrides, named", [
    (["latent.k=5", "model.lora_r=8"], "overrides latent.k, model.lora_r cannot apply"),
    (["sft.lr=0.5", "latent={mode: pause}"], "overrides sft.lr, latent.mode cannot apply"),
    (["data.max_length=64"], "override data.max_length cannot apply"),
])
def test_eval_refuses_overrides_a_trained_checkpoint_cannot_take(overrides, named, run, capsys):
    before = snapshot(run)
    assert main(["eval", str(run), "--limit", "2", *overrides]) == 2
    line = error_line(capsys)
    assert named in line and f"the trained checkpoint {run / 'checkpoints' / 'step_000002'}" in line, line
    assert snapshot(run) == before  # no evals/ written


def test_eval_applies_sampling_and_data_overrides(run):
    assert main(["eval", str(run), "--limit", "2", "latent.start_threshold=0.8", "data.synthetic.seed=7",
                 "eval.max_new_tokens=3", "model.device=cpu", "seed=1"]) == 0
    metrics = json.loads(next(run.glob("evals/*/metrics.json")).read_text())
    assert metrics["problems"] == 2 and metrics["tokens_per_answer"] <= 3


def test_eval_names_each_edit_of_config_yaml_it_ignores(run, capsys):
    text = (run / "config.yaml").read_text()
    edited = (text.replace("lora_r: 4", "lora_r: 8").replace("  k: 2", "  k: 5")
              .replace("max_new_tokens: 8", "max_new_tokens: 3", 1))  # eval's, the first
    assert edited.count("\n") == text.count("\n") and edited != text
    (run / "config.yaml").write_text(edited)
    assert main(["eval", str(run), "--limit", "2"]) == 0
    checkpoint = run / "checkpoints" / "step_000002"
    told = [line for line in capsys.readouterr().out.split("\n") if "ignored" in line]
    assert told == [f"{run / 'config.yaml'}: {key} ignored: eval evaluates {checkpoint} as trained"
                    for key in ("latent.k (2 -> 5)", "model.lora_r (4 -> 8)")], told
    metrics = json.loads(next(run.glob("evals/*/metrics.json")).read_text())
    assert metrics["tokens_per_answer"] <= 3  # the edit eval applies is applied
    assert (run / "config.yaml").read_text() == edited


def test_eval_of_a_config_refuses_training_overrides_only(tiny_model_dir, tmp_path, capsys):
    argv = ["eval", CONFIG, f"model.name_or_path={tiny_model_dir}", f"output.dir={tmp_path}", "--limit", "2",
            "eval.max_new_tokens=4"]
    assert main([*argv, "sft.steps=3", "grpo.lr=0.5"]) == 2
    assert error_line(capsys).endswith("overrides sft.steps, grpo.lr cannot apply to an evaluation: it reads no "
                                       "training settings")
    assert not (tmp_path / "evals").exists()
    assert main([*argv, "model.lora_r=2", "latent.k=3"]) == 0  # the model is built from these
    assert len(list(tmp_path.glob("evals/*/metrics.json"))) == 1


def test_eval_names_a_missing_run_directory(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "runs" / "nope")]) == 2
    assert error_line(capsys) == f"rlatent: error: {tmp_path / 'runs' / 'nope'}: no such run directory"
    assert main(["eval", str(tmp_path)]) == 2
    assert error_line(capsys) == f"rlatent: error: {tmp_path}: not a run directory (config.yaml missing)"
    assert main(["eval", str(tmp_path / "nope.yaml")]) == 2
    assert error_line(capsys) == f"rlatent: error: {tmp_path / 'nope.yaml'}: config file not found"
    assert list(tmp_path.iterdir()) == []
