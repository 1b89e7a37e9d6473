"""`grpo.reward_errors: zero` through the CLI on the tiny model (issue 43): failures are printed every step
they happen and summed at the end of the phase, and a reward that fails on every sample for
`grpo.reward_errors_max_steps` steps in a row stops the run with one error line (exit 2), keeping what was
written before and writing nothing for the step it stopped in."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlatent.run.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
SMALL = ["data.synthetic.num_train=8", "data.synthetic.num_eval=4", "eval.limit=4", "eval.batch_size=4",
         "eval.max_new_tokens=8", "eval.num_samples=2", "grpo.prompts_per_step=2", "grpo.group_size=2",
         "grpo.max_new_tokens=8", "grpo.reward_errors=zero"]


def broken(prompts, completions, **kwargs):
    raise ValueError("the grader is down")


def flaky(prompts, completions, **kwargs):
    """NaN on every other completion: half of each step's samples fail."""
    return [math.nan if i % 2 else 1.0 for i in range(len(completions))]


def grpo(model_dir, out, name, *extra):
    return ["grpo", CONFIG, f"model.name_or_path={model_dir}", f"output.dir={out}", f"output.name={name}", *SMALL,
            *extra]


def grpo_steps(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["phase"] == "grpo"]


def test_a_reward_failing_on_every_sample_stops_the_run_after_n_steps(tiny_model_dir, tmp_path, capsys, caplog):
    argv = grpo(tiny_model_dir, tmp_path, "down", "grpo.rewards=[{function: 'test_reward_errors:broken'}]",
                "grpo.steps=6", "grpo.save_every=1", "grpo.reward_errors_max_steps=3")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "rlatent: error:" in line]
    assert errors == [lines[-1]] == [
        "rlatent: error: grpo step 3: reward 'broken' failed on every sample for 3 steps in a row, so the run "
        "learns nothing from it (its first error was printed above); fix the reward, or set "
        "grpo.reward_errors_max_steps (0 = never stop)"]
    told = [record.getMessage() for record in caplog.records if "the grader is down" in record.getMessage()]
    assert len(told) == 1  # the first failure's reason, once (a warning: on stderr outside pytest)
    for step in (1, 2):
        assert (f"grpo step {step}: reward 'broken' failed on 4 of 4 samples, scored 0.0 "
                "(grpo.reward_errors: zero)") in lines
    run = tmp_path / "down"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert [row["step"] for row in grpo_steps(run)] == [1, 2]
    assert [row["reward/broken_zeroed"] for row in grpo_steps(run)] == [4.0, 4.0]
    assert not (run / "report.md").exists()


def test_failures_that_go_on_are_printed_each_step_and_summed_at_the_end(tiny_model_dir, tmp_path, capsys):
    """`reward_errors_max_steps: 0` never stops; a reward failing on part of the samples never stops either."""
    rewards = "grpo.rewards=[{function: 'test_reward_errors:broken'}, {function: 'test_reward_errors:flaky'}]"
    assert main(grpo(tiny_model_dir, tmp_path, "partial", rewards, "grpo.steps=3", "grpo.reward_errors_max_steps=0")) == 0
    lines = capsys.readouterr().err.splitlines()
    for step in (1, 2, 3):
        assert f"grpo step {step}: reward 'broken' failed on 4 of 4 samples, scored 0.0 (grpo.reward_errors: zero)" \
            in lines
        assert f"grpo step {step}: reward 'flaky' failed on 2 of 4 samples, scored 0.0 (grpo.reward_errors: zero)" \
            in lines
    assert "grpo: reward 'broken' failed on 12 samples in 3 of 3 steps, each scored 0.0 (grpo.reward_errors: zero)" \
        in lines
    assert "grpo: reward 'flaky' failed on 6 samples in 3 of 3 steps, each scored 0.0 (grpo.reward_errors: zero)" \
        in lines
    steps = grpo_steps(tmp_path / "partial")
    assert [row["reward/flaky_zeroed"] for row in steps] == [2.0] * 3
    assert [row["reward/broken_zeroed"] for row in steps] == [4.0] * 3
