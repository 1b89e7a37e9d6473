"""What `--resume` relies on: the run's record, the config it was started with, and a metrics file
that stays a faithful log.

- `run.json` records the command and the whole resolved config the run started with (and, once
  the run is done, `finished`). Resuming compares the run's `config.yaml` with it: a key that
  changes the experiment (model, LoRA, latent settings, data, objective, seed) is refused with
  one line listing the keys; only `RESUMABLE_KEYS` may change (how and where the run computes,
  how long phase 2 runs, how often it saves, what the evaluation looks at).
- `metrics.jsonl` keeps only the records the resumed run will not log again (`records_to_keep`),
  so every (phase, step) appears once and the file equals an uninterrupted run's but for times.
- Ctrl-C during training writes a checkpoint of the last completed step when the state is exactly
  that step's (`interrupt_checkpoint`), and exits with status 130.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from pathlib import Path

from rlatent.config import RunConfig, load_config
from rlatent.errors import CheckpointError, ConfigError, first_line
from rlatent.io.atomic import atomic_write_json
from rlatent.io.checkpoint import SETTINGS_FILE
from rlatent.io.run_dir import RunDir

RUN_FILE = "run.json"
RESUMABLE_KEYS = ("output.*", "eval.*", "distributed.*", "deepspeed.*", "model.device", "model.cache_dir",
                  "sft.save_every", "grpo.save_every", "grpo.steps")
"""Config keys that may differ on resume from what the run started with: they change where and how the run
computes (devices, Ray, DeepSpeed: checkpoints are portable between them), where it writes, how often it
saves, what evaluation looks at, and how long phase 2 goes on (its schedule is constant after warm-up, so
more steps extend the same run). `sft.steps` may not change: phase 1's schedule decays over it."""
# What a checkpoint's latent.json records, and the config key of each (`LatentSettings.from_config`).
SETTINGS_KEYS = {"base_model": "model.name_or_path", "mode": "latent.mode", "trunk": "latent.trunk",
                 "proj": "latent.proj", "k": "latent.k", "head": "model.head", "lora_r": "model.lora_r",
                 "lora_alpha": "model.lora_alpha", "lora_dropout": "model.lora_dropout",
                 "lora_target_modules": "model.lora_target_modules"}


def write_run_record(run: RunDir, command: str, cfg: RunConfig, finished: bool = False) -> None:
    atomic_write_json(run.path / RUN_FILE, {"command": command, "finished": finished,
                                            "config": cfg.model_dump(mode="json")})


def mark_finished(run: RunDir, command: str, cfg: RunConfig, record: dict) -> None:
    """Record that the run is done (a later `--resume` then changes nothing); the config it started with
    stays the one recorded (a run from before records existed gets the one it finished with)."""
    atomic_write_json(run.path / RUN_FILE, {"command": command, "config": cfg.model_dump(mode="json"),
                                            **record, "finished": True})


def read_run_record(run: RunDir) -> dict:
    """run.json, or {} for a run that has none; a corrupt one is a one-line `CheckpointError`."""
    path = run.path / RUN_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        record, reason = None, first_line(exc)
    else:
        reason = "no command"
    if not isinstance(record, dict) or not isinstance(record.get("command"), str):
        raise CheckpointError(f"{path}: corrupt run record ({reason}); it names the command that made the run: "
                              'write {"command": "train"} (or "sft", "grpo") into it to resume')
    return record


def open_run(resume: str) -> tuple[RunDir, RunConfig, dict]:
    """The run directory `--resume` names (never created here), its config.yaml and its record."""
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such run directory")
    run = RunDir(path, create=False)
    if not run.config_path.is_file():
        raise ConfigError(f"{resume}: not a run directory (config.yaml missing)")
    return run, load_config(run.config_path), read_run_record(run)


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


