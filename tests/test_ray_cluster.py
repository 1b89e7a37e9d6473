"""A real two-node Ray cluster on this machine (`scripts/ray_two_nodes.py`): the job's actors span both nodes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ray_two_nodes.py"


@pytest.mark.slow
def test_a_grpo_job_runs_across_two_ray_nodes(tmp_path, tiny_model_dir):
    spec = importlib.util.spec_from_file_location("ray_two_nodes", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.run(str(tiny_model_dir), tmp_path)
    assert result["exit_status"] == 0
    assert result["steps"] == [1, 2]
    assert result["ray_nodes"] == [2.0, 2.0]  # 1.75 CPUs of actors cannot fit on the 1-CPU head
    assert result["processes_stopped"] >= 3  # gcs + two raylets at least
