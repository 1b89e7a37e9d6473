"""`rlatent.run.step_accuracy` and `rlatent diagnose --only steps`: each step's written result held against
the reference's mark, counted exactly."""

import json
import shutil
from pathlib import Path

import pytest

from rlatent.config import load_config
from rlatent.data.marks import parse_marks, strip_marks
from rlatent.data.splits import load_split
from rlatent.run import step_accuracy
from rlatent.run.cli import main
from rlatent.run.diagnose import read_samples

ROOT = Path(__file__).resolve().parents[1]


def rows_of(run: Path, split: str) -> list:
    """The step rows of a run's samples of `split`, as `rlatent diagnose` reads them."""
    cfg = load_config(str(run / "config.yaml"))
    return [(p.source, parse_marks(p.answer), s["completion"])
            for p, s in read_samples(run / "samples" / "eval_samples.jsonl", cfg, split)]


def test_counts_per_step_on_a_run_directory(tmp_path, capsys):
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.name_or_path=x", "data.synthetic.max_steps=3"])
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    problems = load_split(cfg.data, "test")[0][:3]
    results = [[m.result for m in parse_marks(p.answer)] for p in problems]
    completions = [
        strip_marks(problems[0].answer),  # every step right
        "\n".join(["It has 999 things."] + [f"It has {r} things." for r in results[1][1:]]),  # all but step 1
        f"It has {results[2][0]} things.",  # step 1 right, then the answer stops
    ]
    (run / "samples" / "eval_samples.jsonl").write_text("".join(
        json.dumps({"source": p.source, "completion": c}) + "\n" for p, c in zip(problems, completions)))
    outcomes = step_accuracy.step_results(rows_of(run, "test"))
    steps = step_accuracy.step_counts(outcomes)
    lengths = [len(r) for r in results]
    assert steps[0] == {"step": 1, "problems": 3, "right": 2, "after_right": 0, "right_after_right": 0}
    assert steps[1] == {"step": 2, "problems": 3, "right": 2, "after_right": 2, "right_after_right": 1}
    assert len(steps) == max(lengths)
    out = tmp_path / "out.json"
    assert main(["diagnose", str(run), "--only", "steps", "--json", str(out)]) == 0  # no checkpoint needed
    printed = capsys.readouterr().out
    assert "| 2 | 3 | 2 (66.7%) | 1/2 |" in printed and "by operation" in printed
    written = json.loads(out.read_text())["runs"][str(run)]["steps"]
    assert list(written) == ["test"]  # no ood samples
    assert written["test"]["steps"] == steps
    assert written["test"]["expressions"][0] == {"step": 1, "problems": 3, "written": 1, "expression_right": 1,
                                                 "result_right_given_expression_right": 1}
    assert sum(r["right"] for r in written["test"]["by_operation"] if r["step"] == 1) == steps[0]["right"]
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    assert main(["diagnose", str(run), str(twin), "--only", "steps", "--json", str(out)]) == 0
    assert f"| {run} | {twin} | test | 1 | 3 | 0 | 0 | 1.0000 |" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["paired_steps"]) == max(lengths)


def test_paired_steps_count_discordant_problems_per_step():
    a = {"p1": [True, True], "p2": [True, False, False], "p3": [False, True], "only_a": [True, True]}
    b = {"p1": [False, True], "p2": [False, False, True], "p3": [False, False], "only_b": [True, True]}
    rows = step_accuracy.paired_steps(a, b)
    assert [(r["step"], r["problems"], r["a_only"], r["b_only"]) for r in rows] == [
        (1, 3, 2, 0), (2, 3, 1, 0), (3, 1, 0, 1)]
    assert rows[0]["p"] == 0.5 and rows[2]["p"] == 1.0