def check_config_drift(run: RunDir, cfg: RunConfig, record: dict, checkpoint: Path | None,
                       built_from_config: bool) -> list[str]:
    """Refuse a config.yaml edited since the run started (or, for a run without a recorded config, one
    that disagrees with its checkpoint's model settings) in any key but `RESUMABLE_KEYS`, naming the keys.
    Returns the changed keys that may change, for the caller to announce."""
    now = flatten(cfg.model_dump(mode="json"))
    before: dict[str, object] = {}
    if isinstance(record.get("config"), dict):
        before = flatten(record["config"])
    elif checkpoint is not None and built_from_config and (checkpoint / SETTINGS_FILE).is_file():
        try:  # an older run: what its model was built with is in the checkpoint
            settings = json.loads((checkpoint / SETTINGS_FILE).read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            settings = {}
        before = {SETTINGS_KEYS[name]: value for name, value in settings.items() if name in SETTINGS_KEYS}
    changed = sorted(key for key in before.keys() & now.keys() if before[key] != now[key])
    refused = [key for key in changed if not resumable(key)]
    if refused:
        listed = ", ".join(f"{key} ({before[key]!r} -> {now[key]!r})" for key in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(f"{run.config_path}: changed since the run started in {listed}{more}; resuming would "
                          f"mix two experiments. Restore them, or start a new run (may change on resume: "
                          f"{', '.join(RESUMABLE_KEYS)})")
    return changed


def is_finished(record: dict, phases: tuple[str, ...], done: tuple[str | None, int], cfg: RunConfig) -> bool:
    """A finished run: marked so in run.json and its latest checkpoint is its last phase's last step (more
    `grpo.steps` than it ran make it unfinished again)."""
    last = phases[-1]
    steps = cfg.sft.steps if last == "sft" else cfg.grpo.steps
    return bool(record.get("finished")) and done[0] == last and done[1] >= steps


def records_to_keep(done: tuple[str | None, int], cfg: RunConfig) -> Callable[[dict], bool]:
    """Which metrics.jsonl records a run resumed from a checkpoint of `done` = (phase, step) keeps: exactly
    those it will not log again. From scratch (no checkpoint): none. From phase 1 at step s: the data
    summary and phase 1's records up to s, but the diagnostics of the last step (the trainer evaluates
    again at the end, also when it resumes there); never the held-out tests (`test*`) or phase 2. From
    phase 2 at step s: all of phase 1 (its final test included) and phase 2's steps up to s (not its final
    diagnostics, `eval_grpo`)."""
    phase, step = done
    if phase is None:
        return lambda record: False
    if phase == "sft":
        def keep(record: dict) -> bool:
            name, at = record.get("phase", ""), record.get("step", 0)
            if name == "data":
                return True
            if name.startswith("test") or name in ("grpo", "eval_grpo") or at > step:
                return False
            return not (name == "eval" and at >= cfg.sft.steps)
        return keep

    def keep(record: dict) -> bool:
        name = record.get("phase", "")
        if name == "grpo":
            return record.get("step", 0) <= step
        return name != "eval_grpo" and not (name.startswith("test") and not name.startswith("test_sft"))
    return keep


def earlier_results(records: list[dict]) -> dict[str, dict[str, float]]:
    """Phase 1's held-out results from the kept records (a run resumed in phase 2 does not test again), keyed
    as `test_after` keys them, for the report."""
    results = {}
    for record in records:
        if record.get("phase", "").startswith("test_sft"):
            key = "sft" if record["phase"] == "test_sft" else f"sft ({record['phase'].removeprefix('test_sft_')})"
            results[key] = {k: v for k, v in record.items() if k not in ("step", "phase", "time")}
    return results


def interrupt_checkpoint(trainer, optimizer, start: tuple[int, int], updates_per_step: int,
                         expected: list[tuple[str, int]], logged: dict[str, int], path: Path) -> Path | None:
    """After Ctrl-C in `trainer.train()`: write a checkpoint of its last completed step when the state is
    exactly that step's, else None. Exact means: steps were completed since `start` = (step, optimizer
    updates), the optimizer took `updates_per_step` updates per completed step and none of the step under
    way (a Ctrl-C never splits one), and the step's metrics records (`expected` (phase, step) pairs) were
    all written (`logged`: the logger's last step per phase). A checkpoint already at `path` is kept."""
    if optimizer is None or trainer.step <= start[0]:
        return None
    if getattr(optimizer, "updates", None) != start[1] + (trainer.step - start[0]) * updates_per_step:
        return None
    if any(logged.get(phase) != step for phase, step in expected):
        return None
    if path.is_dir():
        return path
    return trainer.save_checkpoint()
