"""Where a phase-2 step goes: N GRPO steps of a recipe from a latent start and from its pause control.

Each row is `rlatent grpo CONFIG grpo.init_checkpoint=START grpo.steps=N` with the row's overrides, run in this
process one after the other, with the evaluation after it cut to one problem. The loop logs its rollout,
resampling and update seconds, the learner the update's parts (`time_update_reference`, `_forward`,
`_backward`, `_optimizer`); the table gives each part's mean over the steps and, for every row after the
first, its ratio to the first row.

    python benchmarks/bench_phase2.py configs/multiop_compress.yaml --steps 2 seed=10 \\
        --row latent runs/multiop_compress/latent-s10/checkpoints/step_000120 \\
        --row pause runs/multiop_compress/pause_chain-s10/checkpoints/step_000120 latent.mode=pause \\
        --json benchmarks/results/phase2_cpu.json

Overrides before the first `--row` apply to every row (`model.device=cuda` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import peak_rss  # noqa: E402

PARTS = ("step_seconds", "time_rollout", "time_resample", "time_update", "time_update_old_logprobs",
         "time_update_reference", "time_update_forward", "time_update_backward", "time_update_optimizer")
COUNTS = ("sampling_rounds", "tokens_per_completion", "latents_per_completion")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the recipe's YAML")
    parser.add_argument("overrides", nargs="*", help="key=value for every row")
    parser.add_argument("--row", nargs="+", action="append", required=True, metavar=("NAME START", "OVERRIDE"),
                        help="a row: its name, its phase-1 checkpoint, then its own overrides")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    for row in args.row:
        if len(row) < 2:
            parser.error(f"--row {' '.join(row)}: needs a name and a phase-1 checkpoint")
    return args


def run_row(args, name: str, start: str, overrides: list[str], workdir: Path) -> dict:
    """One `rlatent grpo` run; the metrics of its steps."""
    from rlatent.run.cli import main

    out = workdir / name
    argv = ["grpo", args.config, *args.overrides, f"grpo.init_checkpoint={start}", f"grpo.steps={args.steps}",
            "grpo.save_every=0", "eval.limit=1", "eval.gain_batches=1", f"output.dir={workdir}",
            f"output.name={name}", *overrides]
    started, _ = time.perf_counter(), peak_rss.start()
    if main(argv) != 0:
        raise SystemExit(f"bench_phase2: row {name} failed: rlatent {' '.join(argv)}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("phase") == "grpo"]
    peak = peak_rss.status_kib("VmHWM")
    return {"name": name, "start": start, "overrides": overrides, "wall_seconds": time.perf_counter() - started,
            "peak_rss_mib": None if peak is None else peak / 1024, "steps": steps,
            "mean": {key: sum(s.get(key, 0.0) for s in steps) / len(steps) for key in PARTS + COUNTS}}


def table(rows: list[dict]) -> str:
    base = rows[0]["mean"]
    lines = ["| part | " + " | ".join(r["name"] for r in rows) + " | " +
             " | ".join(f"{r['name']} / {rows[0]['name']}" for r in rows[1:]) + " |",
             "|---" * (1 + 2 * len(rows) - 1) + "|"]
    for key in PARTS + COUNTS:
        values = [r["mean"][key] for r in rows]
        ratios = [f"{v / base[key]:.2f}x" if base[key] else "-" for v in values[1:]]
        lines.append(f"| {key} | " + " | ".join(f"{v:.2f}" for v in values) + " | " + " | ".join(ratios) + " |")
    peaks = [r["peak_rss_mib"] for r in rows]
    lines.append("| peak RSS (MiB) | " + " | ".join("-" if p is None else f"{p:.0f}" for p in peaks) + " |" +
                 " |" * (len(rows) - 1))
    return "\n".join(lines)


def machine() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True)
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit.stdout.strip() + ("+dirty" if dirty.stdout else ""),
            "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_row(args, name, start, overrides, Path(tmp)) for name, start, *overrides in args.row]
    print(table(rows))
    if args.json:
        result = {"command": " ".join(sys.argv), "machine": machine(), "steps": args.steps, "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
