"""Where a run's scalars go besides metrics.jsonl (`output.report_to`, as TRL's `report_to`).

metrics.jsonl stays the source of truth; a tracker gets each record as it is written, keyed
`{phase}/{name}`. TensorBoard writes into the run directory. Weights & Biases (an optional extra) keeps one
W&B run per run directory: its id is stored in the run directory, so `--resume` goes on with the same W&B
run instead of starting a second one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Protocol

from rlatent.errors import ConfigError, first_line
from rlatent.io.atomic import atomic_write_text

WANDB_ID_FILE = "wandb_id"


class Tracker(Protocol):
    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars as TensorBoard events under `log_dir`, one tag per `{phase}/{name}`."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(f"{phase}/{name}", float(value), step)

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """One W&B run for the run directory `run_path`, with the run's config. Each phase logs against its own
    step axis (`{phase}/step`): phases count their steps apart (phase 2's step 1 follows phase 1's step 120,
    an evaluation repeats a training step), and W&B's own step may only grow."""

    def __init__(self, run_path: Path, project: str, config: dict | None) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("output.report_to: wandb is not installed (pip install -e '.[wandb]')") from None
        id_path = run_path / WANDB_ID_FILE
        run_id = id_path.read_text(encoding="utf-8").strip() if id_path.is_file() else secrets.token_hex(4)
        try:
            self._run = wandb.init(project=project, name=run_path.name, id=run_id, resume="allow",
                                   dir=str(run_path), config=config)
        except Exception as exc:  # wandb raises its own errors (no API key, no network) with long messages
            raise ConfigError(f"output.report_to: wandb could not start a run ({first_line(exc)}); run "
                              "`wandb login`, or set WANDB_MODE=offline and `wandb sync` later") from None
        if not id_path.is_file():
            atomic_write_text(id_path, run_id + "\n")
        self._phases: set[str] = set()

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        if phase not in self._phases:
            self._phases.add(phase)
            self._run.define_metric(f"{phase}/step")
            self._run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
        self._run.log({f"{phase}/step": step, **{f"{phase}/{name}": value for name, value in metrics.items()}})

    def close(self) -> None:
        self._run.finish()


def open_trackers(report_to: tuple[str, ...] | list[str], run_path: Path, tensorboard_dir: Path,
                  wandb_project: str = "rlatent", config: dict | None = None) -> list[Tracker]:
    """The trackers `report_to` names, in its order (those opened are closed again when a later one fails).
    W&B is quiet unless WANDB_SILENT says otherwise."""
    trackers: list[Tracker] = []
    try:
        for name in report_to:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(tensorboard_dir))
            elif name == "wandb":
                os.environ.setdefault("WANDB_SILENT", "true")
                trackers.append(WandbTracker(run_path, wandb_project, config))
            else:
                raise ConfigError(f"output.report_to: unknown tracker {name!r} (tensorboard or wandb)")
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers
