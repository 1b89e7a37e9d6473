"""Problems: GSM8K-format question/answer pairs, validated on load.

Every row is checked once, here, so that the rest of rlatent can trust a
`Problem`: both fields are strings, the answer has a `####` final answer that
parses as a number, and every calculator mark parses. A bad row is reported
with its file and 1-based line (or hub split and 0-based row index, the index
`dataset[i]` takes), or skipped and counted when `on_bad_line="skip"`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rlatent.errors import DataError
from rlatent.data.marks import extract_final_answer, parse_marks

ON_BAD_LINE = ("raise", "skip")
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects a JSONL row may have (a GSM8K row has 1)."""
SHOWN_SKIPS = 3
"""Skipped rows whose reasons the console line shows (the rest are counted)."""
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


@dataclass(frozen=True)
class Problem:
    """One problem. `answer` is the full GSM8K answer (marks and `#### n`);
    `final_answer` is its canonical number string; `source` says where it
    came from ("train.jsonl:17", "openai/gsm8k:train:16", "synthetic:3")."""

    question: str
    answer: str
    final_answer: str
    source: str


def problem_from_row(row: object, source: str) -> Problem:
    """A validated `Problem` from one decoded row, or a `DataError` that
    starts with `source`."""
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(row).__name__}")
    for key in ("question", "answer"):
        if key not in row:
            raise DataError(f"{source}: missing key '{key}'")
        if not isinstance(row[key], str):
            raise DataError(f"{source}: '{key}' must be a string, got {type(row[key]).__name__}")
    question, answer = row["question"], row["answer"]
    if "####" not in answer:
        raise DataError(f"{source}: answer has no '####' final answer")
    final = extract_final_answer(answer)
    if final is None:
        raise DataError(f"{source}: no number after the last '####' in the answer")
    try:
        parse_marks(answer, where=source)
    except RecursionError:  # the parser's own depth limit should come first; never a traceback
        raise DataError(f"{source}: calculator mark nested too deeply to parse") from None
    return Problem(question, answer, final, source)


def json_too_deep(text: str, limit: int | None = None) -> bool:
    """Whether JSON `text` nests arrays/objects deeper than `limit` (default `MAX_JSON_DEPTH`): json's
    decoder recurses once per level, so hostile nesting is refused here, by depth, before it runs.
    Brackets inside strings do not count; a line with few brackets is passed without scanning."""
    limit = MAX_JSON_DEPTH if limit is None else limit
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for bracket in _BRACKET.findall(_JSON_STRING.sub('""', text)):
        depth += 1 if bracket in "[{" else -1
        if depth > limit:
            return True
    return False


def load_jsonl_problems(
    path: str | Path, on_bad_line: str = "raise", limit: int | None = None
) -> tuple[list[Problem], int]:
    """Problems from a JSONL file of `{"question", "answer"}` objects, and the
    number of bad lines skipped. Blank lines are ignored; `limit` stops after
    that many problems."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")

    def rows() -> Iterable[tuple[object, str]]:
        with path.open("rb") as f:  # decoded line by line, so a bad byte is named by its line
            for number, raw in enumerate(f, start=1):
                source = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    yield DataError(f"{source}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                    f"{error.start + 1})"), source
                    continue
                if not line.strip():
                    continue
                if json_too_deep(line):
                    yield DataError(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels"), source
                    continue
                try:
                    yield json.loads(line.rstrip()), source
                except json.JSONDecodeError as error:
                    yield DataError(f"{source}: malformed JSON ({error.msg} at column {error.colno})"), source

    return _collect(rows(), on_bad_line, limit)


def load_gsm8k(
    split: str,
    path: str | Path | None = None,
    hub_name: str = "openai/gsm8k",
    hub_config: str = "main",
    on_bad_line: str = "raise",
    limit: int | None = None,
) -> tuple[list[Problem], int]:
    """GSM8K's `split` ("train" or "test") and the number of rows skipped.

    `path` may be a directory holding `{split}.jsonl`, a JSONL file, or None
    to load `hub_name`/`hub_config` through `datasets` (which may download).
    """
    if path is not None:
        path = Path(path)
        if path.is_dir():
            path = path / f"{split}.jsonl"
        return load_jsonl_problems(path, on_bad_line=on_bad_line, limit=limit)

    import datasets  # only this path needs it, and it is slow to import

    dataset = datasets.load_dataset(hub_name, hub_config, split=split)
    rows = ((row, f"{hub_name}:{split}:{i}") for i, row in enumerate(dataset))
    return _collect(rows, on_bad_line, limit)


def _collect(rows: Iterable[tuple[object, str]], on_bad_line: str, limit: int | None) -> tuple[list[Problem], int]:
    """Validate rows (a decoding error arrives as a `DataError` in place of
    the row) into problems, raising or skipping bad ones. Skipped rows are
    also told on the console, the first `SHOWN_SKIPS` with their reason: a
    count in metrics.jsonl alone would go unseen."""
    if on_bad_line not in ON_BAD_LINE:
        raise ValueError(f"on_bad_line must be one of {ON_BAD_LINE}, got {on_bad_line!r}")
    problems, skipped, reasons = [], 0, []
    for row, source in rows:
        if limit is not None and len(problems) >= limit:
            break
        try:
            if isinstance(row, DataError):
                raise row
            problems.append(problem_from_row(row, source))
        except DataError as error:
            if on_bad_line == "raise":
                raise
            skipped += 1
            if len(reasons) < SHOWN_SKIPS:
                reasons.append(str(error))
    if skipped:
        more = f"; and {skipped - len(reasons)} more" if skipped > len(reasons) else ""
        print(f"data.on_bad_line=skip: skipped {skipped} malformed row{'s' if skipped > 1 else ''}: "
              f"{'; '.join(reasons)}{more}")
    return problems, skipped
