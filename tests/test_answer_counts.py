"""`experiments/tools/answer_counts.py`: which answers a samples file holds, counted exactly."""

import json
import subprocess
import sys

from tests.scripts import ROOT, load_script

SCRIPT = ROOT / "experiments/tools/answer_counts.py"


def test_counts_said_and_right_per_answer(tmp_path):
    rows = [("1", "1", True), ("1", "4", False), ("1", "1", True), ("7", "7", True), (None, "9", False),
            ("3", "5", False)]
    path = tmp_path / "eval_samples.jsonl"
    path.write_text("".join(json.dumps({"predicted": p, "reference": r, "correct": c}) + "\n" for p, r, c in rows))
    lines = load_script("answer_counts", "experiments/tools").answer_counts(path, ["21", "7"], top=2)
    assert lines == [f"{path}: 6 problems, 3 right, 4 distinct answers (1 without one)",
                     "  '1': said 3, right 2", "  '7': said 1, right 1", "  '21': said 0, right 0"]


def test_a_missing_file_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert done.returncode == 2 and "nope.jsonl: no such samples file" in done.stderr
    assert "Traceback" not in done.stderr
