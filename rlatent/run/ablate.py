"""`rlatent ablate`: a grid of overrides x seeds, every cell a full run, one table with intervals and paired tests.

A claim such as "latents beat the pause control" is a few points between runs evaluated on a few hundred
problems: it needs every row trained alike, evaluated on the same problems, with intervals and a paired
test. The rows are named points (`--point cot latent.mode=none latent.placement=insert`, several keys at
once) and grid dimensions (`--grid latent.k=1,2`, one key each), crossed with `--seeds`;
`rlatent.run.ablation_grid` plans the cells, `rlatent.run.ablation_cell` runs one, and
`rlatent.run.ablation_report` writes (and lists) the files.

Cells run in this process one after another; with `--jobs N` or `--timeout S`, each in a child process of
its own, N at once, stopped after S seconds (a stopped cell resumes from its last checkpoint when the
ablation is run again; `rlatent.run.pool`); with `distributed.backend=ray`, as parallel Ray tasks. Every
cell runs `--command` (sft, or train: both phases); `--phase2 NAME` sends the cells of the points or grid
values named on into phase 2 while the others stop after phase 1 (a ladder's text rows need no phase 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rlatent.config import load_config
from rlatent.errors import ConfigError
from rlatent.run.ablation_cell import CELL_FILE, error_line, finished_record, new_record, run_cell, write_record
from rlatent.run.ablation_grid import Cell, parse_grid, parse_points, plan_cells
from rlatent.run.ablation_report import JSON_FILE, MD_FILE, PNG_FILE, write_ablation, write_report
from rlatent.run.pool import Job, Outcome, run_jobs

CELLS_DIR = "cells"
CELL_CPUS = 1
"""CPUs a Ray cell task reserves (Ray sets its OMP_NUM_THREADS from it)."""


def run_cell_task(spec: dict) -> dict:
    """A Ray task: one cell in its own worker process, from the driver's working directory."""
    if os.path.isdir(spec["cwd"]):
        os.chdir(spec["cwd"])
    return run_cell(spec)


def _summary(record: dict) -> str:
    if record["status"] != "done":
        return record.get("error") or record["status"]
    splits = record["splits"]
    text = f"accuracy {splits['test']['metrics']['accuracy']:.3g}"
    if "ood" in splits:
        text += f", ood accuracy {splits['ood']['metrics']['accuracy']:.3g}"
    return text


def _report_result(cell: Cell, record: dict) -> None:
    seconds = record.get("wall_seconds", 0.0)
    if record["status"] == "done":
        cell.progress(f"done in {seconds:.0f} s, {_summary(record)}")
    else:
        where = f" (traceback in {cell.dir / CELL_FILE})" if record.get("traceback") else ""
        cell.progress(f"failed after {seconds:.0f} s: {record.get('error')}{where}")


# ---- running the cells ----------------------------------------------------------------------------------


def connect_ray(distributed) -> tuple[Any, bool]:
    """The `ray` module, connected as `distributed` says; True when this call started the instance."""
    import ray

    from rlatent.distributed.ray_backend import start_ray

    return ray, start_ray(distributed)


def run_cells_ray(cells: list[Cell], specs: dict[str, dict], distributed, done) -> None:
    """Every cell as a Ray task (one worker process each, `CELL_CPUS` CPUs), results as they finish."""
    ray, owns = connect_ray(distributed)
    try:
        task = ray.remote(run_cell_task)
        pending = {}
        for cell in cells:
            ref = task.options(num_cpus=CELL_CPUS, name=f"ablate {cell.id}").remote(specs[cell.id])
            pending[ref] = cell
            cell.progress("running (Ray task)")
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as error:  # noqa: BLE001 -- the task's worker died
                    record = new_record(specs[cell.id], "failed", f"Ray task: {error_line(error)}")
                done(cell, record)
    finally:
        if owns:
            ray.shutdown()


def run_cells_in_processes(cells: list[Cell], specs: dict[str, dict], jobs: int, timeout: float | None,
                           done) -> None:
    """Every cell in a child process of its own (output to `cells/<id>.log`), `jobs` at once, each stopped after
    `timeout` seconds; a stopped or crashed cell is recorded as failed, its log named."""
    by_id = {cell.id: cell for cell in cells}

    def finished(job: Job, outcome: Outcome) -> None:
        spec = specs[job.key]
        if outcome.result is not None and not outcome.stopped:
            done(by_id[job.key], outcome.result)
            return
        why = (f"stopped after --timeout {timeout:g} s; run the ablation again to resume it from its last checkpoint"
               if outcome.stopped else f"its process exited with code {outcome.exit_code}")
        record = new_record(spec, "failed", f"{why} (log: {job.log})")
        record["wall_seconds"] = round(outcome.seconds, 3)
        write_record(spec, record)
        done(by_id[job.key], record)

    for cell in cells:
        cell.progress(f"queued (log {cell.dir.parent / (cell.id + '.log')})")
    run_jobs([Job(c.id, run_cell, (specs[c.id],), c.dir.parent / f"{c.id}.log") for c in cells], jobs, timeout,
             finished)


# ---- the grid -------------------------------------------------------------------------------------------


