"""Which held-out problems ask for arithmetic the training problems already did.

A seeded split draws its held-out problems from another stream than its training ones, but the arithmetic
of a small task repeats: on the one-step synthetic task 62 of the 300 test problems compute exactly the
`<<expression=result>>` of some training problem. A policy can answer those by recall. Accuracy on the
problems with seen and with unseen arithmetic, reported apart, says whether a gain is recall or a computation
that carries over to new numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlatent.data.gsm8k import Problem
from rlatent.data.marks import parse_marks


def mark_arithmetic(problem: Problem) -> list[str]:
    """The problem's calculator marks as `expression=result`, spaces dropped (`<<3 + 4=7>>` -> `3+4=7`)."""
    return [f"{m.expression}={m.result}".replace(" ", "") for m in parse_marks(problem.answer, problem.source)]


def seen_arithmetic(train: Sequence[Problem], problems: Sequence[Problem]) -> list[bool]:
    """Per problem of `problems`: True when every one of its marks is a mark of some training problem.

    Every mark, because a problem with one new step cannot be answered by recall alone; a problem without
    marks has no arithmetic to have seen (False). The match is exact text: `4+3=7` is not `3+4=7`, since the
    model writes (or stands for) the expression as given.
    """
    known = {arithmetic for p in train for arithmetic in mark_arithmetic(p)}
    flags = []
    for problem in problems:
        marks = mark_arithmetic(problem)
        flags.append(bool(marks) and all(m in known for m in marks))
    return flags
