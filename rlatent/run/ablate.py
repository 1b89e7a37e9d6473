"""`rlatent ablate`: a grid of overrides x seeds, every cell a full run, one table with intervals and paired tests.

A claim such as "latents beat the pause control" is a few points between runs evaluated on a few hundred
problems: it needs every row trained alike, evaluated on the same problems, with intervals and a paired
test. This module runs the cells `rlatent.run.ablation_grid` plans; `rlatent.run.ablation_report` writes (and
lists) the files.

Each cell goes through `run_phases`, the code of `rlatent sft` / `train`, in this process one after
another, or as parallel Ray tasks (one process per cell) with `distributed.backend=ray`. A cell whose
directory holds its final checkpoint and its per-problem results is skipped when the command is run
again; one with a checkpoint short of the last step resumes from it; a failing cell is recorded as
failed and the others go on.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rlatent.config import RunConfig, load_config
from rlatent.data.splits import has_ood_split, load_split
from rlatent.errors import ConfigError, RlatentError, first_line
from rlatent.io.atomic import atomic_write_json
from rlatent.io.checkpoint import checkpoint_phase
from rlatent.io.run_dir import RunDir, read_metrics
from rlatent.run.ablation_grid import Cell, parse_grid, plan_cells
from rlatent.run.ablation_report import DIAGNOSTIC_KEYS, JSON_FILE, MD_FILE, PNG_FILE, write_ablation, write_report
from rlatent.run.evaluate import outcome_key, record_outcomes
from rlatent.run.stats import wilson_interval

CELL_FILE = "ablation_cell.json"
CELLS_DIR = "cells"
CELL_CPUS = 1
"""CPUs a Ray cell task reserves (Ray sets its OMP_NUM_THREADS from it)."""


# ---- one cell -------------------------------------------------------------------------------------------


def cell_config(spec: dict) -> RunConfig:
    """The cell's config: the ablation's config and overrides, then the cell's grid overrides and seed, written
    to its own run directory."""
    cfg = load_config(spec["config"], [*spec["overrides"], *spec["cell_overrides"], f"seed={spec['seed']}"])
    cfg.output.dir = str(Path(spec["dir"]).parent)
    cfg.output.name = Path(spec["dir"]).name
    return cfg


def config_fingerprint(data: dict) -> str:
    """Hash of a resolved config without its `output` section (the run directory may move)."""
    kept = {k: v for k, v in data.items() if k != "output"}
    return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "output" and not f"{prefix}{key}".startswith("output."):
            diffs.append(f"{prefix}{key}: {a} -> {b}")
    return diffs


def final_checkpoint(run_dir: Path, cfg: RunConfig, command: str) -> Path | None:
    """The run's checkpoint at the last step of its last phase, or None."""
    if not (run_dir / "checkpoints").is_dir():
        return None
    latest = RunDir(run_dir).latest_checkpoint()
    target = ("grpo", cfg.grpo.steps) if command == "train" else ("sft", cfg.sft.steps)
    return latest if latest is not None and checkpoint_phase(latest) == target else None


def finished_record(spec: dict) -> dict | None:
    """The cell's earlier record when it is finished (status done, its final checkpoint on disk, the same
    config), else None: a rerun skips exactly these cells."""
    path = Path(spec["dir"]) / CELL_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        cfg = cell_config(spec)
    except (ValueError, OSError, RlatentError):
        return None
    if (record.get("status") != "done" or "test" not in record.get("splits", {})
            or record.get("config_sha1") != config_fingerprint(cfg.model_dump(mode="json"))):
        return None
    return record if final_checkpoint(Path(spec["dir"]), cfg, spec["command"]) is not None else None


def held_out(cfg: RunConfig) -> dict[str, list]:
    """The problems every cell is evaluated on: the eval split's first `eval.limit`, and the out-of-distribution
    split's where the task has one (as `run_phases` evaluates)."""
    splits = {"test": load_split(cfg.data, "test", cfg.eval.limit)[0]}
    if has_ood_split(cfg.data):
        splits["ood"] = load_split(cfg.data, "ood", cfg.eval.limit)[0]
    return splits


def _evaluate_checkpoint(cfg: RunConfig, checkpoint: Path, run_dir: Path, stem: str = "") -> dict[str, Path]:
    """Evaluate a cell's checkpoint whose outcomes this process did not record: the final one of a cell killed
    after it, or (`stem` "sft_") phase 1's of a `train` cell whose phase 1 finished in an earlier process."""
    from rlatent.model.latent_model import LatentModel
    from rlatent.model.loading import model_dtype, resolve_device
    from rlatent.run.stages import evaluate_with_engine, seed_everything

    seed_everything(cfg.seed)
    device = resolve_device(cfg.model.device)
    model, tokenizer = LatentModel.load(checkpoint, model_dtype(cfg.model.dtype, device), device,
                                        trainable=cfg.eval.engine == "vllm", cache_dir=cfg.model.cache_dir)
    out = run_dir / "ablation_eval"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, problems in held_out(cfg).items():
        paths[split] = out / f"samples_{stem}{split}.jsonl"
        evaluate_with_engine(cfg, model, tokenizer, problems, paths[split])
    return paths