def cell_commands(cells: list[Cell], command: str, phase2: list[str]) -> dict[str, str]:
    """Cell id -> what it runs: `command`, or `train` for the cells of a point or grid value `phase2` names."""
    if phase2 and command != "sft":
        raise ConfigError("--phase2 sends some points on into phase 2 of an `--command sft` ablation; with "
                          "--command train every cell runs both phases")
    names = {part for cell in cells for part in cell.parts}
    unknown = [name for name in phase2 if name not in names]
    if unknown:
        raise ConfigError(f"--phase2 {unknown[0]}: no --point or --grid value of that name "
                          f"(have: {', '.join(sorted(names)) or 'none'})")
    return {cell.id: "train" if set(cell.parts) & set(phase2) else command for cell in cells}


def run_ablation(config_path: str, overrides: list[str], grid_args: list[str], seeds: int = 1,
                 command: str = "train", name: str | None = None, points: list[list[str]] = (),
                 phase2: list[str] = (), jobs: int = 1, timeout: float | None = None) -> tuple[Path, list[dict]]:
    """Run every cell not finished yet, then write ablation.json/.md/.png; returns the directory and records."""
    if command not in ("sft", "train"):
        raise ConfigError(f"--command {command!r}: choose sft or train")
    if seeds < 1 or jobs < 1 or (timeout is not None and timeout <= 0):
        raise ConfigError(f"--seeds {seeds}, --jobs {jobs}, --timeout {timeout}: need at least 1 seed and 1 job, "
                          "and a positive timeout")
    grid = parse_grid(grid_args)
    named = parse_points([list(p) for p in points], grid)
    base = load_config(config_path, overrides)  # an error every cell would share stops here, before any cell
    in_processes = jobs > 1 or timeout is not None
    if in_processes and base.distributed.backend == "ray":
        raise ConfigError("--jobs and --timeout run cells as local processes; with distributed.backend=ray every "
                          "cell is already a Ray task")
    root = (Path(base.output.dir) / (name or f"{Path(config_path).stem}-ablation")).resolve()
    seed_list = [base.seed + i for i in range(seeds)]
    cells = plan_cells(grid, seed_list, root / CELLS_DIR, named)
    commands = cell_commands(cells, command, list(phase2))
    specs = {c.id: {"config": str(Path(config_path).resolve()), "overrides": list(overrides),
                    "cell_overrides": c.overrides, "point": ", ".join(c.parts) or "(config)", "seed": c.seed,
                    "id": c.id, "dir": str(c.dir), "command": commands[c.id], "cwd": os.getcwd()} for c in cells}
    spec = {"config": str(config_path), "overrides": list(overrides),
            "points": [{"name": n, "overrides": o} for n, o in named],
            "grid": [{"key": k, "values": v} for k, v in grid], "seeds": seed_list, "command": command,
            "phase2": list(phase2), "name": root.name}
    print(f"ablation: {len(cells)} cells ({len(cells) // len(seed_list)} grid points x {len(seed_list)} "
          f"seed{'s' if len(seed_list) > 1 else ''}) in {root}", flush=True)
    records: dict[str, dict] = {}
    to_run = []
    for cell in cells:
        earlier = finished_record(specs[cell.id])
        if earlier is not None:
            records[cell.id] = earlier
            cell.progress(f"finished earlier, skipped ({_summary(earlier)})")
        else:
            to_run.append(cell)

    def done(cell: Cell, record: dict) -> None:
        records[cell.id] = record
        _report_result(cell, record)

    try:
        if base.distributed.backend == "ray" and to_run:
            run_cells_ray(to_run, specs, base.distributed, done)
        elif in_processes and to_run:
            run_cells_in_processes(to_run, specs, jobs, timeout, done)
        else:
            for cell in to_run:
                cell.progress("running")
                done(cell, run_cell(specs[cell.id]))
    finally:  # an interrupt still leaves the table of what finished
        ordered = [records.get(c.id) or new_record(specs[c.id], "not run") for c in cells]
        write_ablation(root, spec, ordered)
    return root, ordered


def ablate_command(config: str | None, overrides: list[str], grid: list[str], seeds: int, command: str,
                   name: str | None, report: str | None, points: list[list[str]] = (), phase2: list[str] = (),
                   jobs: int = 1, timeout: float | None = None) -> int:
    """The CLI's `rlatent ablate`: exit status 0 when every cell finished, 1 when one failed (after the table)."""
    if report is not None:
        if config is not None or overrides or grid or points:
            raise ConfigError("--report DIR rebuilds the table of a finished ablation; give no CONFIG, --grid or "
                              "--point")
        md, png = write_report(report)
        print(f"ablation table: {md}\nablation plot: {png}")
        return 0
    if config is None:
        raise ConfigError("rlatent ablate: give a CONFIG (or --report DIR)")
    root, records = run_ablation(config, overrides, grid, seeds, command, name, points, phase2, jobs, timeout)
    failed = [r for r in records if r["status"] != "done"]
    print(f"ablation table: {root / MD_FILE}\nablation data: {root / JSON_FILE}\nablation plot: {root / PNG_FILE}")
    if failed:
        print(f"rlatent: error: {len(failed)} of {len(records)} cells failed ({', '.join(r['id'] for r in failed[:3])}"
              f"{', ...' if len(failed) > 3 else ''}); see {root / MD_FILE}", file=sys.stderr)
        return 1
    return 0
