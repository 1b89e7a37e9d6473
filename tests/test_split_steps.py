"""Stepwise teachers (`sft.distill.split_steps`): a mark of several operations is written one step per
operation in the order it is evaluated, the student's block is anchored at one evenly spaced slot per partial
result (the closing slot last), each teacher anchor predicts that partial result, and a run trains with it."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from rlatent.config import load_config
from rlatent.data.examples import block_spans, build_example, split_marks
from rlatent.data.marks import evaluate_expression, operations, parse_marks, strip_marks
from rlatent.data.synthetic import generate_problems
from rlatent.errors import ConfigError
from rlatent.io.run_dir import read_metrics
from rlatent.latent.batch import collate
from rlatent.run.cli import main
from rlatent.sft.distill import distill_pair
from tests.test_distill import closing_slots

CONFIG = "configs/tiny.yaml"


@pytest.mark.parametrize("expression, steps", [
    ("12*7+5", [(12, "*", 7, 84), (84, "+", 5, 89)]),
    ("(12+7)*5", [(12, "+", 7, 19), (19, "*", 5, 95)]),
    ("-5+2*3", [(2, "*", 3, 6), (-5, "+", 6, 1)]),  # precedence, and a unary sign folded into its operand
    ("48/2*3-1", [(48, "/", 2, 24), (24, "*", 3, 72), (72, "-", 1, 71)]),
    ("50%*20", [(Fraction(1, 2), "*", 20, 10)]),
    ("7//2+1", [(7, "//", 2, 3), (3, "+", 1, 4)]),
    ("3", []),
])
def test_operations_in_the_order_they_are_evaluated(expression, steps):
    found = operations(expression)
    assert [(o.left, o.op, o.right, o.value) for o in found] == steps
    if found:
        assert found[-1].value == evaluate_expression(expression)


def test_split_marks_writes_one_step_per_operation():
    answer = ("Raj then has (9 - 8) x 3 = <<(9-8)*3=3>>3 marbles.\n"
              "After that, she has 13 x 5 - 6 = $<<13*5-6=59>>59.\n#### 59")
    assert split_marks(answer, 2) == (
        "Raj then has 9 - 8 = <<9-8=1>>1, 1 * 3 = <<1*3=3>>3 marbles.\n"
        "After that, she has 13 * 5 = <<13*5=65>>65, 65 - 6 = $<<65-6=59>>59.\n#### 59", [2, 2])
    # Only the converted marks (a curriculum stage's first ones) are split.
    split, counts = split_marks(answer, 2, latent_marks=1)
    assert counts == [2] and split.endswith("13 x 5 - 6 = $<<13*5-6=59>>59.\n#### 59")
    # One slot per operation at most: with `most` 1 nothing changes.
    assert split_marks(answer, 1) == (answer, [1, 1])


@pytest.mark.parametrize("answer, counts", [
    ("He pays <<3*4+2=14>>14 dollars.", [2]),  # no written expression: the steps are written in its place
    ("It is 2 + 3 + 4 + 1 = <<2+3+4+1=10>>10.", [1]),  # three operations, more than `most`
    ("It is 10 / 3 * 3 = <<10/3*3=10>>10.", [1]),  # a partial result no decimal writes
    ("It is 5 - 12 + 20 = <<5-12+20=13>>13.", [2]),  # a negative partial result
    ("It is 3 * (2 - 5) = <<3*(2-5)=-9>>-9.", [2]),  # a negative right operand, written "3 * (-3)"
])
def test_split_marks_keeps_every_result_and_the_text_around(answer, counts):
    split, found = split_marks(answer, 2)
    assert found == counts
    marks = parse_marks(split)
    assert len(marks) == sum(counts)
    for mark in marks:  # every written step is right
        assert evaluate_expression(mark.expression) == mark.value
    assert marks[-1].result == parse_marks(answer)[-1].result
    assert ("3 * (-3) = <<3*(-3)=-9>>" in split) == ("3*(2-5)" in answer)
    assert strip_marks(split).split()[0] == strip_marks(answer).split()[0]
    assert strip_marks(split).endswith(strip_marks(answer)[-4:])


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("placement", ["replace", "insert"])
@pytest.mark.parametrize("latent_marks", [1, None])
def test_each_partial_result_has_a_slot_and_a_teacher_state(tiny_tokenizer, k, placement, latent_marks):
    problems = generate_problems(10, seed=5, min_steps=1, max_steps=3, multi_op=0.7, allow_zero=False)
    assert any(len(operations(m.expression)) == 2 for p in problems for m in parse_marks(p.answer))
    for problem in problems:
        student = build_example(problem, tiny_tokenizer, k, placement, latent_marks)
        anchored, teacher = distill_pair(problem, student, tiny_tokenizer, latent_marks, k)
        assert anchored.input_ids == student.input_ids and anchored.latent_mask == student.latent_mask
        marks = parse_marks(problem.answer)[:latent_marks]
        partials = [step.value for mark in marks for step in operations(mark.expression)] if k >= 2 else []
        anchors = iter(anchored.anchors)
        for (start, end), mark in zip(block_spans(student.latent_mask), marks, strict=True):
            count = len(operations(mark.expression))
            mine = [next(anchors) for _ in range(count)]
            assert all(start <= a < end for a in mine) and mine == sorted(set(mine)) and mine[-1] == end - 1
            assert mine == [start + (end - start) * (j + 1) // count - 1 for j in range(count)]
        assert next(anchors, None) is None and len(teacher.anchors) == len(anchored.anchors) == len(partials)
        for anchor, value in zip(teacher.anchors, partials):  # the teacher is about to write that partial result
            written = tiny_tokenizer.decode(teacher.input_ids[anchor + 1 : anchor + 8]).strip(" $")
            assert re.match(r"-?\d+", written).group() == str(value)


def test_without_splitting_the_anchors_are_the_closing_slots(tiny_tokenizer):
    """`split_up_to` 1 anchors each block at its closing slot, as distillation without steps always did."""
    problems = generate_problems(6, seed=2, min_steps=2, max_steps=3, multi_op=0.5, allow_zero=False)
    students = [build_example(p, tiny_tokenizer, 3, "replace") for p in problems]
    anchored = [distill_pair(p, s, tiny_tokenizer, None, 1)[0] for p, s in zip(problems, students)]
    assert collate(anchored, 0).anchor_mask.tolist() == closing_slots(collate(students, 0)).tolist()
    assert all(len(a.anchors) == len(block_spans(s.latent_mask)) for a, s in zip(anchored, students))


@pytest.mark.parametrize("overrides", [["sft.distill.split_steps=true"],
                                       ["sft.distill.split_steps=true", "sft.distill.weight=1", "latent.k=1"]])
def test_split_steps_needs_distillation_and_a_slot_per_step(repo_root, overrides):
    with pytest.raises(ConfigError, match="sft.distill.split_steps needs sft.distill.weight > 0 and latent.k >= 2"):
        load_config(CONFIG, ["model.name_or_path=x", "latent.placement=replace", *overrides])


def test_a_stepwise_distilled_run_trains(repo_root, tiny_model_dir, tmp_path):
    assert main(["sft", CONFIG, f"model.name_or_path={tiny_model_dir}", "sft.steps=2", "sft.distill.weight=1",
                 "sft.distill.split_steps=true", "latent.placement=replace", "latent.k=2",
                 "data.synthetic.multi_op=1", "eval.limit=2", f"output.dir={tmp_path}", "output.name=run"]) == 0
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["phase"] == "train"]
    assert len(train) == 2 and all(r["distill_loss"] > 0 and r["teacher_lm_loss"] > 0 for r in train)


def test_data_split_steps_writes_every_answer_stepwise(repo_root):
    """`data.split_steps`: written CoT on the stepwise chain; the questions and final answers do not change."""
    from rlatent.data.splits import load_split

    base = ["model.name_or_path=x", "data.synthetic.multi_op=1", "data.synthetic.allow_zero=false"]
    plain = {split: load_split(load_config(CONFIG, base).data, split, 6)[0] for split in ("train", "test", "ood")}
    for split, problems in plain.items():
        stepwise = load_split(load_config(CONFIG, [*base, "data.split_steps=2"]).data, split, 6)[0]
        assert [p.answer for p in stepwise] == [split_marks(p.answer, 2)[0] for p in problems]
        assert [(p.question, p.final_answer) for p in stepwise] == [(p.question, p.final_answer) for p in problems]
        assert sum(p.answer != q.answer for p, q in zip(stepwise, problems)) >= 3
