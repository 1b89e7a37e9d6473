"""A real two-node Ray cluster on this machine (`scripts/ray_two_nodes.py`): the job's actors span both nodes.
The script runs as its own process, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ray_two_nodes.py"


@pytest.mark.slow
def test_a_grpo_job_runs_across_two_ray_nodes(tmp_path, tiny_model_dir):
    done = subprocess.run([sys.executable, str(SCRIPT), "--model-dir", str(tiny_model_dir), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exit_status"] == 0
    assert result["steps"] == [1, 2]
    assert result["ray_nodes"] == [2.0, 2.0]  # 1.75 CPUs of actors cannot fit on the 1-CPU head
    assert result["processes_stopped"] >= 3  # gcs + two raylets at least
