"""The tables of `rlatent ablate`, built from ablation.json alone (so they can be rebuilt, and compared later).

ablation.json holds every cell's per-problem outcomes; from them: one row per grid point pooled over seeds
(Wilson interval of the pooled accuracy, Student-t interval of the seeds' accuracies), exact McNemar tests
between every two grid points seed against seed on the same problems, and the figure. Beside the grid
points, a `constant answer` row: every problem answered with the commonest reference, what a policy that
ignores the question scores (on a Yes/No task the majority rate, not 50 %). The statistics are
`rlatent.run.stats`.

    OUTPUT_DIR/NAME/
      ablation.json        the spec and every cell: overrides, seed, status (done / failed + its one-line
                           error), metrics, intervals, per-problem 0/1 outcomes; md and png are rebuilt from it
      ablation.md          one row per grid point (aggregated over seeds), then exact McNemar tests; with
                           `--command train`, phase 2 against each cell's own phase-1 start
      ablation.png         accuracy per grid point with 95 % error bars, in and out of distribution
      cells/<cell-id>/     a run directory of `rlatent sft` / `rlatent train`, plus ablation_cell.json
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rlatent.errors import ConfigError, first_line
from rlatent.io.atomic import atomic_file, atomic_write_text
from rlatent.io.run_dir import metrics_table
from rlatent.run.stats import (constant_answer, constant_answer_split, discordant_pairs, mcnemar_exact, mean_t_interval,
                              wilson_interval)

JSON_FILE = "ablation.json"
MD_FILE = "ablation.md"
PNG_FILE = "ablation.png"
SPLITS = {"test": "in distribution", "ood": "out of distribution"}
GAINS = ("zeros", "noise", "shuffle")
DIAGNOSTIC_KEYS = tuple(f"latent_gain_{g}" for g in GAINS) + ("start_f1", "stop_f1", "next_step_loss")
CONSTANT = "constant answer"


def write_ablation(root: Path, spec: dict, records: list[dict]) -> None:
    """ablation.json (spec + cells, per-problem vectors included), then the md and png built from it."""
    cells = [{k: v for k, v in r.items() if k != "traceback"} for r in records]
    for cell in cells:  # the questions stay in each cell's file; their hash pairs cells here
        for key in ("splits", "phase1_splits"):
            if key in cell:
                cell[key] = {s: {k: v for k, v in d.items() if k != "questions"} for s, d in cell[key].items()}
    data = {"version": 1, **spec, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "cells": cells}
    with_constant = with_constant_answer(cells)
    data["rows"] = aggregate(with_constant)
    data["mcnemar"] = paired_tests(with_constant)
    data["phase2_vs_phase1"] = phase_two_tests(with_constant)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / JSON_FILE, json.dumps(data, indent=1) + "\n")
    write_report(root)


def with_constant_answer(cells: list[dict]) -> list[dict]:
    """`cells` and, after them, one cell per seed for the `constant answer` row: on each split, every problem
    answered with the commonest reference (`rlatent.run.stats.constant_answer`). A split gets one only where
    every finished cell of a seed was graded on the same problems with their references recorded (cells of
    an ablation.json written before references were kept have none)."""
    done = [c for c in cells if c["status"] == "done"]
    constant = {seed: {"id": f"{CONSTANT},seed={seed}", "overrides": [CONSTANT], "seed": seed, "status": "done",
                       "splits": {}} for seed in sorted({c["seed"] for c in done})}
    for split in SPLITS:
        graded = {}  # seed -> the one split record its cells share
        for seed in constant:
            mine = [c["splits"][split] for c in done if c["seed"] == seed and split in c["splits"]]
            if mine and all(m.get("references") for m in mine) and len({m["questions_sha1"] for m in mine}) == 1:
                graded[seed] = mine[0]
        if not graded:
            continue
        answer, outcomes = constant_answer({seed: g["references"] for seed, g in graded.items()})
        for seed, g in graded.items():
            correct = outcomes[seed]
            constant[seed]["splits"][split] = {"answer": answer, "correct": correct, "problems": len(correct),
                                               "questions_sha1": g["questions_sha1"],
                                               "metrics": {"accuracy": sum(correct) / len(correct)}}
    return cells + [c for c in constant.values() if "test" in c["splits"]]


def _point(cell: dict) -> str:
    return ", ".join(cell["overrides"]) or "(config)"


def _points(cells: list[dict]) -> dict[str, list[dict]]:
    """Grid point -> its cells (one per seed), in the order the cells were planned."""
    points: dict[str, list[dict]] = {}
    for cell in cells:
        points.setdefault(_point(cell), []).append(cell)
    return points


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per grid point over its finished seeds: pooled accuracy with its Wilson interval, the seeds'
    mean with its t interval, per split; means of the cost and latent-gain columns; mean wall time."""
    rows = []
    for point, group in _points(cells).items():
        done = [c for c in group if c["status"] == "done"]
        row: dict[str, Any] = {"point": point, "overrides": group[0]["overrides"], "seeds": len(group),
                               "seeds_done": len(done),
                               "errors": sorted({c["error"] for c in group if c["status"] == "failed"})}
        for split in SPLITS:
            have = [c["splits"][split] for c in done if split in c.get("splits", {})]
            outcomes = [x for s in have for x in s["correct"]]
            if not outcomes:
                continue
            mean, low, high = mean_t_interval([s["metrics"]["accuracy"] for s in have])
            row[split] = {"correct": sum(outcomes), "problems": len(outcomes),
                          "accuracy": sum(outcomes) / len(outcomes),
                          "wilson95": list(wilson_interval(sum(outcomes), len(outcomes))),
                          "seed_mean": mean, "seed_t95": None if low is None else [low, high]}
        for key in ("strict_match", "tokens_per_answer", "latents_per_answer", "forward_passes_per_answer"):
            row[key] = _mean([c["splits"]["test"]["metrics"][key] for c in done
                              if key in c["splits"]["test"]["metrics"]])
        for key in DIAGNOSTIC_KEYS[:3]:
            row[key] = _mean([c["diagnostics"][key] for c in done if key in c.get("diagnostics", {})])
        row["wall_seconds"] = _mean([c["wall_seconds"] for c in done if c.get("wall_seconds") is not None])
        rows.append(row)
    return rows


