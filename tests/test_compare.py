"""`rlatent compare` on hand-written samples files and run directories: rows paired by question text (not
by order or `source`), other problems refused in one line, seeds paired with their own partner and pooled
with the clustered bootstrap, accuracy split by seen arithmetic; and `rlatent.run.overlap` by hand."""

import json
from pathlib import Path

import pytest

from rlatent.config import load_config
from rlatent.data.gsm8k import Problem
from rlatent.data.splits import load_split
from rlatent.run.cli import main
from rlatent.run.overlap import mark_arithmetic, seen_arithmetic
from rlatent.run.stats import mcnemar_exact, paired_difference

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def write(path: Path, correct: dict[str, bool], source: str = "synthetic:{}") -> Path:
    """A samples file: one row per question, `source` numbered by position as a run writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"source": source.format(i), "question": q, "correct": c, "predicted": "1"})
                            + "\n" for i, (q, c) in enumerate(correct.items())))
    return path


def compare(*args) -> int:
    return main(["compare", *map(str, args)])


# ---- seen arithmetic ----------------------------------------------------------------------------------------


def problem(answer: str, question: str = "q") -> Problem:
    return Problem(question, f"{answer}\n#### 0", "0", "hand")


def test_seen_arithmetic_needs_every_mark_of_a_problem_in_training():
    train = [problem("a <<3+4=7>>7 then <<7*2=14>>14"), problem("b <<5 - 1=4>>4")]
    held_out = [problem("<<3+4=7>>7"),              # seen
                problem("<<5-1=4>>4 and <<7*2=14>>14"),  # every step seen, in other problems; spaces dropped
                problem("<<4+3=7>>7"),              # the same sum written the other way: not seen
                problem("<<3+4=7>>7 <<7*3=21>>21"),  # one new step
                problem("no marks")]
    assert mark_arithmetic(train[1]) == ["5-1=4"]
    assert seen_arithmetic(train, held_out) == [True, True, False, False, False]


# ---- samples files -------------------------------------------------------------------------------------------


def test_pairs_by_question_text(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", {"p1": True, "p2": True, "p3": True, "p4": False, "p5": True})
    # other order, so `source` numbers other questions: pairing by source would pair the wrong rows
    b = write(tmp_path / "b.jsonl", {"p5": False, "p4": True, "p3": False, "p2": True, "p1": False})
    out = tmp_path / "out.json"
    assert compare(f"latent={a}", f"pause={b}", "--json", out) == 0
    [result] = json.loads(out.read_text())["comparisons"]
    assert (result["a"], result["b"]) == ("latent", "pause")
    [seed] = result["seeds"]
    assert (seed["problems"], seed["accuracy_a"], seed["accuracy_b"]) == (5, 0.8, 0.4)
    assert (seed["only_a"], seed["only_b"], seed["p"]) == (3, 1, mcnemar_exact(3, 1))
    pooled = result["pooled"]
    assert pooled["test"] == "exact McNemar" and pooled["p"] == mcnemar_exact(3, 1)
    assert pooled["difference"] == pytest.approx(-0.4) and pooled["low"] < -0.4 < pooled["high"]
    assert result["arithmetic"] == {} and result["splits"] == ["unknown"]
    printed = capsys.readouterr().out
    assert "| 5 | 0.800 | 0.400 | 3 | 1 |" in printed and "pause - latent = -0.400 [95 %" in printed


def test_every_pair_of_several_evaluations(tmp_path):
    files = [write(tmp_path / f"{n}.jsonl", {"p1": x, "p2": y}) for n, (x, y) in
             zip("xyz", [(True, True), (True, False), (False, False)])]
    out = tmp_path / "out.json"
    assert compare(*files, "--json", out) == 0
    pairs = [(Path(r["a"]).stem, Path(r["b"]).stem, r["seeds"][0]["only_a"]) for r in
             json.loads(out.read_text())["comparisons"]]
    assert pairs == [("x", "y", 1), ("x", "z", 2), ("y", "z", 1)]


def test_other_problems_are_refused_in_one_line(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", {"p1": True, "p2": False, "p3": True})
    b = write(tmp_path / "b.jsonl", {"p1": True, "p4": False, "p5": False})
    assert compare(a, b) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"rlatent: error: {b}: 2 of its 3 questions are not in {a} and 2 of that file's are not in it (another "
        "data draw or split?); compare evaluations of the same problems"]
    for args, message in [((a,), "at least two evaluations"), ((a, tmp_path / "nothing"), "neither a run directory"),
                          ((a, "--a", a, "--b", b), "not both"), (("--a", a, "--b", a, b), "--a has 1 evaluations")]:
        assert compare(*args) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
    (tmp_path / "bad.jsonl").write_text('{"question": "p1"}\n')
    assert compare(a, tmp_path / "bad.jsonl") == 2
    assert f"{tmp_path / 'bad.jsonl'}:1: not a samples row" in capsys.readouterr().err


def test_samples_of_a_few_problems_of_an_evaluation_are_refused(tmp_path, capsys):
    evals = tmp_path / "run" / "evals" / "t"
    a = write(evals / "samples.jsonl", {"p1": True, "p2": False})
    (evals / "metrics.json").write_text(json.dumps({"problems": 300, "split": "dev"}))
    assert compare(a, write(tmp_path / "b.jsonl", {"p1": True, "p2": True})) == 2
    assert "holds 2 of the 300 problems graded" in capsys.readouterr().err


# ---- run directories, several seeds ----------------------------------------------------------------------------


def make_run(root: Path, name: str, seed: int, outcomes: list[int], command: str = "sft",
             overrides: tuple[str, ...] = ()) -> Path:
    """A finished run as far as `compare` reads one: config.yaml, run.json, metrics.jsonl and its final samples,
    on the test problems its config draws (each seed its own draw)."""
    cfg = load_config(CONFIG, ["model.name_or_path=x", "data.synthetic.seed=run", "data.synthetic.num_eval=12",
                               "eval.limit=12", f"seed={seed}", *overrides])
    questions = [p.question for p in load_split(cfg.data, "test", 12)[0]]
    run = root / name
    write(run / "samples" / "eval_samples.jsonl", dict(zip(questions, map(bool, outcomes))))
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "run.json").write_text(json.dumps({"command": command}))
    (run / "metrics.jsonl").write_text(json.dumps({"phase": "test", "step": 1, "problems": len(questions)}) + "\n")
    return run


OUTCOMES = {"a": [[1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0]],
            "b": [[1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1]]}


def test_seeds_are_paired_with_their_own_partner_and_pooled(tmp_path, capsys):
    runs = {(side, s): make_run(tmp_path, f"{side}-seed{s}", s, OUTCOMES[side][s]) for side in "ab" for s in (0, 1)}
    out = tmp_path / "out.json"
    assert compare("--a", runs["a", 0], runs["a", 1], "--b", runs["b", 0], runs["b", 1], "--json", out) == 0
    [result] = json.loads(out.read_text())["comparisons"]
    assert [s["seed"] for s in result["seeds"]] == [0, 1] and result["splits"] == ["test"]
    groups = []
    for s in (0, 1):
        cfg = load_config(runs["a", s] / "config.yaml")
        questions = [p.question for p in load_split(cfg.data, "test", 12)[0]]
        groups.append((questions, OUTCOMES["a"][s], OUTCOMES["b"][s]))
    assert groups[0][0] != groups[1][0]  # each seed its own draw
    expected = paired_difference(groups)
    pooled = result["pooled"]
    assert (pooled["difference"], pooled["low"], pooled["high"], pooled["p"]) == (
        expected.difference, expected.low, expected.high, expected.p)
    assert pooled["test"] == "hierarchical bootstrap" and pooled["problems"] == 24
    # seen against unseen arithmetic, as `seen_arithmetic` flags each seed's problems from its own training
    seen = {True: [0, 0, 0], False: [0, 0, 0]}  # problems, A right, B right
    for s, (questions, a, b) in enumerate(groups):
        cfg = load_config(runs["a", s] / "config.yaml")
        flags = seen_arithmetic(load_split(cfg.data, "train")[0], load_split(cfg.data, "test", 12)[0])
        for flag, x, y in zip(flags, a, b):
            seen[flag] = [seen[flag][0] + 1, seen[flag][1] + x, seen[flag][2] + y]
    for name, flag in (("seen", True), ("unseen", False)):
        if seen[flag][0]:
            entry = result["arithmetic"][name]
            assert (entry["pairs"], entry["accuracy_a"], entry["accuracy_b"]) == (
                seen[flag][0], seen[flag][1] / seen[flag][0], seen[flag][2] / seen[flag][0])
    assert sum(entry["pairs"] for entry in result["arithmetic"].values()) == 24
    assert "| 0 | 12 | 0.333 | 0.667 |" in capsys.readouterr().out


def test_rows_trained_on_differently_written_marks_say_whose_seen_arithmetic_the_split_is(tmp_path, capsys):
    # one mark of two operations against the same problems' stepwise chain: the stepwise row has seen its
    # single operations far more often, so the seen/unseen split depends on whose training defines it
    task = ("data.synthetic.multi_op=1", "data.synthetic.min_steps=1", "data.synthetic.max_steps=1",
            "data.synthetic.num_train=1000")
    one_mark = make_run(tmp_path, "one_mark", 0, [1, 0] * 6, overrides=task)
    stepwise = make_run(tmp_path, "stepwise", 0, [1] * 12, overrides=(*task, "data.split_steps=4"))
    flags = {}
    for name, run in (("one_mark", one_mark), ("stepwise", stepwise)):
        cfg = load_config(run / "config.yaml")
        flags[name] = seen_arithmetic(load_split(cfg.data, "train")[0], load_split(cfg.data, "test", 12)[0])
    differing = sum(x != y for x, y in zip(flags["one_mark"], flags["stepwise"]))
    assert differing > 0
    out = tmp_path / "out.json"
    assert compare(f"one_mark={one_mark}", f"stepwise={stepwise}", "--json", out) == 0
    [result] = json.loads(out.read_text())["comparisons"]
    assert result["arithmetic"]["seen"]["pairs"] == sum(flags["one_mark"])  # A's split
    assert result["notes"] == [f"seen/unseen arithmetic is by one_mark's training problems; by stepwise's, "
                               f"{differing} of the 12 questions would be classed the other way (the runs' marks differ)"]
    assert f"note: {result['notes'][0]}" in capsys.readouterr().out
    # rows trained on the same marks: no note
    assert compare(f"a={one_mark}", f"b={make_run(tmp_path, 'same', 0, [1] * 12, overrides=task)}", "--json", out) == 0
    assert json.loads(out.read_text())["comparisons"][0]["notes"] == []


def test_a_seed_paired_with_another_seed_is_refused(tmp_path, capsys):
    a0, a1 = make_run(tmp_path, "a0", 0, [1] * 12), make_run(tmp_path, "a1", 1, [1] * 12)
    b0, b1 = make_run(tmp_path, "b0", 0, [0] * 12), make_run(tmp_path, "b1", 1, [0] * 12)
    assert compare("--a", a0, a1, "--b", b1, b0) == 2
    assert f"{b1} (seed 1) is paired with {a0} (seed 0)" in capsys.readouterr().err


def test_phase_one_of_a_train_run(tmp_path, capsys):
    run = make_run(tmp_path, "train", 0, [1] * 12, command="train")
    start = run / "samples" / "eval_samples_sft.jsonl"
    questions = [json.loads(line)["question"] for line in (run / "samples" / "eval_samples.jsonl").open()]
    write(start, dict(zip(questions, [False] * 12)))
    other = make_run(tmp_path, "other", 0, [1] * 6 + [0] * 6)
    out = tmp_path / "out.json"
    assert compare(run, other, "--phase", "sft", "--json", out) == 0
    [result] = json.loads(out.read_text())["comparisons"]
    assert result["seeds"][0]["a"] == str(start) and result["seeds"][0]["accuracy_a"] == 0.0
    assert result["seeds"][0]["accuracy_b"] == 0.5  # an `rlatent sft` run's phase 1 is its final evaluation
    grpo = make_run(tmp_path, "grpo", 0, [1] * 12, command="grpo")
    assert compare(grpo, other, "--phase", "sft") == 2
    assert "an `rlatent grpo` run has no phase-1 evaluation" in capsys.readouterr().err
