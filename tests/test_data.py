import json
import os
from pathlib import Path

import pytest

from rlatent.data.gsm8k import Problem, load_gsm8k, load_jsonl_problems
from rlatent.errors import DataError
from rlatent.data.marks import answers_match, evaluate_expression, extract_final_answer, parse_marks, strip_marks
from rlatent.data.synthetic import generate_problems

GOOD = {"question": "Natalia sold 48 clips...", "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,024"}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_problems(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD), "", "   ", json.dumps(GOOD)])
    problems, skipped = load_jsonl_problems(path)
    assert skipped == 0
    assert problems == [
        Problem(GOOD["question"], GOOD["answer"], "1024", f"{path}:1"),
        Problem(GOOD["question"], GOOD["answer"], "1024", f"{path}:4"),
    ]


BAD_LINES = [
    ('{"question": "q", "answer": ', "malformed JSON (Expecting value at column 28)"),
    ('["q", "a"]', "expected a JSON object, got list"),
    ('{"answer": "#### 3"}', "missing key 'question'"),
    ('{"question": "q"}', "missing key 'answer'"),
    ('{"question": "q", "answer": 3}', "'answer' must be a string, got int"),
    ('{"question": null, "answer": "#### 3"}', "'question' must be a string, got NoneType"),
    ('{"question": "q", "answer": "It is 3."}', "answer has no '####' final answer"),
    ('{"question": "q", "answer": "#### three"}', "no number after the last '####' in the answer"),
    (
        '{"question": "q", "answer": "2+2 = <<2+2>>4\\n#### 4"}',
        "calculator mark '<<2+2>>' does not parse: expected exactly one '=', found 0",
    ),
]


@pytest.mark.parametrize("line, what", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, line, what):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD), "", line])
    with pytest.raises(DataError) as error:
        load_jsonl_problems(path)
    assert str(error.value) == f"{path}:3: {what}"


def test_skip_counts_bad_lines(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [line for line, _ in BAD_LINES] + [json.dumps(GOOD)])
    problems, skipped = load_jsonl_problems(path, on_bad_line="skip")
    assert skipped == len(BAD_LINES)
    assert [p.source for p in problems] == [f"{path}:{len(BAD_LINES) + 1}"]


def test_limit_stops_early_without_reading_bad_lines_after(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD)] * 3 + ["not json"])
    problems, skipped = load_jsonl_problems(path, limit=2)
    assert (len(problems), skipped) == (2, 0)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path}/nope.jsonl: data file not found$"):
        load_jsonl_problems(tmp_path / "nope.jsonl")


def test_bad_on_bad_line(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD)])
    with pytest.raises(ValueError, match="on_bad_line"):
        load_jsonl_problems(path, on_bad_line="ignore")


def test_load_gsm8k_from_directory_or_file(tmp_path):
    write_lines(tmp_path / "test.jsonl", [json.dumps(GOOD)])
    from_dir, _ = load_gsm8k("test", path=tmp_path)
    from_file, _ = load_gsm8k("ignored when path is a file", path=tmp_path / "test.jsonl")
    assert from_dir == from_file and len(from_dir) == 1
    with pytest.raises(DataError, match=r"train\.jsonl: data file not found"):
        load_gsm8k("train", path=tmp_path)


def test_load_gsm8k_from_hub_validates_rows(monkeypatch):
    """The hub path, with `datasets.load_dataset` replaced (no network)."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [GOOD, {"question": "q", "answer": "no final answer"}, GOOD]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems, skipped = load_gsm8k("train", on_bad_line="skip")
    assert calls == [("openai/gsm8k", "main", "train")]
    assert skipped == 1
    assert [p.source for p in problems] == ["openai/gsm8k:train:0", "openai/gsm8k:train:2"]
    with pytest.raises(DataError, match=r"^openai/gsm8k:train:1: answer has no '####' final answer$"):
        load_gsm8k("train")


def test_synthetic_is_deterministic():
    a = generate_problems(50, seed=3, operators="+-*/")
    assert a == generate_problems(50, seed=3, operators="+-*/")
    assert a != generate_problems(50, seed=4, operators="+-*/")
    assert [p.source for p in a[:3]] == ["synthetic:0", "synthetic:1", "synthetic:2"]


@pytest.mark.parametrize("operators", ["+-*", "+-*/", "/", "-"])
def test_synthetic_marks_are_consistent(operators):
    problems = generate_problems(200, seed=0, min_steps=1, max_steps=4, max_operand=12, operators=operators)
    assert len(problems) == 200
    for p in problems:
        lines = p.answer.split("\n")
        marks = parse_marks(p.answer, where=p.source)
        assert 1 <= len(marks) <= 4 and len(lines) == len(marks) + 1
        for mark in marks:
            assert evaluate_expression(mark.expression) == mark.value
            assert mark.value.denominator == 1 and mark.value >= 0
            assert set(mark.expression) - set("0123456789") <= set(operators)
        assert lines[-1] == f"#### {p.final_answer}"
        assert answers_match(p.final_answer, marks[-1].result)
        assert extract_final_answer(p.answer) == p.final_answer
        # Each step writes its expression, " = ", then the mark, then the result.
        for line, mark in zip(lines[:-1], marks, strict=True):
            assert f" = <<{mark.expression}={mark.result}>>{mark.result}" in line or " = $<<" in line
            assert mark.result in strip_marks(line)


def test_synthetic_step_count_and_validation():
    problems = generate_problems(30, seed=1, min_steps=3, max_steps=3)
    assert all(len(parse_marks(p.answer)) == 3 for p in problems)
    with pytest.raises(ValueError, match="operators"):
        generate_problems(1, seed=0, operators="+^")
    with pytest.raises(ValueError, match="min_steps"):
        generate_problems(1, seed=0, min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="no 2-step chain with operators '/' and max_operand 2 found"):
        generate_problems(1, seed=0, max_operand=2, operators="/")


GSM8K_DIR = os.environ.get("RLATENT_GSM8K_DIR")


@pytest.mark.skipif(not GSM8K_DIR, reason="RLATENT_GSM8K_DIR is not set (directory with GSM8K train.jsonl, test.jsonl)")
@pytest.mark.parametrize("split, count", [("train", 7473), ("test", 1319)])
def test_real_gsm8k_loads_without_a_bad_line(split, count):
    problems, skipped = load_gsm8k(split, path=GSM8K_DIR, on_bad_line="raise")
    assert (len(problems), skipped) == (count, 0)
    for p in problems:
        assert answers_match(p.final_answer, p.answer.rpartition("####")[2].strip()), p.source
