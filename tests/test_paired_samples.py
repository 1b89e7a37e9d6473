"""scripts/paired_samples.py on hand-written samples files: accuracies, discordant counts and the exact
McNemar p of every pair, matched by problem (not by line order); files graded on other problems refused."""

import json
import subprocess
import sys
from pathlib import Path

from rlatent.run.stats import mcnemar_exact, wilson_interval

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paired_samples.py"


def write(path: Path, correct: dict[str, bool]) -> Path:
    path.write_text("".join(json.dumps({"source": s, "correct": c, "predicted": "1"}) + "\n" for s, c in correct.items()))
    return path


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_pairs_by_problem(tmp_path):
    a = write(tmp_path / "a.jsonl", {"p1": True, "p2": True, "p3": True, "p4": False, "p5": True})
    b = write(tmp_path / "b.jsonl", {"p5": False, "p4": True, "p3": False, "p2": True, "p1": False})  # other order
    out = tmp_path / "out.json"
    result = run(f"latent={a}", f"pause={b}", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["rows"]["latent"]["right"] == 4 and data["rows"]["pause"]["right"] == 2
    assert data["rows"]["latent"]["ci95"] == list(wilson_interval(4, 5))
    assert data["pairs"] == [{"a": "latent", "b": "pause", "a_only": 3, "b_only": 1, "p": mcnemar_exact(3, 1)}]
    assert "| latent | pause | 3 | 1 |" in result.stdout


def test_other_problems_are_refused(tmp_path):
    a = write(tmp_path / "a.jsonl", {"p1": True, "p2": False})
    b = write(tmp_path / "b.jsonl", {"p1": True, "p3": False})
    result = run(f"a={a}", f"b={b}")
    assert result.returncode != 0 and "graded on other problems" in result.stderr
    result = run(f"a={a}", "b")
    assert result.returncode != 0 and "is not NAME=PATH" in result.stderr
