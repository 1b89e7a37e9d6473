"""Splits of the seeded tasks (train, test, ood) and the harder arithmetic steps.

Mark expressions are checked with `rlatent.data.marks.evaluate_expression`, the project's own
parser, never with Python's eval."""

import hashlib
import json
import re

import pytest

from rlatent.config import DataConfig, load_config
from rlatent.data.marks import evaluate_expression, parse_marks, strip_marks
from rlatent.data.splits import has_ood_split, load_split
from rlatent.data.synthetic import generate_problems
from rlatent.errors import ConfigError


def data(source="synthetic", **section) -> DataConfig:
    return DataConfig.model_validate({"source": source, source: section} if section else {"source": source})


def steps(problem) -> int:
    return len(parse_marks(problem.answer))


@pytest.mark.parametrize("source", ["synthetic", "graph"])
def test_ood_split_is_longer_and_apart(source):
    cfg = data(source, num_train=300, num_eval=50)
    train, _ = load_split(cfg, "train")
    test, _ = load_split(cfg, "test")
    ood, skipped = load_split(cfg, "ood")
    assert (len(train), len(test), len(ood), skipped) == (300, 50, 50, 0)  # num_ood null: num_eval
    section = cfg.synthetic if source == "synthetic" else cfg.graph
    low, high = section.ood_steps if source == "synthetic" else section.ood_hops
    trained = section.max_steps if source == "synthetic" else section.max_hops
    assert (low, high) == (trained + 1, trained + 2)
    assert max(map(steps, train)) == trained < low
    assert {steps(p) for p in ood} == {low, high}
    assert not {p.question for p in ood} & {p.question for p in train + test}
    assert has_ood_split(cfg)


def test_ood_counts_limits_and_ranges():
    cfg = data("graph", num_eval=10, num_ood=40, max_hops=3, ood_min_hops=6, ood_max_hops=8)
    ood, _ = load_split(cfg, "ood")
    assert len(ood) == 40 and {steps(p) for p in ood} <= {6, 7, 8}
    assert load_split(cfg, "ood", limit=5)[0] == ood[:5]  # a limit is a prefix of the full split
    cfg = data("synthetic", ood_min_steps=5)
    assert cfg.synthetic.ood_steps == (5, 6)
    with pytest.raises(ValueError, match="split must be one of"):
        load_split(cfg, "validation")


def test_gsm8k_has_no_ood_split():
    cfg = data("gsm8k")
    assert not has_ood_split(cfg)
    with pytest.raises(ConfigError, match=r"^data.source gsm8k has no out-of-distribution split$"):
        load_split(cfg, "ood")


@pytest.mark.parametrize("override, message", [
    ("data.synthetic.ood_min_steps=3", "ood_min_steps (3) must exceed max_steps (3)"),
    ("data.synthetic.ood_max_steps=3", "ood_min_steps (4) > ood_max_steps (3)"),
    ("data.graph.ood_min_hops=2", "ood_min_hops (2) must exceed max_hops (4)"),
    ("data.graph.min_hops=5", "min_hops (5) > max_hops (4)"),
    ("data.synthetic.multi_op=1.5", "data.synthetic.multi_op"),
    ("data.source=graphs", "data.source"),
])
def test_config_rejects_bad_ranges(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_defaults_keep_todays_problems():
    """The hash of these problems as generated before `max_multiplier` and `multi_op` existed."""
    problems = generate_problems(300, seed=0, operators="+-*/")
    digest = hashlib.sha256(json.dumps([[p.question, p.answer] for p in problems]).encode()).hexdigest()
    assert digest == "a97d43de1c651575292c4ad1b3030799b168d992b0695568684f02f9f86f7764"
    train, _ = load_split(DataConfig(), "train", limit=200)
    digest = hashlib.sha256(json.dumps([[p.question, p.answer] for p in train]).encode()).hexdigest()
    assert digest == "8ebf7647078f19164f57e31687405cef1da5c5a6780a14dc94aa143c7462dd37"


def check_marks(problems):
    """Every mark evaluates to its result, the result is written after it, and the written expression
    (times as `x` or `*`, any spacing) is the mark's."""
    for p in problems:
        for line, mark in zip(p.answer.split("\n"), parse_marks(p.answer, where=p.source), strict=False):
            assert evaluate_expression(mark.expression) == mark.value, p.source
            assert mark.value.denominator == 1 and mark.value >= 0
            written = strip_marks(line).split(" = ")[0]
            written = re.search(r"[\d(][\d()+\-*/x ]*$", written).group().replace(" ", "").replace("x", "*")
            assert written == mark.expression and f">>{mark.result}" in line, p.source


def test_max_multiplier_gives_two_digit_by_one_digit_products():
    problems = generate_problems(300, seed=0, max_operand=20, max_multiplier=20, operators="*+")
    check_marks(problems)
    products = [m.expression for p in problems for m in parse_marks(p.answer) if "*" in m.expression]
    pairs = [tuple(map(int, e.split("*"))) for e in products]
    assert all(min(a, b) <= 9 for a, b in pairs)  # at most one multi-digit operand
    assert any(b > 9 for _, b in pairs) and any(a > 9 for a, _ in pairs)  # both ways round occur
    assert max(b for _, b in pairs) == 20


@pytest.mark.parametrize("multi_op", [0.5, 1.0])
def test_multi_op_steps(multi_op):
    problems = generate_problems(300, seed=1, min_steps=1, max_steps=3, operators="+-*/",
                                 max_multiplier=9, multi_op=multi_op)
    check_marks(problems)
    counts = [len(re.findall(r"[-+*/]", m.expression)) for p in problems for m in parse_marks(p.answer)]
    assert set(counts) == ({2} if multi_op == 1.0 else {1, 2})
    assert any(m.expression.startswith("(") for p in problems for m in parse_marks(p.answer))
    # A two-operation step asks for both operations in the question: one sentence each.
    for p in problems:
        assert p.question.count(".") == 1 + sum(len(re.findall(r"[-+*/]", m.expression))
                                                 for m in parse_marks(p.answer)), p.source


def test_allow_zero_false_keeps_every_amount_positive():
    """With the default, some chains pass through or end at 0 (the commonest answer); with
    `allow_zero=False` no step's result is 0, subtraction still occurs, and the config reaches
    every split."""
    kwargs = dict(min_steps=2, max_steps=4, max_operand=20, max_multiplier=20, operators="+-*")
    with_zero = generate_problems(1000, seed=0, **kwargs)
    assert any(p.final_answer == "0" for p in with_zero)
    problems = generate_problems(1000, seed=0, allow_zero=False, **kwargs)
    check_marks(problems)
    values = [m.value for p in problems for m in parse_marks(p.answer)]
    assert min(values) >= 1 and all(p.final_answer != "0" for p in problems)
    assert any("-" in m.expression for p in problems for m in parse_marks(p.answer))
    cfg = data(num_train=300, num_eval=300, allow_zero=False, max_multiplier=20)
    for split in ("train", "test", "ood"):
        assert all(p.final_answer != "0" for p in load_split(cfg, split)[0]), split
