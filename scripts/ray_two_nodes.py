"""A real two-node Ray cluster on one machine, a GRPO job across it, and teardown.

`ray start --head` (1 CPU) and a second `ray start --address` node (2 CPUs,
its own custom resource) form the cluster; a tiny GRPO run with
`distributed.backend=ray distributed.address=HOST:PORT` joins it. Its actors
need 1.75 CPUs, so they cannot fit on the head: the run must report
`ray_nodes == 2`. Only the processes of this cluster are stopped at the end
(found by its temp dir), never another Ray on the machine.

    python scripts/ray_two_nodes.py [--model-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str) -> None:
    ray = Path(sys.executable).with_name("ray")
    done = subprocess.run([str(ray), *args, "--disable-usage-stats"], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def stop_cluster(temp_dir: str) -> int:
    """Terminate every process whose command line names this cluster's temp dir, and their children (Ray's
    agents rename themselves, `ray::DashboardAgent`); returns how many."""
    roots = [p for p in psutil.process_iter(["cmdline"])
             if p.pid != os.getpid() and any(temp_dir in part for part in p.info["cmdline"] or [])]
    procs = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}.values()
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs), timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return len(procs)


def run(model_dir: str | None, out: Path) -> dict:
    from rlatent.run.cli import main as rlatent
    from rlatent.io.run_dir import read_metrics

    # The cluster and this driver must agree on authentication. A `ray.init` earlier in a parent process
    # leaves RAY_AUTH_MODE=token behind, and a token driver cannot start actors on an open cluster.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp_dir = tempfile.mkdtemp(prefix="r2n-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    started = time.perf_counter()
    try:
        ray_cli("start", "--head", f"--port={port}", "--num-cpus=1", '--resources={"head_node": 1}',
                "--include-dashboard=false", f"--temp-dir={temp_dir}")
        ray_cli("start", f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"second_node": 1}')
        if model_dir is None:
            model_dir = str(out / "tiny-model")
            assert rlatent(["tiny-model", model_dir]) == 0
        status = rlatent(["grpo", str(ROOT / "configs/tiny.yaml"), f"model.name_or_path={model_dir}",
                          f"output.dir={out}", "output.name=two-nodes", "grpo.steps=2", "eval.limit=2",
                          "distributed.backend=ray", f"distributed.address=127.0.0.1:{port}",
                          "distributed.timeout_s=300"])
    finally:
        stopped = stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    rows = [r for r in read_metrics(out / "two-nodes" / "metrics.jsonl") if r["phase"] == "grpo"]
    return {"exit_status": status, "steps": [r["step"] for r in rows], "ray_nodes": [r["ray_nodes"] for r in rows],
            "processes_stopped": stopped, "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="a model directory (default: a tiny random one)")
    parser.add_argument("--out", type=Path, help="where the run directory goes (default: a temp dir)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="rlatent-two-nodes-"))
    result = run(args.model_dir, out)
    print(json.dumps(result))
    ok = result["exit_status"] == 0 and result["ray_nodes"] and all(n == 2 for n in result["ray_nodes"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
