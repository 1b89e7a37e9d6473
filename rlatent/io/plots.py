"""Figures of a run's curves: per phase a dashboard of what users look at, and the rest apart.

`plots/sft.png` and `plots/grpo.png` hold the dashboard panels below, related
curves sharing a panel; `plots/sft_other.png` and `plots/grpo_other.png` hold
every other logged metric that changes, one panel each, with the constant ones
listed in a footnote instead of drawn as flat lines. Phases logged once
(`data`, `test`) are tables in report.md, not curves.

Figures are built without pyplot, so no global figure state leaks between calls
and no display is needed.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlatent.io.atomic import atomic_file
from rlatent.io.run_dir import RESERVED_KEYS

Series = dict[str, list[tuple[int, float]]]  # "phase/metric" -> (step, value) points

DASHBOARDS: dict[str, list[tuple[str, list[str]]]] = {
    "sft": [
        ("training loss", ["train/loss", "train/lm_loss"]),
        ("start / stop head loss", ["train/start_loss", "train/stop_loss"]),
        ("eval LM loss", ["eval/lm_loss", "eval/next_step_loss"]),
        ("start / stop F1", ["eval/start_f1", "eval/stop_f1"]),
        ("latent gain (nats; ~0 = latents ignored)",
         ["eval/latent_gain_zeros", "eval/latent_gain_noise", "eval/latent_gain_shuffle"]),
        ("latent vs token-embedding norm", ["eval/latent_norm", "eval/embedding_norm"]),
    ],
    "grpo": [
        ("reward", ["grpo/reward_mean"]),
        ("accuracy", ["grpo/accuracy", "grpo/strict_match", "grpo/flexible_extract"]),
        ("latents per completion", ["grpo/latents_per_completion", "grpo/blocks_per_completion"]),
        ("tokens per completion", ["grpo/tokens_per_completion"]),
        ("start / stop rate", ["grpo/start_rate", "grpo/stop_rate"]),
        ("KL to the reference", ["grpo/kl", "grpo/kl_token", "grpo/kl_start", "grpo/kl_stop", "grpo/kl_latent"]),
        ("token entropy", ["grpo/entropy"]),
        ("clip fraction", ["grpo/clip_fraction", "grpo/clip_low", "grpo/clip_high"]),
        ("groups: drawn / with a signal in the update", ["grpo/groups_drawn", "grpo/groups_informative"]),
        ("step time (s)", ["grpo/step_seconds", "grpo/time_rollout", "grpo/time_resample", "grpo/time_update"]),
    ],
}
"""Figure name -> panels (title, curves). A curve that was not logged is left out; an empty panel too."""

PHASES = {"sft": ("train", "eval"), "grpo": ("grpo",)}
"""Figure name -> the metrics.jsonl phases it draws from."""

def collect_series(records: list[dict]) -> Series:
    """Finite numeric values of every metric, keyed `phase/metric`, in logging order."""
    series: Series = {}
    for record in records:
        for name, value in record.items():
            if name in RESERVED_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                series.setdefault(f"{record['phase']}/{name}", []).append((record["step"], value))
    return series


def plot_run(records: list[dict], plots_dir: str | Path) -> list[Path]:
    """Write the dashboard and the other-metrics figure of each phase the records hold; returns the files."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    series = collect_series(records)
    written = []
    for figure, phases in PHASES.items():
        mine = {name: points for name, points in series.items() if name.split("/", 1)[0] in phases}
        if not mine:
            continue
        panels = [(title, [c for c in curves if c in mine]) for title, curves in DASHBOARDS[figure]]
        panels = [(title, curves) for title, curves in panels if curves]
        shown = {c for _, curves in panels for c in curves}
        rest = {name: points for name, points in mine.items() if name not in shown}
        moving = [(name, [name]) for name, points in rest.items() if len({v for _, v in points}) > 1]
        constant = [f"{name} = {points[0][1]:.4g}" for name, points in rest.items()
                    if len({v for _, v in points}) == 1]
        if panels:
            written.append(_draw(panels, mine, f"{figure}: dashboard", plots_dir / f"{figure}.png"))
        if moving or constant:
            footnote = ("constant: " + ", ".join(constant)) if constant else ""
            written.append(_draw(moving, mine, f"{figure}: other metrics", plots_dir / f"{figure}_other.png",
                                 footnote))
    return written


def _draw(panels: list[tuple[str, list[str]]], series: Series, title: str, out: Path, footnote: str = "") -> Path:
    ncols = max(1, min(3, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.5 * ncols, 3 * nrows + (0.4 if footnote else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    for index, (panel, curves) in enumerate(panels, start=1):
        ax = fig.add_subplot(nrows, ncols, index)
        for curve in curves:
            steps, values = zip(*series[curve])
            ax.plot(steps, values, marker="o", markersize=3, label=curve.split("/", 1)[1])  # one point stays visible
        if panel.startswith("latent gain"):
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    if footnote:
        fig.text(0.01, 0.0, _wrap(footnote, 40 * ncols), fontsize=7, va="bottom")
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=100)
    return out


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split(" "):
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    return "\n".join([*lines, line])