def paired_tests(cells: list[dict]) -> list[dict]:
    """Exact McNemar between every pair of grid points, per split: each point's per-problem outcomes of the
    seeds both finished, concatenated in seed order (seed s of one against seed s of the other, on the same
    problems); pairs whose problems differ (a grid over the data or eval.limit) are not tested."""
    points = _points(cells)
    tests = []
    for (a, cells_a), (b, cells_b) in itertools.combinations(points.items(), 2):
        for split in SPLITS:
            by_seed_b = {c["seed"]: c for c in cells_b if c["status"] == "done" and split in c["splits"]}
            pairs = [(c, by_seed_b[c["seed"]]) for c in cells_a
                     if c["status"] == "done" and split in c["splits"] and c["seed"] in by_seed_b]
            if not pairs:
                continue
            same = all(x["splits"][split]["questions_sha1"] == y["splits"][split]["questions_sha1"] for x, y in pairs)
            test = {"a": a, "b": b, "split": split, "seeds": [x["seed"] for x, _ in pairs]}
            if not same:
                tests.append({**test, "problems": None, "only_a": None, "only_b": None, "p": None,
                              "note": "different problems: not paired"})
                continue
            va = [v for x, _ in pairs for v in x["splits"][split]["correct"]]
            vb = [v for _, y in pairs for v in y["splits"][split]["correct"]]
            only_a, only_b = discordant_pairs(va, vb)
            tests.append({**test, "problems": len(va), "only_a": only_a, "only_b": only_b,
                          "accuracy_a": sum(va) / len(va), "accuracy_b": sum(vb) / len(vb),
                          "p": mcnemar_exact(only_a, only_b)})
    return tests


