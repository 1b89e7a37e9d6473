"""Hardening (issue 12), through `rlatent.run.cli.main` on the tiny model: every bad input or fault of the
machine ends in one `rlatent: error:` line (exit 2) with nothing already written lost; a run killed with
SIGKILL and resumed equals an uninterrupted one, metrics.jsonl included; no resume silently becomes a
different model or config."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlatent.run.cli import main, parse_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")
SMALL = ["sft.steps=2", "sft.eval_every=1", "sft.batch_size=2", "data.synthetic.num_train=8",
         "data.synthetic.num_eval=4", "eval.limit=4", "eval.batch_size=4", "eval.max_new_tokens=8",
         "eval.num_samples=2", "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.group_size=2"]
GOOD_ROW = json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"})
TIMING = ("time", "step_seconds", "wall_seconds", "time_rollout", "time_reward", "time_resample", "time_update",
          "time_update_old_logprobs", "time_update_reference", "time_update_forward", "time_update_backward",
          "time_update_optimizer", "sync_seconds")
REWARDS = '''
import os

FLAG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interrupt_after")


def alternate(prompts, completions, **kwargs):
    """1, 0, 1, 0...: a signal that moves the weights. With the flag file holding n, the (n+1)-th call from
    then on raises KeyboardInterrupt (Ctrl-C inside a reward), once."""
    if os.path.exists(FLAG):
        left = int(open(FLAG).read())
        if left == 0:
            os.remove(FLAG)
            raise KeyboardInterrupt
        open(FLAG, "w").write(str(left - 1))
    return [float(i % 2) for i in range(len(completions))]


def leave(prompts, completions, **kwargs):
    raise SystemExit(3)
'''
ALTERNATE = "grpo.rewards=[{function: 'hardening_rewards:alternate'}]"


def cli(command, model_dir, out, name, *extra):
    return [command, CONFIG, f"model.name_or_path={model_dir}", f"output.dir={out}", f"output.name={name}",
            *SMALL, *extra]


def error_line(capsys) -> str:
    """The one `rlatent: error:` line: the last on stderr and a line of its own (progress bars end theirs)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.split("\n") if line.strip()]
    errors = [line for line in lines if "rlatent: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("rlatent: error: ") and errors[0] == lines[-1], err
    return errors[0]


def records(run: Path, strip_timing: bool = True) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows] if strip_timing else rows


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def unfinished_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    record = json.loads((target / "run.json").read_text())
    (target / "run.json").write_text(json.dumps({**record, "finished": False}))
    return target


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "hardening_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


# ---- bad input: one line, status 2, no half-made run directory ---------------------------------------


def _config_file(text: bytes):
    def make(tmp, model):
        path = tmp / "bad.yaml"
        path.write_bytes(text.replace(b"MODEL", str(model).encode()))
        return ["sft", str(path)]
    return make


def _gsm8k(train: bytes | None = None, test: bytes | None = None, *extra):
    def make(tmp, model):
        data = tmp / "gsm8k"
        data.mkdir()
        (data / "train.jsonl").write_bytes((GOOD_ROW + "\n").encode() * 8 if train is None else train)
        (data / "test.jsonl").write_bytes((GOOD_ROW + "\n").encode() * 4 if test is None else test)
        return cli("sft", model, tmp / "out", "r", "data.source=gsm8k", f"data.path={data}", *extra)
    return make


def _model_copy(damage):
    def make(tmp, model):
        copy = tmp / "model"
        shutil.copytree(model, copy)
        damage(copy)
        return cli("sft", copy, tmp / "out", "r")
    return make