def test_pooled_pairs_sum_the_seeds_both_rows_have_whatever_the_order():

    def pair(a, b, step, problems, a_only, b_only):
        return {"a": f"runs/x/{a}", "b": f"runs/x/{b}", "split": "test", "step": step, "problems": problems,
                "a_only": a_only, "b_only": b_only, "p": 1.0}

    paired = [
        pair("latent-seed0", "pause-seed0", 1, 300, 45, 22),
        pair("pause-seed1", "latent-seed1", 1, 300, 10, 57),  # given in the other order: counts swap
        pair("latent-seed0", "pause-seed1", 1, 300, 99, 0),  # different seeds: not a pair of the same seed
        pair("latent-seed0", "latent-seed1", 1, 300, 5, 5),  # one row against itself
        pair("latent-seed0", "nocot-seed0", 1, 300, 7, 3),  # one seed only: not pooled
        pair("plain", "pause-seed0", 1, 300, 1, 1),  # a name without a seed
    ]
    pooled = step_accuracy.pooled_pairs(paired)
    assert pooled == [{"a": "latent", "b": "pause", "split": "test", "step": 1, "seeds": [0, 1], "problems": 600,
                       "a_only": 102, "b_only": 32, "p": step_accuracy.mcnemar_exact(102, 32)}]
    assert "| latent | pause | test | 1 | 0,1 | 600 | 102 | 32 |" in step_accuracy.render_pairs(pooled, seeds=True)


def test_counts_by_operation_split_each_step_by_its_operators():
    assert [step_accuracy.operation(e) for e in ["12*7", "5 + 15", "(43+13)*5", "(9-8)*5", "-3+4", "1.5/3", "7"]] == [
        "*", "+", "+*", "-*", "+", "/", "none"]
    outcomes = {"p1": [True, True], "p2": [False, True], "p3": [True, False, True]}
    operations = {"p1": ["*", "+"], "p2": ["+", "+"], "p3": ["*", "-", "+"]}
    rows = step_accuracy.step_counts(outcomes, operations)
    assert [(r["step"], r["operation"], r["problems"], r["right"], r["after_right"], r["right_after_right"])
            for r in rows] == [(1, "*", 2, 2, 0, 0), (1, "+", 1, 0, 0, 0), (2, "+", 2, 2, 1, 1),
                               (2, "-", 1, 0, 1, 0), (3, "+", 1, 1, 0, 0)]
    plain = step_accuracy.step_counts(outcomes)
    assert [r["right"] for r in plain] == [2, 2, 1] and "operation" not in plain[0]
    assert "| 2 | - | 1 | 0 (0.0%) | 0/1 |" in step_accuracy.render(Path("run"), "test", rows)


def test_written_expressions_tell_wrong_operations_from_wrong_arithmetic():
    assert step_accuracy.written_value("Ann then has (9 - 7) x 10 = 10 pencils.") == 20
    assert step_accuracy.written_value("She pays $3 \u00d7 4 = $12 in all.") == 12
    assert step_accuracy.written_value("She has 5 apples.") is None  # no `=`
    assert step_accuracy.written_value("The answer = 12.") is None  # nothing before it
    assert step_accuracy.written_value("So 12 = 12 apples.") is None  # a stated number is no computation
    marks = parse_marks("It has <<(9-7)*10=20>>20.\nThen <<20+5=25>>25.")
    rows = [
        ("p1", marks, "It has (9 - 7) x 10 = 20 pens.\nThen 20 + 5 = 25.\n#### 25"),  # all right
        ("p2", marks, "It has (9 - 7) x 10 = 10 pens.\nThen 10 + 5 = 15.\n#### 15"),  # right choice, bad sum
        ("p3", marks, "It has 9 + 10 = 19 pens.\nThen 19 + 5 = 24.\n#### 24"),  # wrong operations
        ("p4", marks, "It has 20 pens.\n#### 20"),  # no expression, and no second line
    ]
    outcomes = step_accuracy.step_results(rows)
    assert step_accuracy.expression_counts(rows, outcomes) == [
        {"step": 1, "problems": 4, "written": 3, "expression_right": 2, "result_right_given_expression_right": 1},
        {"step": 2, "problems": 4, "written": 3, "expression_right": 1, "result_right_given_expression_right": 1}]
    assert "| 1 | 4 | 3 | 2 | 1/2 |" in step_accuracy.render_expressions(Path("run"), "test",
                                                                   step_accuracy.expression_counts(rows, outcomes))


@pytest.mark.parametrize("lines, says", [
    ([json.dumps({"source": "nowhere-7", "completion": "1"})], "problem 'nowhere-7' is not in the test split"),
    (["{not json"], "eval_samples.jsonl:1: not a JSON line"),
    (['{"source": "x"}'], "eval_samples.jsonl:1: a sample needs 'source' and 'completion'"),
])
def test_bad_samples_are_one_line(tmp_path, capsys, lines, says):
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.name_or_path=x"])
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "samples" / "eval_samples.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["diagnose", str(run), "--only", "steps"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("rlatent: error: ") and says in err
