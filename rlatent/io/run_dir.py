"""The run directory a training run leaves behind.

Layout (one place names every path, so trainers and the CLI never build them):

    RUN/
      config.yaml          resolved config, written once at start
      metrics.jsonl        one JSON object per logged step
      tensorboard/         the same scalars as TensorBoard events
      checkpoints/step_000123/   complete checkpoints (written atomically)
      plots/*.png          curves per phase: a dashboard and the other metrics (`rlatent.io.plots`)
      samples/             evaluation samples
      report.md            short human summary

metrics.jsonl is the source of truth: plots and reports are rebuilt from it,
and it survives a killed run because each line is flushed as it is written.
"""

import json
import math
import re
import time
from pathlib import Path
from types import TracebackType

from torch.utils.tensorboard import SummaryWriter

from rlatent.io.atomic import atomic_write_text
from rlatent.errors import RlatentError

_CHECKPOINT_NAME = re.compile(r"step_(\d+)")
RESERVED_KEYS = ("step", "phase", "time")


class RunDir:
    """Paths of one run; creating it creates the directory and its subdirectories."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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
        steps = {
            int(m.group(1)): p
            for p in self.checkpoints_dir.iterdir()
            if p.is_dir() and (m := _CHECKPOINT_NAME.fullmatch(p.name))
        }
        return steps[max(steps)] if steps else None

    def save_config(self, yaml_text: str) -> None:
        """Write the resolved config, atomically."""
        atomic_write_text(self.config_path, yaml_text)


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN/inf; null keeps the line valid and marks the value as missing."""
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLogger:
    """Appends scalars to metrics.jsonl and TensorBoard.

    Opening an existing metrics.jsonl (a resumed run) appends to it. A last
    line without a newline is the fragment of a write cut off by a kill; it is
    dropped so new lines do not glue onto it.
    """

    def __init__(self, run_dir: RunDir) -> None:
        _drop_partial_last_line(run_dir.metrics_path)
        self._file = run_dir.metrics_path.open("a", encoding="utf-8")
        self._writer = SummaryWriter(log_dir=str(run_dir.tensorboard_dir))

    def log(self, step: int, metrics: dict[str, float], phase: str) -> None:
        """Record `metrics` at `step` under `phase` (e.g. "sft", "grpo", "eval")."""
        clash = [k for k in RESERVED_KEYS if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in metrics.jsonl")
        record = {"step": step, "phase": phase, "time": time.time()}
        record.update({name: _finite_or_none(value) for name, value in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        for name, value in metrics.items():
            self._writer.add_scalar(f"{phase}/{name}", float(value), step)

    def close(self) -> None:
        self._file.close()
        self._writer.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _drop_partial_last_line(path: Path) -> None:
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        atomic_write_text(path, data[: data.rfind(b"\n") + 1].decode("utf-8"))


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
