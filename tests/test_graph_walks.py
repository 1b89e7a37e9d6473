"""experiments/tools/graph_walks.py on real generated problems: the reference answers walk stated facts and end at
the asked concept exactly when the answer is Yes; an answer that always says Yes follows its walk only then."""

import json
from pathlib import Path

from rlatent.data.graphs import generate_graph_problems
from rlatent.data.marks import strip_marks
from tests.scripts import load_script


def run_script(tmp_path, rows, capsys, monkeypatch):
    module = load_script("graph_walks", "experiments/tools")
    path = tmp_path / "eval_samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr("sys.argv", ["graph_walks.py", str(path)])
    module.main()
    return capsys.readouterr().out


def test_reference_walks_and_an_always_yes_answer(tmp_path, capsys, monkeypatch):
    problems = generate_graph_problems(40, seed=5, min_hops=2, max_hops=4)
    yes = sum(p.final_answer == "Yes" for p in problems)
    assert 0 < yes < len(problems)
    reference = [{"question": p.question, "reference": p.final_answer, "predicted": p.final_answer,
                  "completion": strip_marks(p.answer)} for p in problems]
    out = run_script(tmp_path, reference, capsys, monkeypatch)
    assert "every hop line a stated fact: 40" in out
    assert "answer follows the walk: 40/40; walk's end gives the reference: 40/40" in out
    always_yes = [dict(r, predicted="Yes") for r in reference]
    out = run_script(tmp_path, always_yes, capsys, monkeypatch)
    assert f"answer follows the walk: {yes}/40" in out and f"| No | False | Yes | {40 - yes} |" in out
