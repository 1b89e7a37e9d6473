"""The run directory a training run leaves behind.

Layout (one place names every path, so trainers and the CLI never build them):

    RUN/
      config.yaml          resolved config, written once at start
      metrics.jsonl        one JSON object per logged step
      tensorboard/         the same scalars as TensorBoard events (`output.report_to`)
      wandb/, wandb_id     the W&B run's local files and id, where `output.report_to` holds "wandb"
      checkpoints/step_000123/   complete checkpoints (written atomically)
      plots/*.png          curves per phase: a dashboard and the other metrics (`rlatent.io.plots`)
      samples/             evaluation samples
      report.md            short human summary

metrics.jsonl is the source of truth: plots and reports are rebuilt from it,
and it survives a killed run because each line is flushed as it is written.
"""

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from rlatent.io.atomic import atomic_write_text
from rlatent.io.trackers import open_trackers
from rlatent.errors import RlatentError

_CHECKPOINT_NAME = re.compile(r"step_(\d+)")
_TMP_CHECKPOINT = re.compile(r"\.step_\d+\.tmp-.+")
_OLD_CHECKPOINT = re.compile(r"\.(step_\d+)\.old-.+")
RESERVED_KEYS = ("step", "phase", "time")


class RunDir:
    """Paths of one run; creating it creates the directory and its subdirectories."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            self.create()

    def create(self) -> None:
        """Make the directory and its subdirectories (an existing one is kept as it is)."""
        for directory in (self.path, self.checkpoints_dir, self.plots_dir, self.samples_dir):
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def report_path(self) -> Path:
        return self.path / "report.md"

    def checkpoint_path(self, step: int) -> Path:
        """`checkpoints/step_000123`: zero-padded so names sort by step."""
        return self.checkpoints_dir / f"step_{step:06d}"

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint with the highest step, or None.

        Only exact `step_N` directories count: `atomic_directory` renames a
        checkpoint into that name only once it is complete, so the hidden
        `.step_N.tmp-*` / `.step_N.old-*` left by a crash are never chosen.
        """
        if not self.checkpoints_dir.is_dir():
            return None
        steps = {
            int(m.group(1)): p
            for p in self.checkpoints_dir.iterdir()
            if p.is_dir() and (m := _CHECKPOINT_NAME.fullmatch(p.name))
        }
        return steps[max(steps)] if steps else None

    def save_config(self, yaml_text: str) -> None:
        """Write the resolved config, atomically."""
        atomic_write_text(self.config_path, yaml_text)

    def clean_interrupted_writes(self) -> list[str]:
        """Tidy what a kill during an atomic write left behind; returns what was done, one phrase each.

        A `.step_N.tmp-*` checkpoint directory is incomplete (or complete but never renamed into
        place) and is removed. A `.step_N.old-*` is the previous `step_N`, moved aside just before
        the new one was renamed in: it is put back when `step_N` is missing, else removed. Hidden
        `.NAME.*.tmp` files are half-written files of `atomic_file` and are removed.
        """
        done = []
        if self.checkpoints_dir.is_dir():
            for entry in sorted(self.checkpoints_dir.iterdir()):
                old = _OLD_CHECKPOINT.fullmatch(entry.name)
                if old and entry.is_dir():
                    target = self.checkpoints_dir / old.group(1)
                    if target.exists():
                        shutil.rmtree(entry)
                        done.append(f"removed {entry.name}")
                    else:
                        os.replace(entry, target)
                        done.append(f"restored {target.name} from {entry.name}")
            for entry in sorted(self.checkpoints_dir.iterdir()):
                if _TMP_CHECKPOINT.fullmatch(entry.name) and entry.is_dir():
                    shutil.rmtree(entry)
                    done.append(f"removed {entry.name}")
        for directory in (self.path, self.checkpoints_dir, self.samples_dir, self.plots_dir):
            if directory.is_dir():
                for entry in directory.glob(".*.tmp"):
                    if entry.is_file():
                        entry.unlink()
                        done.append(f"removed {entry.relative_to(self.path)}")
        return done


def writable_problem(path: str | Path) -> str | None:
    """Why files cannot be written under directory `path` (existing or to be made), or None: its nearest
    existing ancestor must be a directory this process may write in, on a writable filesystem. A cheap
    check before minutes of model loading; the writes themselves still report what this cannot see."""
    probe = Path(path).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        return f"{probe} is on a read-only filesystem" if read_only else f"no permission to write in {probe}"
    return None


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN/inf; null keeps the line valid and marks the value as missing."""
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLogger:
    """Appends scalars to metrics.jsonl and to the trackers `report_to` names (`rlatent.io.trackers`:
    TensorBoard, W&B; `wandb_project` and `config` are W&B's).

    Opening an existing metrics.jsonl (a resumed run) appends to it. A last
    line without a newline is the fragment of a write cut off by a kill; it is
    dropped so new lines do not glue onto it. `keep` (a resumed run) selects
    the records to keep: the others (what was logged after the checkpoint the
    run resumes from, which it logs again) are dropped first, atomically, so
    every (phase, step) appears once. `dropped` counts them.
    """

    def __init__(self, run_dir: RunDir, keep: Callable[[dict], bool] | None = None,
                 report_to: tuple[str, ...] | list[str] = ("tensorboard",), wandb_project: str = "rlatent",
                 config: dict | None = None) -> None:
        self.dropped = _rewrite_metrics(run_dir.metrics_path, keep)
        self.last_step: dict[str, int] = {}  # phase -> the last step logged by this logger
        self._trackers = open_trackers(report_to, run_dir.path, run_dir.tensorboard_dir, wandb_project, config)
        self._file = run_dir.metrics_path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float], phase: str) -> None:
        """Record `metrics` at `step` under `phase` (e.g. "sft", "grpo", "eval")."""
        clash = [k for k in RESERVED_KEYS if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in metrics.jsonl")
        record = {"step": step, "phase": phase, "time": time.time()}
        record.update({name: _finite_or_none(value) for name, value in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        self.last_step[phase] = step
        for tracker in self._trackers:
            tracker.log(phase, step, metrics)

    def close(self) -> None:
        self._file.close()
        for tracker in self._trackers:
            tracker.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _rewrite_metrics(path: Path, keep: Callable[[dict], bool] | None) -> int:
    """Drop a cut-off last line and the records `keep` rejects, in one atomic rewrite; returns how many
    records were dropped. The file is left untouched when nothing goes."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.decode("utf-8", errors="strict").split("\n")[:-1] if complete else []
    kept = lines
    if keep is not None:
        kept = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RlatentError(f"{path}:{number}: malformed metrics line ({e.msg})") from None
            if keep(record):
                kept.append(line)
    if len(complete) != len(data) or len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def read_metrics(path: str | Path) -> list[dict]:
    """Parse metrics.jsonl; a last line cut off by a kill is skipped, any other bad line raises."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no trailing newline: an interrupted write
                continue
            raise RlatentError(f"{path}:{number}: malformed metrics line ({e.msg})") from e
    return records


def _format_cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return ""
    return str(value).replace("|", "\\|")  # ints (steps, counts) are shown exactly


def metrics_table(rows: list[dict], columns: list[str]) -> str:
    """Render `rows` as a markdown table; floats to 4 significant digits, missing cells blank."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: RunDir, title: str, sections: dict[str, str]) -> Path:
    """Write report.md: `# title`, then one `## heading` per section, atomically."""
    parts = [f"# {title}\n"]
    parts += [f"## {heading}\n\n{body.strip()}\n" for heading, body in sections.items()]
    atomic_write_text(run_dir.report_path, "\n".join(parts))
    return run_dir.report_path
