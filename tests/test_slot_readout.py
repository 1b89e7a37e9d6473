"""`rlatent.run.slot_readout` and `rlatent diagnose --only slots`: each aligned slot read against its partial
result's first digit, counted exactly."""

import json
from collections import Counter
from pathlib import Path

import pytest

import torch

from rlatent.config import load_config
from rlatent.data.examples import build_example, special_token_ids
from rlatent.data.gsm8k import Problem
from rlatent.data.splits import load_split
from rlatent.data.synthetic import generate_problems
from rlatent.run import slot_readout
from rlatent.run.cli import main
from tests.test_invariant import build_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_roles_name_each_partial_result():
    problem = Problem("q", "He has 12 * 7 + 5 = <<12*7+5=89>>89.\nThen 89 - 3 = <<89-3=86>>86.\n"
                           "Then 2 + 3 + 4 + 1 = <<2+3+4+1=10>>10.\n#### 10", "10", "t")
    assert slot_readout.roles(problem, 2) == ["1/2", "2/2", "1/1", "1/1"]


@pytest.mark.parametrize("trunk", ["shared", "two"])
def test_a_block_cut_at_its_closing_slot_reads_as_the_whole_sequence(tiny_model_dir, trunk):
    """Cut after the closing slot with the lead token appended, the sequence is the full one's prefix: the
    causal model's next token there is the full sequence's, in every latent mode."""
    model, tokenizer = build_model(tiny_model_dir, trunk)
    problems = generate_problems(4, seed=1, min_steps=2, max_steps=3, multi_op=0.5, allow_zero=False)
    students = [build_example(p, tokenizer, 2, "replace") for p in problems]
    _, pad_id = special_token_ids(tokenizer)
    cuts, positions = [], []
    for student in students:
        for i, slot in enumerate(student.latent_mask):
            if slot and not student.latent_mask[i + 1]:
                cuts.append(slot_readout.cut_after(student, i, student.input_ids[i + 1]))
                positions.append([i + 1])
    full = [students[row] for row, student in enumerate(students)
            for i, slot in enumerate(student.latent_mask) if slot and not student.latent_mask[i + 1]]
    assert len(cuts) >= 5
    with torch.no_grad():
        assert slot_readout.next_tokens(model, cuts, [[len(c.input_ids) - 1] for c in cuts], pad_id) == \
            slot_readout.next_tokens(model, full, positions, pad_id)


def test_readout_counts_every_slot_of_a_stepwise_run(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.chdir(ROOT)
    assert main(["sft", "configs/tiny.yaml", f"model.name_or_path={tiny_model_dir}", "sft.steps=1",
                 "sft.distill.weight=1", "sft.distill.split_steps=true", "latent.k=2", "latent.placement=replace",
                 "data.synthetic.multi_op=0.5", "eval.limit=6", f"output.dir={tmp_path}", "output.name=run"]) == 0
    run = tmp_path / "run"
    out = tmp_path / "readout.json"
    assert main(["diagnose", str(run), "--only", "slots", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["runs"][str(run)]["slots"]
    problems = load_split(load_config(str(run / "config.yaml")).data, "test", 6)[0]
    expected = Counter(role for problem in problems for role in slot_readout.roles(problem, 2))
    assert {"1/1", "1/2", "2/2"} <= expected.keys() and expected["1/2"] == expected["2/2"]
    assert result["problems"] == 6 and result["split_steps"] and result["slots"].keys() == expected.keys()
    for role, tally in result["slots"].items():
        assert tally["slots"] == expected[role] and 1 <= tally["commonest_first"] <= tally["slots"]
        assert 0 <= tally["student_right"] <= tally["slots"] and 0 <= tally["teacher_right"] <= tally["slots"]
