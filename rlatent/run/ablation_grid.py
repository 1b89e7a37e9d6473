"""The grid of `rlatent ablate`: `--point NAME key=v ...` and `--grid key=v1,v2` arguments parsed, and the cells
(points x grid values x seeds) with readable, filesystem-safe directory names.

A `--grid` dimension varies one key; a `--point` is a named row that sets several at once (the text-CoT row of
a control ladder is `latent.mode=none latent.placement=insert`), which no product of single keys can give
without also making rows nobody wants."""

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


def _check_key(option: str, key: str) -> None:
    """Keys the ablation sets itself are refused in `--grid` and `--point`."""
    if key == "seed":
        raise ConfigError(f"{option} seed=...: use --seeds N (seed, seed+1, ... for every grid point)")
    if key == "output" or key.startswith("output."):
        raise ConfigError(f"{option} {key}: the ablation sets each cell's output directory itself")


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
        _check_key("--grid", key)
        if any(key == k for k, _ in grid):
            raise ConfigError(f"--grid {key}: given twice; put every value in one --grid {key}=v1,v2")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {item!r}: a value is repeated")
        grid.append((key, values))
    return grid


def parse_points(items: list[list[str]], grid: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """`--point NAME key=v ...` arguments -> [(name, overrides)], in the order given. A name is a word of its
    own (no `=`), given once; a key may not be a `--grid` key too (which value would the cell take?)."""
    points: list[tuple[str, list[str]]] = []
    for name, *overrides in items:
        if "=" in name or not name.strip():
            raise ConfigError(f"--point {name!r}: expected --point NAME key.sub=value ... (a name first)")
        if any(name == n for n, _ in points):
            raise ConfigError(f"--point {name}: given twice")
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--point {name} {override!r}: expected key.sub=value")
            _check_key(f"--point {name}", key.strip())
            if any(key.strip() == k for k, _ in grid):
                raise ConfigError(f"--point {name} sets {key.strip()}, which --grid varies: set it in one place")
        points.append((name, overrides))
    return points


def cell_id(parts: list[str], seed: int) -> str:
    """A readable, filesystem-safe directory name from a cell's point name and grid `key=value`s and its seed:
    `latent.mode=pause,latent.k=1,seed=0`, `cot,seed=1`."""
    text = ",".join([*parts, f"seed={seed}"])
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
    point: tuple[str, list[str]] | None = None  # (name, overrides) of its --point

    @property
    def overrides(self) -> list[str]:
        """The cell's own overrides: its point's, then its grid values."""
        return [*(self.point[1] if self.point else []), *(f"{k}={v}" for k, v in self.grid)]

    @property
    def parts(self) -> list[str]:
        """What sets the cell apart, as `--phase2` names it: its point's name and its grid `key=value`s."""
        return [*([self.point[0]] if self.point else []), *(f"{k}={v}" for k, v in self.grid)]

    @property
    def label(self) -> str:
        return " ".join([*self.parts, f"seed={self.seed}"])

    def progress(self, text: str) -> None:
        print(f"[{self.index}/{self.total}] {self.label}: {text}", flush=True)


def plan_cells(grid: list[tuple[str, list[str]]], seeds: list[int], cells_dir: Path,
               points: list[tuple[str, list[str]]] = ()) -> list[Cell]:
    """Cells = the product of the points (or the config alone), the grid's values and the seeds, in that order
    from outermost to innermost."""
    values = list(itertools.product(*[[(key, v) for v in values] for key, values in grid]))
    combos = list(itertools.product(points or [None], values, seeds))
    cells, seen = [], set()
    for point, value, seed in combos:
        cell = Cell(len(cells) + 1, len(combos), list(value), seed, "", Path(), point)
        name = cell_id(cell.parts, seed)
        if name in seen:  # two values that differ only in unsafe characters
            name = f"{name}-{hashlib.sha1(repr((point, value, seed)).encode()).hexdigest()[:8]}"
        seen.add(name)
        cell.id, cell.dir = name, cells_dir / name
        cells.append(cell)
    return cells
