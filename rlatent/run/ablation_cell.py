"""One cell of `rlatent ablate`: a full run (`rlatent sft` or `train`) of the ablation's config with the cell's
overrides and seed, and the record the tables are built from.

A cell whose directory holds its final checkpoint and its per-problem results is skipped when the ablation
is run again; one with a checkpoint short of the last step resumes from it; one killed after its final
checkpoint is only evaluated. A failing cell is recorded as failed, with its one-line error, and never
overwrites a finished result.

The record keeps, per held-out split, the per-problem outcomes (paired tests), references and predictions
(the `constant answer` row), which split it is (`eval.split`: dev or test; or ood), and whether each problem's
arithmetic was in the cell's training problems (`rlatent.run.overlap`: accuracy on seen and unseen apart).
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
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
from rlatent.run.ablation_stats import DIAGNOSTIC_KEYS
from rlatent.run.evaluate import outcome_key, record_outcomes
from rlatent.run.overlap import seen_arithmetic
from rlatent.run.stats import wilson_interval

CELL_FILE = "ablation_cell.json"


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
    """The problems every cell is evaluated on, as `run_phases` evaluates: under "test" the first `eval.limit`
    of the in-distribution split `eval.split` names (dev or test), under "ood" the out-of-distribution split's
    where the task has one."""
    splits = {"test": load_split(cfg.data, cfg.eval.split, cfg.eval.limit)[0]}
    if has_ood_split(cfg.data):
        splits["ood"] = load_split(cfg.data, "ood", cfg.eval.limit)[0]
    return splits


def split_names(cfg: RunConfig) -> dict[str, str]:
    """The data split behind each held-out slot of `held_out`."""
    return {"test": cfg.eval.split, "ood": "ood"}


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
    names = split_names(cfg)
    with record_outcomes() as recorded:
        if final is not None:
            paths = _evaluate_checkpoint(cfg, final, run_dir)
        else:
            if checkpoints:
                run_phases(command, None, None, resume=str(run_dir))
            else:
                run_phases(command, cfg, spec["config"])
            paths = {"test": samples / "eval_samples.jsonl", "ood": samples / "eval_samples_ood.jsonl"}
        splits = _recorded_splits(recorded, paths, names)
        start = {}
        if command == "train":
            start = _recorded_splits(recorded, {"test": samples / "eval_samples_sft.jsonl",
                                                "ood": samples / "eval_samples_sft_ood.jsonl"}, names)
            phase1 = RunDir(run_dir).checkpoint_path(cfg.sft.steps)
            if "test" not in start and phase1.is_dir():  # phase 1 finished in an earlier process
                start = _recorded_splits(recorded, _evaluate_checkpoint(cfg, phase1, run_dir, "sft_"), names)
    if "test" not in splits:
        raise RuntimeError("the run finished but its final evaluation was not recorded")
    return splits, start, final_checkpoint(run_dir, cfg, command)


def _recorded_splits(recorded: dict[str, dict], paths: dict[str, Path], names: dict[str, str]) -> dict[str, dict]:
    """The split records of the evaluations `record_outcomes` caught, by the samples path each wrote."""
    outcomes = {split: recorded.get(outcome_key(path)) for split, path in paths.items()}
    return {split: _split_record(outcome, names[split]) for split, outcome in outcomes.items() if outcome is not None}


def _split_record(outcome: dict, split: str) -> dict:
    correct, questions = outcome["correct"], outcome["questions"]
    return {
        "split": split,
        "metrics": outcome["metrics"],
        "correct": correct,
        "problems": len(correct),
        "questions_sha1": hashlib.sha1("\n".join(questions).encode()).hexdigest(),
        "wilson95": list(wilson_interval(sum(correct), len(correct))) if correct else None,
        "questions": questions,
        "references": outcome["references"],  # what the `constant answer` row is built from
        "predictions": outcome["predictions"],  # how often a cell says that answer
    }


def mark_seen(cfg: RunConfig, *records: dict[str, dict]) -> None:
    """Give each split record of `records` its problems' `seen` flags (1: every calculator mark of the problem
    is a mark of a training problem of this cell's own data), in question order."""
    train = load_split(cfg.data, "train", cfg.data.train_limit)[0]
    for split, problems in held_out(cfg).items():
        seen = dict(zip((p.question for p in problems), seen_arithmetic(train, problems)))
        for splits in records:
            if split in splits:
                splits[split]["seen"] = [int(seen[q]) for q in splits[split]["questions"]]


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


def new_record(spec: dict, status: str, error: str | None = None) -> dict[str, Any]:
    """A cell's entry in ablation.json before its results: `status` is done, failed or not run."""
    return {"id": spec["id"], "point": spec["point"], "overrides": spec["cell_overrides"], "seed": spec["seed"],
            "command": spec["command"], "run_dir": f"{Path(spec['dir']).parent.name}/{spec['id']}",
            "status": status, "error": error, "wall_seconds": 0.0}


def run_cell(spec: dict) -> dict:
    """Run one cell in this process and write its `ablation_cell.json`; returns the record. Never raises but
    for an interrupt: any failure (a config the cell's overrides make invalid, a crash) becomes status
    `failed` with its one-line error (and the traceback in the cell file when it is not rlatent's own)."""
    record = new_record(spec, "failed")
    started = time.perf_counter()
    try:
        cfg = cell_config(spec)
        record["config_sha1"] = config_fingerprint(cfg.model_dump(mode="json"))
        splits, start, checkpoint = _train_and_evaluate(spec, cfg)
        mark_seen(cfg, splits, start)
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
    write_record(spec, record)
    gc.collect()
    return record


def write_record(spec: dict, record: dict) -> None:
    """The cell's `ablation_cell.json`, unless it would replace a finished result with a failure."""
    path = Path(spec["dir"]) / CELL_FILE
    if record["status"] == "done" or _status(path) != "done":
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