def phase_two_tests(cells: list[dict]) -> list[dict]:
    """Per grid point of `rlatent ablate --command train` and split: phase 2 against its own phase-1 start, on
    the same problems, pooled over seeds (exact McNemar); and, with the `constant answer` cells present, how
    many problems each phase answered with that answer and how many it got right with another
    (`constant_answer_split`): a phase 2 that gains only by saying the commonest answer more often shows as
    the first count rising and the second flat. Also the answer phase 2 gives most, said before and after,
    and the shuffle gain (mean over the seeds) after each phase: whether phase 2 kept the latents
    problem-specific."""
    answers = {split: c["splits"][split]["answer"] for c in cells if c["overrides"] == [CONSTANT]
               for split in c["splits"]}
    tests = []
    for point, group in _points(cells).items():
        for split in SPLITS:
            pairs = [(c["phase1_splits"][split], c["splits"][split]) for c in group
                     if c["status"] == "done" and split in c.get("phase1_splits", {}) and split in c["splits"]
                     and c["phase1_splits"][split]["questions_sha1"] == c["splits"][split]["questions_sha1"]]
            if not pairs:
                continue
            before, after = ([v for pair in pairs for v in pair[i]["correct"]] for i in (0, 1))
            only_before, only_after = discordant_pairs(before, after)
            test = {"point": point, "split": split, "seeds": len(pairs), "problems": len(before),
                    "accuracy_phase1": sum(before) / len(before), "accuracy_phase2": sum(after) / len(after),
                    "only_phase1": only_before, "only_phase2": only_after, "p": mcnemar_exact(only_before, only_after)}
            gains = [(c["diagnostics"]["latent_gain_shuffle"], c["phase2_diagnostics"]["latent_gain_shuffle"])
                     for c in group if c["status"] == "done"
                     and "latent_gain_shuffle" in c.get("diagnostics", {})
                     and "latent_gain_shuffle" in c.get("phase2_diagnostics", {})]
            if gains:
                test["shuffle_gain"] = [_mean([pair[i] for pair in gains]) for i in (0, 1)]
            if all(e.get("predictions") for pair in pairs for e in pair):
                said = [[p for pair in pairs for p in pair[i]["predictions"]] for i in (0, 1)]
                # what phase 2 says most: where a drift goes, which need not be the constant answer (the
                # reward pays the training prompts' commonest answer, not the evaluation's)
                top = Counter(p for p in said[1] if p is not None).most_common(1)
                if top:
                    test.update({"top_answer": top[0][0], "says_top": [x.count(top[0][0]) for x in said]})
                if (answer := answers.get(split)) is not None:
                    counts = [[constant_answer_split(answer, e["predictions"], e["correct"], e["references"])
                               for e in pair] for pair in pairs]
                    test.update({"constant_answer": answer,
                                 "says_constant": [sum(c[i][0] for c in counts) for i in (0, 1)],
                                 "right_other": [sum(c[i][1] for c in counts) for i in (0, 1)]})
            tests.append(test)
    return tests


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


