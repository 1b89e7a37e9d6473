"""`rlatent diagnose`: its gains measure a checkpoint exactly as its run measured itself (on a run's final
checkpoint it reproduces the run's last phase-1 diagnostics, whether named by run directory or by
checkpoint); the JSON goes to each run's own file or to `--json`; bad input is one line, exit 2."""

import json
from pathlib import Path

import pytest

from rlatent.io.run_dir import read_metrics
from rlatent.run.api import load
from rlatent.run.cli import main
from rlatent.run.diagnose import diagnose, latent_use

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ["lm_loss", "next_step_loss", "latent_gain_zeros", "latent_gain_noise", "latent_gain_shuffle",
            "start_f1", "stop_f1", "latent_norm"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnose")
    assert main(["sft", str(ROOT / "configs" / "tiny.yaml"), f"output.dir={out}", "output.name=run",
                 f"model.name_or_path={tiny_model_dir}", "sft.steps=2", "sft.eval_every=2"]) == 0
    return out / "run"


def test_gains_reproduce_the_runs_own_diagnostics(run, tmp_path, capsys):
    last = [r for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "eval"][-1]
    assert all(isinstance(last[key], float) for key in COMPARED), last
    checkpoint = run / "checkpoints" / "step_000002"
    out = tmp_path / "gains.json"
    assert main(["diagnose", str(run), str(checkpoint), "--only", "gains", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["paired_steps"] == [] and list(written["runs"]) == [str(run), str(checkpoint)]
    for report in written["runs"].values():
        assert {key: report["gains"][key] for key in COMPARED} == {key: last[key] for key in COMPARED}
        assert report["checkpoint"] == str(checkpoint) and report["gains"]["examples"] == 4
        assert set(report) == {"run", "checkpoint", "gains"}
    assert f"| {checkpoint} | step_000002 | 4 |" in capsys.readouterr().out
    more = latent_use(load(run), batches=2)  # the tiny eval split has 8 problems: two batches of 4
    assert more["examples"] == 8 and more["latent_gain_shuffle"] != last["latent_gain_shuffle"]
    wide = latent_use(load(run, overrides=["sft.batch_size=8"]), batches=1)  # other donors for the shuffle
    assert wide["examples"] == 8 and wide["latent_gain_shuffle"] != more["latent_gain_shuffle"]
    assert main(["diagnose", str(run), "--only", "gains", "--batches", "1", "--batch-size", "8",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["runs"][str(run)]["gains"] == wide


def test_gains_reproduce_a_phase_2_runs_own_diagnostics(run, tiny_model_dir, tmp_path):
    """A phase-2-only run measures its final model on the examples phase 1 measures (`held_out_examples`),
    and so does `rlatent diagnose`: the `eval_grpo` record is reproduced exactly."""
    assert main(["grpo", str(ROOT / "configs" / "tiny.yaml"), f"model.name_or_path={tiny_model_dir}",
                 f"grpo.init_checkpoint={run / 'checkpoints' / 'step_000002'}", "grpo.steps=1",
                 f"output.dir={tmp_path}", "output.name=p2"]) == 0
    [logged] = [r for r in read_metrics(tmp_path / "p2" / "metrics.jsonl") if r["phase"] == "eval_grpo"]
    report, _ = diagnose(str(tmp_path / "p2"), [], ["gains"])
    assert {key: report["gains"][key] for key in COMPARED} == {key: logged[key] for key in COMPARED}


def test_each_run_writes_its_own_json_by_default(run, capsys):
    checkpoint = run / "checkpoints" / "step_000002"
    assert main(["diagnose", str(run), str(checkpoint), "--only", "tokens,steps"]) == 0
    mine, of_checkpoint = run / "diagnose.json", run / "diagnose-step_000002.json"
    report, _ = diagnose(str(run), [], ["tokens", "steps"])
    assert json.loads(mine.read_text()) == report
    assert json.loads(of_checkpoint.read_text()) == {**report, "run": str(checkpoint)}
    assert set(report["steps"]) == {"test", "ood"} and report["tokens"]["test"]["answers"] == 4
    printed = capsys.readouterr().out
    assert "accuracy per step" in printed and "nearest tokens of the latents" in printed
    assert "runs paired" in printed  # the run and its own final checkpoint: every step concordant


@pytest.mark.parametrize("words, says", [
    (["{tmp}"], "neither a run directory (config.yaml) nor a checkpoint (latent.json)"),
    (["{run}", "--only", "gains,weights"], "--only gains,weights: sections are gains, tokens, text, steps, slots"),
    (["{run}", "{run}", "--samples", "x.jsonl"], "--samples names one run's samples file; give one RUN"),
    (["{run}", "--samples", "{tmp}/none.jsonl", "--only", "steps"], "none.jsonl: no such file"),
    (["{run}", "latent.k=0", "--only", "steps"], "latent.k"),
    (["{run}", "--split", "dev", "--only", "text"], "the run holds no samples of the dev split"),
])
def test_bad_input_is_one_line(run, tmp_path, capsys, words, says):
    assert main(["diagnose", *[w.format(tmp=tmp_path, run=run) for w in words]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlatent: error: ") and len(err.strip().splitlines()) == 1 and says in err
