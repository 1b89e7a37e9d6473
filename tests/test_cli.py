"""End-to-end `rlatent sft` / `rlatent eval` runs on the tiny model, and bad inputs through the CLI.

Each run is 2 optimizer steps on a handful of synthetic problems: enough to
exercise every stage (training, diagnostics, checkpoint, sampling, report).
"""

import json
import shutil
from pathlib import Path

import pytest

from rlatent.run.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")
SMALL = ["sft.steps=2", "sft.eval_every=1", "sft.batch_size=2", "data.synthetic.num_train=8",
         "data.synthetic.num_eval=4", "eval.limit=4", "eval.batch_size=4", "eval.max_new_tokens=8",
         "eval.num_samples=2"]


def sft_args(model_dir, output_dir, name, *extra):
    return ["sft", CONFIG, f"model.name_or_path={model_dir}", f"output.dir={output_dir}", f"output.name={name}",
            *SMALL, *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rlatent: error: "), err
    return lines[0]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


VARIANTS = {"latent": [], "none": ["latent.mode=none"], "pause": ["latent.mode=pause"], "two": ["latent.trunk=two"]}


def run_status(argv):
    """main()'s status, or the exception it raised (a crash is reported by the test that needs the run)."""
    try:
        return main(argv)
    except Exception as error:  # noqa: BLE001
        return error


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Per latent variant, on first use: one finished sft run followed by one eval."""
    output = tmp_path_factory.mktemp("runs")
    done = {}

    def get(name):
        if name not in done:
            sft_status = run_status(sft_args(tiny_model_dir, output, name, *VARIANTS[name]))
            eval_status = run_status(["eval", str(output / name), "--limit", "4"]) if sft_status == 0 else None
            done[name] = (output / name, sft_status, eval_status)
        return done[name]

    return get


def eval_metrics(run_dir: Path) -> dict:
    found = sorted(run_dir.glob("evals/*/metrics.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def test_sft_leaves_a_complete_run_directory(runs):
    run_dir, sft_status, _ = runs("latent")
    assert sft_status == 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "report.md").is_file()
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    evals = [r for r in records if r["phase"] == "eval"]
    assert any(isinstance(r.get("latent_gain_zeros"), float) for r in evals)
    assert all(key in evals[-1] for key in ("latent_gain_noise", "latent_gain_shuffle", "start_f1", "stop_f1"))
    test = [r for r in records if r["phase"] == "test"]
    assert len(test) == 1 and "accuracy" in test[0]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = run_dir / "checkpoints" / "step_000002"
    assert (checkpoint / "heads.safetensors").is_file() and (checkpoint / "latent.json").is_file()
    assert (checkpoint / "adapter").is_dir()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000002"]  # no leftovers
    assert list((run_dir / "plots").glob("*.png"))
    samples = read_jsonl(run_dir / "samples" / "eval_samples.jsonl")
    assert len(samples) == 2 and all({"question", "completion", "latents", "correct"} <= set(s) for s in samples)
    report = (run_dir / "report.md").read_text()
    assert "Latent use" in report


def test_resolved_config_reloads(runs):
    from rlatent.config import load_config

    run_dir, _, _ = runs("latent")
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.sft.steps == 2 and cfg.output.name == "latent" and cfg.latent.mode == "latent"


@pytest.mark.parametrize("variant", ["latent", "none", "pause", "two"])
def test_sft_then_eval(runs, variant):
    run_dir, sft_status, eval_status = runs(variant)
    assert sft_status == 0
    assert (run_dir / "checkpoints" / "step_000002" / "latent.json").is_file()
    assert eval_status == 0
    metrics = eval_metrics(run_dir)
    assert {"accuracy", "latents_per_answer", "tokens_per_answer", "problems"} <= set(metrics)
    assert metrics["problems"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["checkpoint"].endswith("step_000002")
    if variant == "none":
        assert metrics["latents_per_answer"] == 0
        evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["phase"] == "eval"]
        assert evals and not any("latent_gain_zeros" in r for r in evals)


def test_eval_on_the_out_of_distribution_split(runs, tmp_path, capsys):
    from rlatent.config import load_config
    from rlatent.data.splits import load_split

    run_dir = tmp_path / "copy"
    shutil.copytree(runs("latent")[0], run_dir, ignore=shutil.ignore_patterns("evals"))
    assert main(["eval", str(run_dir), "--limit", "3", "--split", "ood"]) == 0
    metrics = eval_metrics(run_dir)
    assert metrics["split"] == "ood" and metrics["problems"] == 3
    data = load_config(run_dir / "config.yaml").data
    asked = [r["question"] for r in read_jsonl(next(run_dir.glob("evals/*/samples.jsonl")))]  # eval.num_samples
    assert asked and asked == [p.question for p in load_split(data, "ood", 3)[0]][: len(asked)]
    assert asked != [p.question for p in load_split(data, "test", 3)[0]][: len(asked)]
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--split", "ood", "data.source=gsm8k", "data.path=/nowhere"]) == 2
    assert "data.source gsm8k has no out-of-distribution split" in capsys.readouterr().err


def test_pause_blocks_are_k_long(runs):
    run_dir, _, _ = runs("pause")
    metrics = eval_metrics(run_dir)
    assert metrics["latents_per_answer"] == pytest.approx(2 * metrics["blocks_per_answer"])


def test_existing_run_is_refused_and_left_untouched(runs, tiny_model_dir, capsys):
    run_dir, _, _ = runs("latent")
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(sft_args(tiny_model_dir, run_dir.parent, "latent")) == 2
    line = one_error_line(capsys)
    assert "output.name" in line and str(run_dir) in line
    assert snapshot(run_dir) == before


# ---- bad input: one line on stderr, status 2 -------------------------------------------------------


def test_unknown_config_key(tiny_model_dir, tmp_path, capsys):
    assert main(sft_args(tiny_model_dir, tmp_path, "r", "sft.lrr=0.1")) == 2
    line = one_error_line(capsys)
    assert "sft.lrr" in line and "tiny.yaml" in line
    assert not (tmp_path / "r").exists()


def test_wrong_type(tiny_model_dir, tmp_path, capsys):
    assert main(sft_args(tiny_model_dir, tmp_path, "r", "sft.steps=abc")) == 2
    assert "sft.steps" in one_error_line(capsys)


def test_missing_config_file(tmp_path, capsys):
    assert main(["sft", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in one_error_line(capsys)


def test_missing_model_dir(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert main(sft_args(missing, tmp_path / "out", "r")) == 2
    line = one_error_line(capsys)
    assert "model.name_or_path" in line and str(missing) in line


def test_malformed_jsonl_line(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    good = json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"})
    data.write_text(good + "\n" + '{"question": "oops", "answer": \n' + good + "\n")
    assert main(sft_args(tiny_model_dir, tmp_path / "out", "r", "data.source=gsm8k", f"data.path={data}")) == 2
    line = one_error_line(capsys)
    assert f"{data}:2" in line


def test_eval_of_a_run_without_checkpoint(tiny_model_dir, tmp_path, capsys):
    from rlatent.config import load_config

    run_dir = tmp_path / "empty_run"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = load_config(CONFIG, [f"model.name_or_path={tiny_model_dir}"])
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    assert main(["eval", str(run_dir), "--limit", "4"]) == 2
    line = one_error_line(capsys)
    assert str(run_dir) in line and "checkpoint" in line


def test_eval_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--limit", "4"]) == 2
    assert str(tmp_path) in one_error_line(capsys)


def test_eval_of_a_corrupt_checkpoint(runs, tmp_path, capsys):
    source, _, _ = runs("latent")
    run_dir = tmp_path / "copy"
    shutil.copytree(source, run_dir)
    heads = run_dir / "checkpoints" / "step_000002" / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:20])
    assert main(["eval", str(run_dir), "--limit", "4"]) == 2
    # The base model loads before the heads, so library progress bars may precede the error line.
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith("rlatent: error: ")] == lines[-1:], err
    assert str(heads) in lines[-1]


def test_eval_with_an_invalid_limit(runs, capsys):
    run_dir, _, _ = runs("latent")
    capsys.readouterr()
    assert run_status(["eval", str(run_dir), "--limit", "0"]) == 2
    assert "eval.limit" in one_error_line(capsys)


@pytest.mark.parametrize("command", [[], ["sft"], ["grpo"], ["train"], ["eval"], ["ablate"], ["diagnose"],
                                     ["config"], ["tiny-model"]])
def test_every_help_prints(command, capsys):
    """argparse %-formats help strings: a bare `%` in one (a "95% interval") turned `rlatent --help`
    into a TypeError traceback."""
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlatent")
    if not command:
        assert "95% intervals" in out
