"""scripts/latent_use.py measures a checkpoint exactly as its run measured itself: on a run's final checkpoint it
reproduces the run's last phase-1 diagnostics, whether named by run directory or by checkpoint."""

import json
import sys
from pathlib import Path

import pytest

from rlatent.io.run_dir import read_metrics
from rlatent.run.cli import main
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ["lm_loss", "next_step_loss", "latent_gain_zeros", "latent_gain_noise", "latent_gain_shuffle",
            "start_f1", "stop_f1", "latent_norm"]


@pytest.fixture(scope="module")
def latent_use():
    return load_script("latent_use")


def test_it_reproduces_the_runs_own_diagnostics(latent_use, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["sft", "configs/tiny.yaml", f"output.dir={tmp_path}", "output.name=run",
                 f"model.name_or_path={tiny_model_dir}", "sft.steps=2", "sft.eval_every=2"]) == 0
    run = tmp_path / "run"
    last = [r for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "eval"][-1]
    assert all(isinstance(last[key], float) for key in COMPARED), last
    out = tmp_path / "use.json"
    monkeypatch.setattr(sys, "argv", ["latent_use.py", f"by_run={run}",
                                      f"by_checkpoint={run / 'checkpoints' / 'step_000002'}", "--json", str(out)])
    latent_use.main()
    results = json.loads(out.read_text())
    for name in ("by_run", "by_checkpoint"):
        assert {key: results[name][key] for key in COMPARED} == {key: last[key] for key in COMPARED}, name
        assert results[name]["checkpoint"].endswith("step_000002") and results[name]["examples"] == 4
    more = latent_use.measure(run, batches=2)  # the tiny eval split has 8 problems: two batches of 4
    assert more["examples"] == 8 and more["latent_gain_shuffle"] != last["latent_gain_shuffle"]
    wide = latent_use.measure(run, batches=1, batch_size=8)  # one batch of all 8: other donors for the shuffle
    assert wide["examples"] == 8 and wide["latent_gain_shuffle"] != more["latent_gain_shuffle"]
    assert "by_checkpoint" in capsys.readouterr().out


def test_a_path_that_is_neither_run_nor_checkpoint_is_one_line(latent_use, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["latent_use.py", f"x={tmp_path}"])
    with pytest.raises(SystemExit, match="neither a run directory"):
        latent_use.main()
    monkeypatch.setattr(sys, "argv", ["latent_use.py", str(tmp_path)])
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        latent_use.main()