def _truncate(copy):
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _no_tokenizer(copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()


def _overrides(*extra, command="sft"):
    return lambda tmp, model: cli(command, model, tmp / "out", "r", *extra)


def _output_is_a_file(tmp, model):
    (tmp / "a_file").write_text("x")
    return cli("sft", model, tmp / "a_file", "r")


def _corrupt_run_record(tmp, model):
    from rlatent.config import load_config

    run = tmp / "out" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(load_config(CONFIG, [f"model.name_or_path={model}"]).to_yaml())
    (run / "run.json").write_text("{oops")
    return ["train", "--resume", str(run)]


ALIAS_BOMB = (b"model: {name_or_path: MODEL}\ngrpo:\n  rewards:\n  - function: gsm8k_correct\n    kwargs:\n"
              b"      l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
              + b"".join(b"      l%d: &l%d [%s]\n" % (i, i, b", ".join([b"*l%d" % (i - 1)] * 10)) for i in range(1, 6)))
"""Six levels of ten aliases in a reward's kwargs, 456 bytes: a million values once copied out (issue 43)."""
DEEP_MARK = json.dumps({"question": "q", "answer": "<<" + "(" * 3000 + "1" + ")" * 3000 + "=1>>1\n#### 1"})
BAD_INPUTS = {
    "config not UTF-8": (_config_file(b"seed: 0\nmodel: {name_or_path: MODEL}\nsft: {lr: 0.1\xff}\n"),
                         ["bad.yaml:3", "UTF-8"]),
    "config duplicate key": (_config_file(b"model: {name_or_path: MODEL}\nsft:\n  lr: 0.1\n  lr: 0.2\n"),
                             ["bad.yaml:4", "duplicate key 'lr'", "line 3"]),
    "config nested deep": (_config_file(b"seed: " + b"[" * 5000 + b"]" * 5000 + b"\n"), ["bad.yaml:1", "nested"]),
    "config YAML aliases": (_config_file(ALIAS_BOMB), ["bad.yaml:7", "YAML alias *l0 refused"]),
    "override YAML alias": (_overrides("grpo.rewards=[{function: gsm8k_correct, kwargs: {a: &a [1, 1], b: [*a, *a]}}]"),
                            ["override 'grpo.rewards=", "YAML alias *a refused"]),
    "seed -1": (_overrides("seed=-1"), ["seed"]),
    "lr inf": (_overrides("sft.lr=.inf"), ["sft.lr", "finite"]),
    "lr 1e6": (_overrides("sft.lr=1e6"), ["sft.lr: 1e+06 is above 1", "minus sign"]),
    "grpo lr 1e6": (_overrides("grpo.lr=1e6"), ["grpo.lr: 1e+06 is above 1", "minus sign"]),
    "steps true": (_overrides("sft.steps=true"), ["sft.steps", "integer"]),
    "device foo": (_overrides("model.device=foo"), ["model.device", "foo"]),
    "jsonl not UTF-8": (_gsm8k((GOOD_ROW + "\n").encode() * 8 + b'{"question": "\xff"}\n'),
                        ["train.jsonl:9", "UTF-8"]),
    "jsonl nested deep": (_gsm8k((GOOD_ROW + "\n").encode() * 8 + b"[" * 5000 + b"]" * 5000 + b"\n"),
                          ["train.jsonl:9", "nested"]),
    "mark nested deep": (_gsm8k((GOOD_ROW + "\n" + DEEP_MARK + "\n").encode()), ["train.jsonl:2", "mark"]),
    "train file empty": (_gsm8k(b""), ["train.jsonl", "no problems"]),
    "eval file empty": (_gsm8k(None, b""), ["test.jsonl", "no problems"]),
    "weights truncated": (_model_copy(_truncate), ["model.safetensors", "truncated"]),
    "tokenizer missing": (_model_copy(_no_tokenizer), ["model.name_or_path", "tokenizer"]),
    "output.dir a file": (_output_is_a_file, ["output.dir", "a_file"]),
    "output.dir under /proc": (_overrides("output.dir=/proc/rlatent-test"), ["output.dir", "/proc/rlatent-test"]),
    "reward misspelt": (_overrides("grpo.rewards=[{function: gsm8k_corect}]", command="train"),
                        ["grpo.rewards[0].function", "gsm8k_correct"]),
    "resume a missing run": (lambda tmp, model: ["train", "--resume", str(tmp / "out" / "nope")], ["nope"]),
    "resume a corrupt run.json": (_corrupt_run_record, ["run.json", "corrupt"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_no_run(case, tiny_model_dir, tmp_path, capsys):
    make, expected = BAD_INPUTS[case]
    if "/proc" in case and not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    argv = make(tmp_path, tiny_model_dir)
    assert main(argv) == 2
    line = error_line(capsys)
    assert all(text in line for text in expected), line
    left = [p for p in (tmp_path / "out").rglob("*")] if (tmp_path / "out").exists() else []
    assert left == ([] if "corrupt" not in case else left), left  # nothing made (a corrupt run is left alone)
    assert not (tmp_path / "out" / "nope").exists()


def test_skipped_bad_lines_are_counted_and_told(tiny_model_dir, tmp_path, capsys):
    argv = _gsm8k((GOOD_ROW + "\n").encode() * 8 + b'{"question": "\xff"}\n' + b"[" * 5000 + b"]" * 5000 + b"\n",
                  None, "data.on_bad_line=skip")(tmp_path, tiny_model_dir)
    assert main(argv) == 0
    assert records(tmp_path / "out" / "r")[0]["skipped_rows"] == 2
    told = [line for line in capsys.readouterr().out.split("\n") if line.startswith("data.on_bad_line")]
    data = tmp_path / "gsm8k" / "train.jsonl"
    assert told == [f"data.on_bad_line=skip: skipped 2 malformed rows: {data}:9: not UTF-8 text (byte 0xff at "
                    f"column 15); {data}:10: JSON nested deeper than 64 levels"], told


def test_machine_faults_are_one_line_and_bugs_keep_their_traceback(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from rlatent.io.run_dir import MetricsLogger

    log = MetricsLogger.log

    def disk_full(self, step, metrics, phase):
        if phase == "train" and step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "metrics.jsonl")
        log(self, step, metrics, phase=phase)

    monkeypatch.setattr(MetricsLogger, "log", disk_full)
    assert main(cli("sft", tiny_model_dir, tmp_path, "full", "sft.save_every=1")) == 2
    line = error_line(capsys)
    assert "no space left on device (metrics.jsonl)" in line and "kept" in line
    assert (tmp_path / "full" / "checkpoints" / "step_000001" / "trainer_state.pt").is_file()
    assert [r["step"] for r in records(tmp_path / "full") if r["phase"] == "train"] == [1]
    monkeypatch.undo()

    import rlatent.run.stages as stages

    def bug(*args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(stages, "require_problems", bug)
    with pytest.raises(ZeroDivisionError):
        main(cli("sft", tiny_model_dir, tmp_path, "bug"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_run_directory(tiny_model_dir, tmp_path, capsys):
    assert main(cli("sft", tiny_model_dir, tmp_path, "ro", "sft.save_every=1")) == 0
    run = unfinished_copy(tmp_path / "ro", tmp_path / "ro2")
    for path in [run, *run.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        capsys.readouterr()
        assert main(["sft", "--resume", str(run)]) == 2
        assert str(run) in error_line(capsys)
        assert main(["eval", str(run), "--limit", "2"]) == 2
        assert "evals" in error_line(capsys)
    finally:
        for path in [run, *run.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


# ---- training faults: NaN/inf weights, a failing evaluation, rewards that exit or interrupt ---------------


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_nonfinite_weights_stop_at_the_step(command, tiny_model_dir, tmp_path, capsys, rewards_module, monkeypatch):
    extra = [ALTERNATE] if command == "grpo" else []
    step = torch.optim.AdamW.step  # an lr above 1 is refused by the config: an update that leaves a NaN weight

    def poisoned(self, *args, **kwargs):
        loss = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    assert main(cli(command, tiny_model_dir, tmp_path, "nan", *extra)) == 2
    line = error_line(capsys)  # on its own line, after the progress bar's
    assert re.search(r"step \d+: trainable weights are NaN/inf", line) and "learning rate" in line, line


def test_a_failing_evaluation_keeps_the_training(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import rlatent.run.stages as stages
    from rlatent.errors import DataError

    def broken(*args, **kwargs):
        raise DataError("eval: something is wrong")

    monkeypatch.setattr(stages, "evaluate_with_engine", broken)
    assert main(cli("sft", tiny_model_dir, tmp_path, "r")) == 2
    checkpoint = tmp_path / "r" / "checkpoints" / "step_000002"
    assert f"the training is saved in {checkpoint}" in error_line(capsys)
    assert (checkpoint / "trainer_state.pt").is_file()


def test_a_reward_that_exits_is_one_line(tiny_model_dir, tmp_path, capsys, rewards_module):
    assert main(cli("train", tiny_model_dir, tmp_path, "r", "grpo.rewards=[{function: 'hardening_rewards:leave'}]")) == 2
    assert "'hardening_rewards:leave' called sys.exit(3)" in error_line(capsys)
    assert (tmp_path / "r" / "checkpoints" / "step_000002" / "trainer_state.pt").is_file()  # phase 1 kept


# ---- resume: a killed run continues exactly, metrics.jsonl included --------------------------------------

TRAIN = ["sft.steps=4", "sft.save_every=2", "grpo.steps=4", "grpo.save_every=2", "data.synthetic.num_train=16",
         ALTERNATE]
KILL_AFTER = {"phase1": ("train", 3), "phase2": ("grpo", 3)}  # one step past a checkpoint
HOLD = """
import sys, time
from rlatent.io.run_dir import MetricsLogger
from rlatent.run.cli import main
phase, step, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = MetricsLogger.log
def hold(self, at, metrics, phase_=None, **kw):
    log(self, at, metrics, phase=kw.get("phase", phase_))
    if (kw.get("phase", phase_), at) == (phase, step):
        open(marker, "w").close()
        time.sleep(600)  # killed here, with the line past the checkpoint written
MetricsLogger.log = hold
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def train_runs(tiny_model_dir, tmp_path_factory):
    """An uninterrupted `train` run (`reference`), and one SIGKILLed in each phase a step past a checkpoint.
    The killed runs run in subprocesses while the reference runs here."""
    root = tmp_path_factory.mktemp("resume")
    (root / "hardening_rewards.py").write_text(REWARDS)
    sys.path.insert(0, str(root))
    args = lambda name: cli("train", tiny_model_dir, root, name, *TRAIN)  # noqa: E731
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    procs = {where: subprocess.Popen([sys.executable, "-c", HOLD, phase, str(step), str(root / f"{where}.held"),
                                      *args(where)], cwd=root, env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(root / f"{where}.err", "w"))
             for where, (phase, step) in KILL_AFTER.items()}
    assert main(args("reference")) == 0
    for where, proc in procs.items():
        deadline = time.time() + 300
        while not (root / f"{where}.held").exists():
            assert proc.poll() is None and time.time() < deadline, (root / f"{where}.err").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    yield root
    sys.path.remove(str(root))


@pytest.mark.parametrize("where", list(KILL_AFTER))
def test_kill_and_resume_equals_an_uninterrupted_run(where, train_runs):
    run, reference = train_runs / where, train_runs / "reference"
    phase, step = KILL_AFTER[where]
    killed = records(run)
    assert (killed[-1]["phase"], killed[-1]["step"]) == (phase, step)  # a line past the last checkpoint
    assert main(["train", "--resume", str(run)]) == 0
    assert records(run) == records(reference)  # every (phase, step) once, same values, only times differ
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        sorted(p.name for p in (reference / "checkpoints").iterdir())


def test_resuming_a_finished_run_changes_nothing(train_runs, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(train_runs / "reference", run)
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert "is finished" in capsys.readouterr().out
    assert snapshot(run) == before


def test_changed_config_on_resume_is_refused_listing_the_keys(train_runs, tmp_path, capsys):
    run = unfinished_copy(train_runs / "reference", tmp_path / "copy")
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("lora_r: 4", "lora_r: 8").replace("  k: 2", "  k: 5"))
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    line = error_line(capsys)
    assert "model.lora_r (4 -> 8)" in line and "latent.k (2 -> 5)" in line
    assert snapshot(run) == before


def test_resume_tidies_a_killed_checkpoint_write_and_applies_allowed_changes(train_runs, tmp_path, capsys):
    run = unfinished_copy(train_runs / "reference", tmp_path / "copy")
    checkpoints = run / "checkpoints"
    (checkpoints / ".step_000009.tmp-abc").mkdir()  # killed while writing a checkpoint
    (checkpoints / ".step_000009.tmp-abc" / "heads.safetensors").write_bytes(b"half")
    os.replace(checkpoints / "step_000008", checkpoints / ".step_000008.old-xyz")  # killed between two renames
    (run / ".metrics.jsonl.k2j.tmp").write_text("half")
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("max_new_tokens: 8", "max_new_tokens: 6", 1))
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "changed settings: eval.max_new_tokens" in out
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        p.name for p in (train_runs / "reference" / "checkpoints").iterdir())
    assert not list(run.glob(".*.tmp"))
    tests = [(r["phase"], r["step"]) for r in records(run) if r["phase"].startswith("test")]
    assert len(tests) == len(set(tests))  # the final evaluation was dropped, then logged once again


def test_ctrl_c_in_a_reward_checkpoints_and_resumes_exactly(train_runs, tiny_model_dir, tmp_path, capsys):
    import hardening_rewards  # the module imported first (by whichever test): its flag file counts

    Path(hardening_rewards.FLAG).write_text("1")  # the 2nd reward call from now: grpo step 2
    assert main(cli("train", tiny_model_dir, tmp_path, "r", *TRAIN)) == 130
    err = capsys.readouterr().err.strip().split("\n")[-1]
    checkpoint = tmp_path / "r" / "checkpoints" / "step_000005"  # phase 1's 4 steps + grpo step 1
    assert f"interrupted in grpo after step 1; checkpoint {checkpoint}" in err
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    assert records(tmp_path / "r") == records(train_runs / "reference")


def test_eval_refuses_a_checkpoint_without_its_adapter(train_runs, tmp_path, capsys):
    run = unfinished_copy(train_runs / "reference", tmp_path / "copy")
    adapter = run / "checkpoints" / "step_000008" / "adapter"
    shutil.rmtree(adapter)
    assert main(["eval", str(run), "--limit", "2"]) == 2
    assert f"{adapter}: LoRA adapter missing" in error_line(capsys)
    assert main(["train", "--resume", str(run)]) == 2
    assert f"{adapter}: LoRA adapter missing" in error_line(capsys)
    assert not (run / "evals").exists()


def test_overrides_anywhere_on_the_line(train_runs, tmp_path):
    assert parse_args(["eval", "RUN", "a.b=1", "--limit", "2", "c.d=2"]).overrides == ["a.b=1", "c.d=2"]
    assert parse_args(["train", "CONFIG", "--resume", "X", "e.f=3"]).overrides == ["e.f=3"]
    run = tmp_path / "copy"
    shutil.copytree(train_runs / "reference", run)
    assert main(["eval", str(run), "--limit", "2", "eval.max_new_tokens=3"]) == 0
    metrics = json.loads(next(run.glob("evals/*/metrics.json")).read_text())
    assert metrics["problems"] == 2 and metrics["tokens_per_answer"] <= 3
