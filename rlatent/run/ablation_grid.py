"""The grid of `rlatent ablate`: `--grid key=v1,v2` arguments parsed, and the cells (grid points x seeds) with
readable, filesystem-safe directory names."""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from rlatent.errors import ConfigError


def split_values(text: str) -> list[str]:
    """`v1,v2` -> ["v1", "v2"]; commas inside [], {} or quotes stay, so `[1,2],[3]` is two YAML lists."""
    values, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`--grid key=v1,v2` arguments -> [(key, [raw values])], in the order given; values stay raw text (the
    config parses them as YAML, as any override)."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = split_values(raw) if sep else []
        if not key or not values or any(v == "" for v in values):
            raise ConfigError(f"--grid {item!r}: expected key.sub=v1,v2 (non-empty values)")
        if key == "seed":
            raise ConfigError("--grid seed=...: use --seeds N (seed, seed+1, ... for every grid point)")
        if key == "output" or key.startswith("output."):
            raise ConfigError(f"--grid {key}: the ablation sets each cell's output directory itself")
        if any(key == k for k, _ in grid):
            raise ConfigError(f"--grid {key}: given twice; put every value in one --grid {key}=v1,v2")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {item!r}: a value is repeated")
        grid.append((key, values))
    return grid


def cell_id(grid: list[tuple[str, str]], seed: int) -> str:
    """A readable, filesystem-safe directory name: `latent.mode=pause,latent.k=1,seed=0`."""
    text = ",".join([*(f"{k}={v}" for k, v in grid), f"seed={seed}"])
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    safe = "_" + safe[1:] if safe.startswith(".") else safe
    if len(safe) > 120:  # a file name's limit is 255 bytes
        safe = safe[:109] + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]
    return safe


@dataclass
class Cell:
    index: int                    # 1-based, for the progress line
    total: int
    grid: list[tuple[str, str]]   # (key, raw value) per grid dimension
    seed: int
    id: str
    dir: Path

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.grid]

    @property
    def label(self) -> str:
        return " ".join([*self.overrides, f"seed={self.seed}"])

    def progress(self, text: str) -> None:
        print(f"[{self.index}/{self.total}] {self.label}: {text}", flush=True)


def plan_cells(grid: list[tuple[str, list[str]]], seeds: list[int], cells_dir: Path) -> list[Cell]:
    """Cells = the cartesian product of the grid's values x seeds, grid order outermost, seeds innermost."""
    points = list(itertools.product(*[[(key, v) for v in values] for key, values in grid]))
    total = len(points) * len(seeds)
    cells, seen = [], set()
    for point, seed in itertools.product(points, seeds):
        name = cell_id(list(point), seed)
        if name in seen:  # two values that differ only in unsafe characters
            name = f"{name}-{hashlib.sha1(repr((point, seed)).encode()).hexdigest()[:8]}"
        seen.add(name)
        cells.append(Cell(len(cells) + 1, total, list(point), seed, name, cells_dir / name))
    return cells