def _train_and_evaluate(spec: dict, cfg: RunConfig) -> tuple[dict[str, dict], dict[str, dict], Path | None]:
    """Run (or resume, or only evaluate) the cell; returns its final split outcomes, phase 1's (a `train`
    cell's, so that the report can set phase 2 against its own start; else empty) and its final checkpoint."""
    from rlatent.run.stages import run_phases

    run_dir = Path(spec["dir"])
    command = spec["command"]
    checkpoints = (run_dir / "checkpoints").is_dir() and RunDir(run_dir).latest_checkpoint() is not None
    if checkpoints:  # a run's weights are on disk: use them if it is this cell's config, never overwrite them
        old = RunDir(run_dir).config_path
        saved = load_config(old).model_dump(mode="json") if old.is_file() else {}
        diff = _config_diff(saved, cfg.model_dump(mode="json"))
        if diff:
            raise ConfigError(f"{run_dir} holds a run with another config ({'; '.join(diff[:3])}); delete that "
                              "directory or use another --name")
    elif run_dir.is_dir():  # nothing durable: a run killed before its first checkpoint, or a failed cell
        shutil.rmtree(run_dir)
    final = final_checkpoint(run_dir, cfg, command) if checkpoints else None
    samples = RunDir(run_dir).samples_dir  # where `run_phases` writes its evaluations' samples
    with record_outcomes() as recorded:
        if final is not None:
            paths = _evaluate_checkpoint(cfg, final, run_dir)
        else:
            if checkpoints:
                run_phases(command, None, None, resume=str(run_dir))
            else:
                run_phases(command, cfg, spec["config"])
            paths = {"test": samples / "eval_samples.jsonl", "ood": samples / "eval_samples_ood.jsonl"}
        splits = _recorded_splits(recorded, paths)
        start = {}
        if command == "train":
            start = _recorded_splits(recorded, {"test": samples / "eval_samples_sft.jsonl",
                                                "ood": samples / "eval_samples_sft_ood.jsonl"})
            phase1 = RunDir(run_dir).checkpoint_path(cfg.sft.steps)
            if "test" not in start and phase1.is_dir():  # phase 1 finished in an earlier process
                start = _recorded_splits(recorded, _evaluate_checkpoint(cfg, phase1, run_dir, "sft_"))
    if "test" not in splits:
        raise RuntimeError("the run finished but its final evaluation was not recorded")
    return splits, start, final_checkpoint(run_dir, cfg, command)


def _recorded_splits(recorded: dict[str, dict], paths: dict[str, Path]) -> dict[str, dict]:
    """The split records of the evaluations `record_outcomes` caught, by the samples path each wrote."""
    outcomes = {split: recorded.get(outcome_key(path)) for split, path in paths.items()}
    return {split: _split_record(outcome) for split, outcome in outcomes.items() if outcome is not None}


def _split_record(outcome: dict) -> dict:
    correct, questions = outcome["correct"], outcome["questions"]
    return {
        "metrics": outcome["metrics"],
        "correct": correct,
        "problems": len(correct),
        "questions_sha1": hashlib.sha1("\n".join(questions).encode()).hexdigest(),
        "wilson95": list(wilson_interval(sum(correct), len(correct))) if correct else None,
        "questions": questions,
        "references": outcome["references"],  # what the `constant answer` row is built from
        "predictions": outcome["predictions"],  # how often a cell says that answer
    }


def last_diagnostics(run_dir: Path, phase: str = "eval") -> dict[str, float]:
    """Latent gains (zeros / noise / shuffle) and head F1 of the run's last diagnostics logged as `phase`:
    `eval` (phase 1's) or `eval_grpo` (phase 2's final model)."""
    path = RunDir(run_dir).metrics_path
    records = [r for r in read_metrics(path) if r.get("phase") == phase] if path.is_file() else []
    last = records[-1] if records else {}
    return {key: last[key] for key in DIAGNOSTIC_KEYS if isinstance(last.get(key), (int, float))}


def error_line(error: BaseException) -> str:
    """One line for a failed cell: rlatent's own message, or the exception type and its first line."""
    if isinstance(error, RlatentError):
        return first_line(error)
    return f"{type(error).__name__}: {first_line(error)}"