def render_markdown(data: dict) -> str:
    """ablation.md from the content of ablation.json."""
    cells = data["cells"]
    with_constant = with_constant_answer(cells)
    rows = aggregate(with_constant)
    tests = paired_tests(with_constant)
    counts = {s: sum(1 for c in cells if c["status"] == s) for s in ("done", "failed", "not run")}
    grid = " ".join(f"--grid {g['key']}={','.join(g['values'])}" for g in data.get("grid", []))
    command = " ".join(["rlatent ablate", data.get("config", "CONFIG"), *data.get("overrides", []), grid,
                        f"--seeds {len(data.get('seeds', [0]))}", f"--command {data.get('command', 'train')}",
                        f"--name {data.get('name', '')}"])
    has_ood = any("ood" in r for r in rows)
    parts = [f"# Ablation {data.get('name', '')}\n", f"`{' '.join(command.split())}`\n",
             f"{len(cells)} cells: {counts['done']} done, {counts['failed']} failed"
             + (f", {counts['not run']} not run" if counts["not run"] else "") + "\n"]
    parts.append("Accuracy is pooled over the seeds that finished (correct/problems) with its Wilson 95 % "
                 "interval; *seeds* is the mean of the per-seed accuracies with its Student-t 95 % interval "
                 "(seed-to-seed spread; needs 2+ seeds). Cost columns are per answer on the in-distribution "
                 "split; latent gains (nats) are from each cell's last phase-1 diagnostics (~0: latents "
                 "ignored); all columns are means over seeds; wall s is per cell. *constant answer* gives "
                 "every problem the commonest reference: the score of ignoring the question.\n")
    columns = ["grid point", "seeds", "accuracy [Wilson 95 %]", "seeds [t 95 %]"]
    if has_ood:
        columns += ["OOD accuracy [Wilson 95 %]", "OOD seeds [t 95 %]"]
    columns += ["strict_match", "tokens/answer", "latents/answer", "forward passes/answer", "gain zeros",
                "gain noise", "gain shuffle", "wall s"]
    table = []
    for row in rows:
        line = {"grid point": row["point"], "seeds": f"{row['seeds_done']}/{row['seeds']}",
                "accuracy [Wilson 95 %]": _acc(row.get("test")), "seeds [t 95 %]": _seed_interval(row.get("test")),
                "OOD accuracy [Wilson 95 %]": _acc(row.get("ood")),
                "OOD seeds [t 95 %]": _seed_interval(row.get("ood")),
                "strict_match": _num(row["strict_match"]), "tokens/answer": _num(row["tokens_per_answer"]),
                "latents/answer": _num(row["latents_per_answer"]),
                "forward passes/answer": _num(row["forward_passes_per_answer"]),
                "gain zeros": _num(row["latent_gain_zeros"], 4), "gain noise": _num(row["latent_gain_noise"], 4),
                "gain shuffle": _num(row["latent_gain_shuffle"], 4), "wall s": _num(row["wall_seconds"], 3)}
        table.append(line)
    parts.append("## Results per grid point\n\n" + metrics_table(table, columns))
    for split, title in SPLITS.items():
        mine = [t for t in tests if t["split"] == split]
        if not mine:
            continue
        lines = [{"A": t["a"], "B": t["b"], "seeds": ",".join(map(str, t["seeds"])),
                  "paired problems": "" if t["problems"] is None else str(t["problems"]),
                  "accuracy A / B": "" if t["p"] is None else f"{t['accuracy_a']:.3f} / {t['accuracy_b']:.3f}",
                  "A right, B wrong": "" if t["only_a"] is None else str(t["only_a"]),
                  "A wrong, B right": "" if t["only_b"] is None else str(t["only_b"]),
                  "p (exact McNemar)": t.get("note") or f"{t['p']:.4g}"} for t in mine]
        parts.append(f"## Paired comparisons, {title}\n\nExact two-sided McNemar test on the problems one "
                     "grid point gets right and the other wrong, seed s against seed s, pooled over seeds.\n\n"
                     + metrics_table(lines, ["A", "B", "seeds", "paired problems", "accuracy A / B",
                                             "A right, B wrong", "A wrong, B right", "p (exact McNemar)"]))
    lifts = phase_two_tests(with_constant)
    if lifts:
        lines = [{"grid point": t["point"], "split": t["split"], "seeds": str(t["seeds"]),
                  "phase 1 -> 2": f"{t['accuracy_phase1']:.3f} -> {t['accuracy_phase2']:.3f}",
                  "phase 1 only": str(t["only_phase1"]), "phase 2 only": str(t["only_phase2"]),
                  "p (exact McNemar)": f"{t['p']:.4g}",
                  "says the constant answer": " -> ".join(map(str, t.get("says_constant", []))),
                  "phase 2's commonest answer": (f"{t['top_answer']!r}: " + " -> ".join(map(str, t["says_top"]))
                                                 if "top_answer" in t else ""),
                  "right, other answers": " -> ".join(map(str, t.get("right_other", []))),
                  "shuffle gain": " -> ".join(f"{g:+.4f}" for g in t.get("shuffle_gain", []))} for t in lifts]
        parts.append("## Phase 2 against phase 1\n\nEach cell's own phase-1 evaluation against its final one, same "
                     "problems, pooled over seeds. *Says the constant answer*: problems answered with the commonest "
                     "reference; *right, other answers*: problems right whose reference is another. A gain made "
                     "by saying the commonest answer more often raises the first and leaves the second flat. "
                     "*Phase 2's commonest answer*: how often each phase said it; a drift to one answer shows there "
                     "even when the reward paid another than the evaluation's commonest (the training prompts'). "
                     "*Shuffle gain*: nats the next-step loss rises when each problem gets another's latents, "
                     "after phase 1 and after phase 2 (mean over seeds): a drop says phase 2 wore away what the "
                     "latents carry.\n\n"
                     + metrics_table(lines, ["grid point", "split", "seeds", "phase 1 -> 2", "phase 1 only",
                                             "phase 2 only", "p (exact McNemar)", "says the constant answer",
                                             "right, other answers", "phase 2's commonest answer",
                                             "shuffle gain"]))
    cell_lines = [{"cell": c["id"], "status": c["status"],
                   "accuracy": _num(c["splits"]["test"]["metrics"]["accuracy"]) if c["status"] == "done" else "",
                   "OOD accuracy": (_num(c["splits"]["ood"]["metrics"]["accuracy"])
                                    if c["status"] == "done" and "ood" in c["splits"] else ""),
                   "wall s": _num(c.get("wall_seconds")), "error": c.get("error") or "",
                   "run directory": c.get("run_dir", "")} for c in cells]
    parts.append("## Cells\n\n" + metrics_table(cell_lines, ["cell", "status", "accuracy", "OOD accuracy", "wall s",
                                                             "run directory", "error"]))
    parts.append(f"![accuracy per grid point]({PNG_FILE})\n")
    return "\n".join(parts)


