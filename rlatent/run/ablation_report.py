"""The files of `rlatent ablate`, built from ablation.json alone (so they can be rebuilt, and compared later).

ablation.json holds every cell's per-problem outcomes; `rlatent.run.ablation_stats` turns them into one row
per grid point pooled over seeds (Wilson interval of the pooled accuracy, Student-t interval of the seeds'
accuracies, accuracy on seen and unseen arithmetic), B - A between every two grid points seed against seed
on the same problems (a hierarchical bootstrap over seeds and problems; one seed: exact McNemar), each row
against the baseline (the first grid point), and phase 2 against each cell's own phase 1. Every number says
which split it is from: the in-distribution one a cell's `eval.split` names (dev while choosing a recipe,
test once it is fixed) or ood. Beside the grid points, a `constant answer` row: every problem answered with
the commonest reference, what a policy that ignores the question scores (on a Yes/No task the majority rate,
not 50 %).

    OUTPUT_DIR/NAME/
      ablation.json        the spec and every cell: overrides, seed, status (done / failed + its one-line
                           error), metrics, intervals, per-problem 0/1 outcomes; md and png are rebuilt from it
      ablation.md          one row per grid point (aggregated over seeds), each against the baseline, then
                           every pair; with phase 2, each cell's phase 2 against its own phase-1 start
      ablation.png         accuracy per grid point with 95 % error bars, in and out of distribution
      cells/<cell-id>/     a run directory of `rlatent sft` / `rlatent train`, plus ablation_cell.json
      cells/<cell-id>.log  its output, when cells run as processes (--jobs, --timeout)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlatent.errors import ConfigError, first_line
from rlatent.io.atomic import atomic_file, atomic_write_text
from rlatent.io.run_dir import metrics_table
from rlatent.run.ablation_stats import (CONSTANT, SPLITS, aggregate, paired_tests, phase_two_tests, points,
                                        split_label, with_constant_answer)

JSON_FILE = "ablation.json"
MD_FILE = "ablation.md"
PNG_FILE = "ablation.png"


def write_ablation(root: Path, spec: dict, records: list[dict]) -> None:
    """ablation.json (spec + cells, per-problem vectors included), then the md and png built from it."""
    cells = [{k: v for k, v in r.items() if k != "traceback"} for r in records]
    for cell in cells:  # the questions stay in each cell's file; their hash pairs cells here
        for key in ("splits", "phase1_splits"):
            if key in cell:
                cell[key] = {s: {k: v for k, v in d.items() if k != "questions"} for s, d in cell[key].items()}
    data = {"version": 2, **spec, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "cells": cells}
    with_constant = with_constant_answer(cells)
    data["rows"] = aggregate(with_constant)
    data["paired"] = paired_tests(with_constant)
    data["phase2_vs_phase1"] = phase_two_tests(with_constant)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / JSON_FILE, json.dumps(data, indent=1) + "\n")
    write_report(root)


def _acc(entry: dict | None) -> str:
    if not entry:
        return ""
    low, high = entry["wilson95"]
    return f"{entry['accuracy']:.3f} [{low:.3f}, {high:.3f}] ({entry['correct']}/{entry['problems']})"


def _seed_interval(entry: dict | None) -> str:
    if not entry:
        return ""
    if entry["seed_t95"] is None:
        return f"{entry['seed_mean']:.3f} (1 seed)"
    low, high = entry["seed_t95"]
    return f"{entry['seed_mean']:.3f} [{low:.3f}, {high:.3f}]"


def _num(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"


def _difference(test: dict) -> str:
    return f"{test['difference']:+.3f} [{test['low']:+.3f}, {test['high']:+.3f}]"


def _p(test: dict) -> str:
    return f"{test['p']:.4g} ({'McNemar' if test['test'] == 'exact McNemar' else 'bootstrap'})"


def _arithmetic(counts: list[int] | None) -> str:
    """[problems, right, ...] -> `right/problems` for each outcome, joined by ` -> `."""
    if not counts or not counts[0]:
        return ""
    return " -> ".join(f"{right / counts[0]:.3f}" for right in counts[1:]) + f" (n={counts[0]})"


def _command_line(data: dict) -> str:
    """The `rlatent ablate` command the spec in ablation.json records."""
    words = ["rlatent ablate", data.get("config", "CONFIG"), *data.get("overrides", [])]
    words += [f"--point {p['name']} {' '.join(p['overrides'])}" for p in data.get("points", [])]
    words += [f"--grid {g['key']}={','.join(g['values'])}" for g in data.get("grid", [])]
    words += [f"--seeds {len(data.get('seeds', [0]))}", f"--command {data.get('command', 'train')}"]
    words += [f"--phase2 {name}" for name in data.get("phase2", [])] + [f"--name {data.get('name', '')}"]
    return " ".join(" ".join(words).split())


def _results_table(rows: list[dict], labels: dict[str, str]) -> str:
    columns = ["grid point", "seeds"]
    for split in [s for s in SPLITS if any(s in r for r in rows)]:
        name = labels[split]
        columns += [f"{name} accuracy [Wilson 95 %]", f"{name} seeds [t 95 %]", f"{name} seen / unseen arithmetic"]
    columns += ["strict_match", "tokens/answer", "latents/answer", "forward passes/answer", "gain zeros",
                "gain noise", "gain shuffle", "wall s"]
    table = []
    for row in rows:
        line = {"grid point": row["point"], "seeds": f"{row['seeds_done']}/{row['seeds']}",
                "strict_match": _num(row["strict_match"]), "tokens/answer": _num(row["tokens_per_answer"]),
                "latents/answer": _num(row["latents_per_answer"]),
                "forward passes/answer": _num(row["forward_passes_per_answer"]),
                "gain zeros": _num(row["latent_gain_zeros"], 4), "gain noise": _num(row["latent_gain_noise"], 4),
                "gain shuffle": _num(row["latent_gain_shuffle"], 4), "wall s": _num(row["wall_seconds"], 3)}
        for split, name in labels.items():
            entry = row.get(split)
            arithmetic = (entry or {}).get("arithmetic") or {}
            line |= {f"{name} accuracy [Wilson 95 %]": _acc(entry), f"{name} seeds [t 95 %]": _seed_interval(entry),
                     f"{name} seen / unseen arithmetic": " / ".join(
                         _arithmetic(arithmetic[k]) for k in ("seen", "unseen")) if arithmetic else ""}
        table.append(line)
    return metrics_table(table, columns)


def _baseline_table(tests: list[dict], baseline: str, labels: dict[str, str]) -> str:
    lines = [{"grid point": t["b"], "split": labels[t["split"]], "seeds": ",".join(map(str, t["seeds"])),
              "baseline -> row": f"{t['accuracy_a']:.3f} -> {t['accuracy_b']:.3f}",
              "row - baseline [95 %]": _difference(t), "p": _p(t),
              "seen arithmetic": _arithmetic(t.get("arithmetic", {}).get("seen")),
              "unseen arithmetic": _arithmetic(t.get("arithmetic", {}).get("unseen"))}
             for t in tests if t["a"] == baseline and t["p"] is not None]
    return metrics_table(lines, ["grid point", "split", "seeds", "baseline -> row", "row - baseline [95 %]", "p",
                                 "seen arithmetic", "unseen arithmetic"])


def _pairs_table(tests: list[dict]) -> str:
    lines = [{"A": t["a"], "B": t["b"], "seeds": ",".join(map(str, t["seeds"])),
              "paired problems": "" if t["p"] is None else str(t["problems"]),
              "accuracy A / B": "" if t["p"] is None else f"{t['accuracy_a']:.3f} / {t['accuracy_b']:.3f}",
              "A right, B wrong": "" if t["p"] is None else str(t["only_a"]),
              "A wrong, B right": "" if t["p"] is None else str(t["only_b"]),
              "B - A [95 %]": "" if t["p"] is None else _difference(t),
              "p": t.get("note") or _p(t)} for t in tests]
    return metrics_table(lines, ["A", "B", "seeds", "paired problems", "accuracy A / B", "A right, B wrong",
                                 "A wrong, B right", "B - A [95 %]", "p"])


def _phase_two_table(lifts: list[dict], labels: dict[str, str]) -> str:
    lines = [{"grid point": t["point"], "split": labels[t["split"]], "seeds": str(t["seeds"]),
              "phase 1 -> 2": f"{t['accuracy_a']:.3f} -> {t['accuracy_b']:.3f}",
              "phase 1 only": str(t["only_a"]), "phase 2 only": str(t["only_b"]),
              "phase 2 - phase 1 [95 %]": _difference(t), "p": _p(t),
              "says the constant answer": " -> ".join(map(str, t.get("says_constant", []))),
              "phase 2's commonest answer": (f"{t['top_answer']!r}: " + " -> ".join(map(str, t["says_top"]))
                                             if "top_answer" in t else ""),
              "right, other answers": " -> ".join(map(str, t.get("right_other", []))),
              "shuffle gain": " -> ".join(f"{g:+.4f}" for g in t.get("shuffle_gain", []))} for t in lifts]
    return metrics_table(lines, ["grid point", "split", "seeds", "phase 1 -> 2", "phase 1 only", "phase 2 only",
                                 "phase 2 - phase 1 [95 %]", "p", "says the constant answer", "right, other answers",
                                 "phase 2's commonest answer", "shuffle gain"])


PAIRED = ("seed s against seed s on the same problems. Over several seeds the 95 % interval and p come from a "
          "hierarchical bootstrap (resampling seeds, then problems; a problem that several seeds met weighs "
          "once); with one seed, p is the exact McNemar test.")


def render_markdown(data: dict) -> str:
    """ablation.md from the content of ablation.json."""
    cells = data["cells"]
    with_constant = with_constant_answer(cells)
    rows = aggregate(with_constant)
    tests = paired_tests(with_constant)
    labels = {split: split_label(cells, split) for split in SPLITS if any(split in r for r in rows)}
    counts = {s: sum(1 for c in cells if c["status"] == s) for s in ("done", "failed", "not run")}
    parts = [f"# Ablation {data.get('name', '')}\n", f"`{_command_line(data)}`\n",
             f"{len(cells)} cells: {counts['done']} done, {counts['failed']} failed"
             + (f", {counts['not run']} not run" if counts["not run"] else "") + "\n"]
    parts.append("Each number names its split: the in-distribution one the cells' `eval.split` chose (dev while "
                 "choosing a recipe, test once it is fixed) and ood. Accuracy is pooled over the seeds that "
                 "finished (correct/problems) with its Wilson 95 % interval; *seeds* is the mean of the per-seed "
                 "accuracies with its Student-t 95 % interval (seed-to-seed spread; needs 2+ seeds). *Seen / "
                 "unseen arithmetic*: accuracy on the problems whose every calculator step was / was not a step "
                 "of the cell's training problems (recall against computation). Cost columns are per answer on "
                 "the in-distribution split; latent gains (nats) are from each cell's last phase-1 diagnostics "
                 "(~0: latents ignored); all columns are means over seeds; wall s is per cell. *constant answer* "
                 "gives every problem the commonest reference: the score of ignoring the question.\n")
    parts.append("## Results per grid point\n\n" + _results_table(rows, labels))
    if len(rows) > 1:
        baseline = rows[0]["point"]
        parts.append(f"## Against the baseline\n\nEach row minus the first grid point, *{baseline}*, {PAIRED}\n\n"
                     + _baseline_table(tests, baseline, labels))
    for split, title in SPLITS.items():
        mine = [t for t in tests if t["split"] == split]
        if mine:
            parts.append(f"## Paired comparisons, {title} ({labels[split]})\n\nB - A for every two grid points, "
                         f"{PAIRED}\n\n" + _pairs_table(mine))
    lifts = phase_two_tests(with_constant)
    if lifts:
        parts.append("## Phase 2 against phase 1\n\nEach cell's own phase-1 evaluation against its final one, "
                     f"{PAIRED} *Says the constant answer*: problems answered with the commonest reference; *right, "
                     "other answers*: problems right whose reference is another. A gain made by saying the commonest "
                     "answer more often raises the first and leaves the second flat. *Phase 2's commonest answer*: "
                     "how often each phase said it; a drift to one answer shows there even when the reward paid "
                     "another than the evaluation's commonest (the training prompts'). *Shuffle gain*: nats the "
                     "next-step loss rises when each problem gets another's latents, after phase 1 and after phase 2 "
                     "(mean over seeds): a drop says phase 2 wore away what the latents carry.\n\n"
                     + _phase_two_table(lifts, labels))
    cell_lines = [{"cell": c["id"], "status": c["status"], "command": c.get("command", data.get("command", "")),
                   "accuracy": _num(c["splits"]["test"]["metrics"]["accuracy"]) if c["status"] == "done" else "",
                   "split": c["splits"]["test"].get("split", "test") if c["status"] == "done" else "",
                   "OOD accuracy": (_num(c["splits"]["ood"]["metrics"]["accuracy"])
                                    if c["status"] == "done" and "ood" in c["splits"] else ""),
                   "wall s": _num(c.get("wall_seconds")), "error": c.get("error") or "",
                   "run directory": c.get("run_dir", "")} for c in cells]
    parts.append("## Cells\n\n" + metrics_table(cell_lines, ["cell", "command", "status", "accuracy", "split",
                                                             "OOD accuracy", "wall s", "run directory", "error"]))
    parts.append(f"![accuracy per grid point]({PNG_FILE})\n")
    return "\n".join(parts)


def render_plot(data: dict, out: Path) -> Path:
    """ablation.png: pooled accuracy per grid point with its Wilson 95 % interval, in and out of distribution;
    beside it each seed's accuracy (x) and, with 2+ seeds, the seeds' mean with its t 95 % interval (square)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = with_constant_answer(data["cells"])
    rows = aggregate(cells)
    by_point = points(cells)
    width = max(6.0, 1.1 * len(rows) + 2)
    fig = Figure(figsize=(width, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    offsets = {"test": -0.12, "ood": 0.12} if any("ood" in r for r in rows) else {"test": 0.0}
    colors = {"test": "tab:blue", "ood": "tab:orange"}
    for split, offset in offsets.items():
        name = f"{SPLITS[split]} ({split_label(cells, split)})"
        xs, ys, low, high, seed_x, seed_y = [], [], [], [], [], []
        t_x, t_y, t_low, t_high = [], [], [], []
        for i, row in enumerate(rows):
            entry = row.get(split)
            if not entry:
                continue
            xs.append(i + offset)
            ys.append(entry["accuracy"])
            low.append(entry["accuracy"] - entry["wilson95"][0])
            high.append(entry["wilson95"][1] - entry["accuracy"])
            if entry["seed_t95"] is not None:
                t_x.append(i + offset + 0.06)
                t_y.append(entry["seed_mean"])
                t_low.append(entry["seed_mean"] - max(0.0, entry["seed_t95"][0]))
                t_high.append(min(1.0, entry["seed_t95"][1]) - entry["seed_mean"])
            for cell in by_point[row["point"]]:
                if cell["status"] == "done" and split in cell["splits"]:
                    seed_x.append(i + offset + 0.05)
                    seed_y.append(cell["splits"][split]["metrics"]["accuracy"])
        if xs:
            ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=4, color=colors[split],
                        label=f"{name} (pooled, Wilson 95 %)")
            ax.scatter(seed_x, seed_y, s=10, color=colors[split], alpha=0.5, marker="x")
        if t_x:
            ax.errorbar(t_x, t_y, yerr=[t_low, t_high], fmt="s", markersize=3, capsize=2, alpha=0.6,
                        color=colors[split], label=f"{name} (seeds' mean, t 95 %)")
    ax.set_xticks(range(len(rows)), [r["point"].replace(", ", "\n") for r in rows], fontsize=7)
    ax.set_xlim(-0.6, max(len(rows), 1) - 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"ablation {data.get('name', '')}: accuracy per grid point (x: seeds)")
    ax.grid(alpha=0.3, axis="y")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no cell finished", ha="center", transform=ax.transAxes)
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=100)
    return out


def write_report(root: str | Path) -> tuple[Path, Path]:
    """Rebuild ablation.md and ablation.png from `root`/ablation.json alone (`rlatent ablate --report DIR`)."""
    root = Path(root)
    path = root / JSON_FILE
    if not path.is_file():
        raise ConfigError(f"{root}: no {JSON_FILE} (not an ablation directory)")
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({first_line(error)})") from None
    atomic_write_text(root / MD_FILE, render_markdown(data))
    return root / MD_FILE, render_plot(data, root / PNG_FILE)