def new_record(cell_id: str, overrides: list[str], seed: int, status: str, error: str | None = None) -> dict[str, Any]:
    """A cell's entry in ablation.json before its results: `status` is done, failed or not run."""
    return {"id": cell_id, "overrides": overrides, "seed": seed, "run_dir": f"{CELLS_DIR}/{cell_id}",
            "status": status, "error": error, "wall_seconds": 0.0}


def run_cell(spec: dict) -> dict:
    """Run one cell in this process and write its `ablation_cell.json`; returns the record. Never raises but
    for an interrupt: any failure (a config the cell's overrides make invalid, a crash) becomes status
    `failed` with its one-line error (and the traceback in the cell file when it is not rlatent's own)."""
    record = new_record(spec["id"], spec["cell_overrides"], spec["seed"], "failed")
    started = time.perf_counter()
    try:
        cfg = cell_config(spec)
        record["config_sha1"] = config_fingerprint(cfg.model_dump(mode="json"))
        splits, start, checkpoint = _train_and_evaluate(spec, cfg)
        record.update(status="done", splits=splits, diagnostics=last_diagnostics(Path(spec["dir"])),
                      checkpoint=None if checkpoint is None else str(checkpoint.relative_to(Path(spec["dir"]))))
        if start:
            record["phase1_splits"] = start
        after_phase2 = last_diagnostics(Path(spec["dir"]), "eval_grpo")
        if after_phase2:
            record["phase2_diagnostics"] = after_phase2
    except Exception as error:  # noqa: BLE001 -- one failed cell never loses the others
        record["error"] = error_line(error)
        if not isinstance(error, RlatentError):
            record["traceback"] = traceback.format_exc()
    record["wall_seconds"] = round(time.perf_counter() - started, 3)
    path = Path(spec["dir"]) / CELL_FILE
    if record["status"] == "done" or _status(path) != "done":  # a failure never overwrites a finished result
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)
    gc.collect()
    return record


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


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


# ---- running the grid -----------------------------------------------------------------------------------


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
                    record = new_record(cell.id, cell.overrides, cell.seed, "failed", f"Ray task: {error_line(error)}")
                done(cell, record)
    finally:
        if owns:
            ray.shutdown()


def run_ablation(config_path: str, overrides: list[str], grid_args: list[str], seeds: int = 1,
                 command: str = "train", name: str | None = None) -> tuple[Path, list[dict]]:
    """Run every cell not finished yet, then write ablation.json/.md/.png; returns the directory and records."""
    if command not in ("sft", "train"):
        raise ConfigError(f"--command {command!r}: choose sft or train")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: need at least 1")
    grid = parse_grid(grid_args)
    base = load_config(config_path, overrides)  # an error every cell would share stops here, before any cell
    root = (Path(base.output.dir) / (name or f"{Path(config_path).stem}-ablation")).resolve()
    seed_list = [base.seed + i for i in range(seeds)]
    cells = plan_cells(grid, seed_list, root / CELLS_DIR)
    specs = {c.id: {"config": str(Path(config_path).resolve()), "overrides": list(overrides),
                    "cell_overrides": c.overrides, "seed": c.seed, "id": c.id, "dir": str(c.dir),
                    "command": command, "cwd": os.getcwd()} for c in cells}
    spec = {"config": str(config_path), "overrides": list(overrides),
            "grid": [{"key": k, "values": v} for k, v in grid], "seeds": seed_list, "command": command,
            "name": root.name}
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
        else:
            for cell in to_run:
                cell.progress("running")
                done(cell, run_cell(specs[cell.id]))
    finally:  # an interrupt still leaves the table of what finished
        ordered = [records.get(c.id) or new_record(c.id, c.overrides, c.seed, "not run") for c in cells]
        write_ablation(root, spec, ordered)
    return root, ordered


def ablate_command(config: str | None, overrides: list[str], grid: list[str], seeds: int, command: str,
                   name: str | None, report: str | None) -> int:
    """The CLI's `rlatent ablate`: exit status 0 when every cell finished, 1 when one failed (after the table)."""
    if report is not None:
        if config is not None or overrides or grid:
            raise ConfigError("--report DIR rebuilds the table of a finished ablation; give no CONFIG or --grid")
        md, png = write_report(report)
        print(f"ablation table: {md}\nablation plot: {png}")
        return 0
    if config is None:
        raise ConfigError("rlatent ablate: give a CONFIG (or --report DIR)")
    root, records = run_ablation(config, overrides, grid, seeds, command, name)
    failed = [r for r in records if r["status"] != "done"]
    print(f"ablation table: {root / MD_FILE}\nablation data: {root / JSON_FILE}\nablation plot: {root / PNG_FILE}")
    if failed:
        print(f"rlatent: error: {len(failed)} of {len(records)} cells failed ({', '.join(r['id'] for r in failed[:3])}"
              f"{', ...' if len(failed) > 3 else ''}); see {root / MD_FILE}", file=sys.stderr)
        return 1
    return 0