def render_plot(data: dict, out: Path) -> Path:
    """ablation.png: pooled accuracy per grid point with its Wilson 95 % interval, in and out of distribution;
    beside it each seed's accuracy (x) and, with 2+ seeds, the seeds' mean with its t 95 % interval (square)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = with_constant_answer(data["cells"])
    rows = aggregate(cells)
    points = _points(cells)
    width = max(6.0, 1.1 * len(rows) + 2)
    fig = Figure(figsize=(width, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    offsets = {"test": -0.12, "ood": 0.12} if any("ood" in r for r in rows) else {"test": 0.0}
    colors = {"test": "tab:blue", "ood": "tab:orange"}
    for split, offset in offsets.items():
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
            for cell in points[row["point"]]:
                if cell["status"] == "done" and split in cell["splits"]:
                    seed_x.append(i + offset + 0.05)
                    seed_y.append(cell["splits"][split]["metrics"]["accuracy"])
        if xs:
            ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=4, color=colors[split],
                        label=f"{SPLITS[split]} (pooled, Wilson 95 %)")
            ax.scatter(seed_x, seed_y, s=10, color=colors[split], alpha=0.5, marker="x")
        if t_x:
            ax.errorbar(t_x, t_y, yerr=[t_low, t_high], fmt="s", markersize=3, capsize=2, alpha=0.6,
                        color=colors[split], label=f"{SPLITS[split]} (seeds' mean, t 95 %)")
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
