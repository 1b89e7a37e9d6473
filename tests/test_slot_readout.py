"""`scripts/slot_readout.py`: each aligned slot read against its partial result's first digit, counted exactly."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from rlatent.config import load_config
from rlatent.data.gsm8k import Problem
from rlatent.data.marks import canonical_number, operations, parse_marks
from rlatent.data.splits import load_split
from rlatent.run.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slot_readout.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("slot_readout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roles_name_each_partial_result_and_its_first_digit():
    problem = Problem("q", "He has 12 * 7 + 5 = <<12*7+5=89>>89.\nThen 89 - 3 = <<89-3=86>>86.\n"
                           "Then 2 + 3 + 4 + 1 = <<2+3+4+1=10>>10.\n#### 10", "10", "t")
    assert load_script().roles(problem, 2) == [("1/2", "8"), ("2/2", "8"), ("1/1", "8"), ("1/1", "1")]


def test_readout_counts_every_slot_of_a_stepwise_run(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.chdir(ROOT)
    assert main(["sft", "configs/tiny.yaml", f"model.name_or_path={tiny_model_dir}", "sft.steps=1",
                 "sft.distill.weight=1", "sft.distill.split_steps=true", "latent.k=2", "latent.placement=replace",
                 "data.synthetic.multi_op=0.5", "eval.limit=6", f"output.dir={tmp_path}", "output.name=run"]) == 0
    run = tmp_path / "run"
    script = load_script()
    out = tmp_path / "readout.json"
    assert script.main([str(run), "--batch-size", "4", "--json", str(out)]) == 0
    [result] = json.loads(out.read_text())
    problems = load_split(load_config(str(run / "config.yaml")).data, "test", 6)[0]
    expected: dict[str, Counter] = {}
    for problem in problems:  # the partial results, from the reference marks
        for mark in parse_marks(problem.answer):
            steps = operations(mark.expression)
            values = [canonical_number(s.value) for s in steps] if len(steps) == 2 else [mark.result]
            for j, value in enumerate(values):
                expected.setdefault(f"{j + 1}/{len(values)}", Counter())[value[0]] += 1
    assert {"1/1", "1/2", "2/2"} <= expected.keys()
    assert result["problems"] == 6 and result["split_steps"] and result["slots"].keys() == expected.keys()
    for role, tally in result["slots"].items():
        assert tally["slots"] == sum(expected[role].values())
        assert tally["commonest_digit"] == max(expected[role].values())
        assert 0 <= tally["student_right"] <= tally["slots"] and 0 <= tally["teacher_right"] <= tally["slots"]
