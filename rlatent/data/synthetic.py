"""Synthetic GSM8K-format arithmetic word problems, with calculator marks.

For tests, CPU demos and controlled ablations: the answers have the exact
shape of GSM8K answers (`Tom gets 12 + 7 = <<12+7=19>>19 apples.`, a final
`#### 19`), so the same parsing and latent placement apply, but the difficulty
is a knob (number of steps, operand size, operators) and every result is a
small non-negative integer that a tiny model can learn.

A problem is a chain: a person starts with some amount, each step applies one
operator to the running amount, and the question asks for the final amount.
Templates vary the wording, the item (or dollars) and how the expression is
written (`12 + 7`, `12+7`, `3 x 4`) so that the task is not one fixed string.
Same `seed`, same problems: all randomness comes from one `random.Random`.
"""

from __future__ import annotations

import random

from rlatent.data.gsm8k import Problem

OPERATORS = "+-*/"
# Multipliers and divisors stay small so that answers stay a few digits long.
MAX_FACTOR = 5
# Draws in a row that may get stuck before the settings are declared impossible.
MAX_TRIES = 1000

PEOPLE = [
    ("Tom", "he", "him", "his"),
    ("Ann", "she", "her", "her"),
    ("Raj", "he", "him", "his"),
    ("Mia", "she", "her", "her"),
    ("Leo", "he", "him", "his"),
    ("Zoe", "she", "her", "her"),
    ("Sam", "he", "him", "his"),
    ("Ivy", "she", "her", "her"),
]
ITEMS = ["apples", "marbles", "stickers", "cookies", "books", "pencils", "shells", "cards"]
MONEY = "dollars"

# Question sentence and answer line per operator. `{amount}` is the operand
# with its unit ("7 apples", "$7"); `{step}` is the written expression, the
# mark and the result ("12 + 7 = <<12+7=19>>19 apples").
QUESTION_TEMPLATES = {
    "+": ["{He} gets {amount}.", "{friend} gives {him} {amount}.", "{He} finds {amount}."],
    "-": ["{He} gives {amount} to {friend}.", "{He} loses {amount}.", "{He} gives away {amount}."],
    "*": ["Then what {he} has grows to {b} times as much.", "Then {he} ends up with {b} times as much."],
    "/": ["Then {he} splits {it} into {b} equal parts and keeps one part."],
}
ANSWER_TEMPLATES = {
    "+": ["{He} has {step} now.", "After that, {he} has {step}.", "{name} has {step}."],
    "-": ["{He} has {step} left.", "After that, {he} has {step}."],
    "*": ["{He} then has {step}.", "{name} ends up with {step}."],
    "/": ["{He} keeps {step}.", "One part is {step}."],
}
WRITTEN = {"+": ["+"], "-": ["-"], "*": ["*", "x"], "/": ["/"]}


def generate_problems(
    n: int,
    seed: int,
    min_steps: int = 2,
    max_steps: int = 3,
    max_operand: int = 20,
    operators: str = "+-*",
) -> list[Problem]:
    """`n` problems of `min_steps`..`max_steps` marked steps each.

    Starting amounts and added/subtracted amounts are 1..`max_operand`;
    multipliers and divisors are 2..min(`MAX_FACTOR`, `max_operand`).
    Subtraction never goes below zero and division is used only when exact.
    """
    if n < 0 or not 1 <= min_steps <= max_steps or max_operand < 2:
        raise ValueError(
            "need n >= 0, 1 <= min_steps <= max_steps and max_operand >= 2; "
            f"got n={n}, min_steps={min_steps}, max_steps={max_steps}, max_operand={max_operand}"
        )
    if not operators or set(operators) - set(OPERATORS):
        raise ValueError(f"operators must be a non-empty subset of {OPERATORS!r}, got {operators!r}")
    rng = random.Random(seed)
    problems, failures = [], 0
    while len(problems) < n:
        problem = _try_problem(rng, len(problems), min_steps, max_steps, max_operand, operators)
        if problem is not None:
            problems.append(problem)
            failures = 0
        elif (failures := failures + 1) == MAX_TRIES:  # e.g. operators="/" with max_operand=2
            raise ValueError(
                f"no {min_steps}-step chain with operators {operators!r} and max_operand {max_operand} "
                f"found in {MAX_TRIES} tries"
            )
    return problems


def _try_problem(rng, index, min_steps, max_steps, max_operand, operators) -> Problem | None:
    """One problem, or None when the chain got stuck (say, only '/' allowed
    and a prime amount); the caller then draws again."""
    person, friend = rng.sample(PEOPLE, 2)
    name, he, him, his = person
    item = rng.choice([*ITEMS, MONEY])
    words = {
        "name": name,
        "He": he.capitalize(),
        "he": he,
        "him": him,
        "his": his,
        "friend": friend[0],
        "it": "it" if item == MONEY else "them",
    }

    def amount(value: int) -> str:
        return f"${value}" if item == MONEY else f"{value} {item}"

    x = rng.randint(1, max_operand)
    question = [f"{name} has {amount(x)}."]
    answer = []
    for _ in range(rng.randint(min_steps, max_steps)):
        choices = [op for op in operators if _operands(op, x, max_operand)]
        if not choices:
            return None
        op = rng.choice(choices)
        b = rng.choice(_operands(op, x, max_operand))
        r = {"+": x + b, "-": x - b, "*": x * b, "/": x // b}[op]
        symbol = rng.choice(WRITTEN[op])
        spaces = " " if symbol == "x" else rng.choice([" ", ""])  # "3x4" would read as a word
        written = f"{x}{spaces}{symbol}{spaces}{b}"
        mark = f"<<{x}{op}{b}={r}>>"
        step = f"{written} = ${mark}{r}" if item == MONEY else f"{written} = {mark}{r} {item}"
        question.append(rng.choice(QUESTION_TEMPLATES[op]).format(amount=amount(b), b=b, **words))
        answer.append(rng.choice(ANSWER_TEMPLATES[op]).format(step=step, **words))
        x = r
    if item == MONEY:
        question.append(f"How much money does {name} have now?")
    else:
        question.append(f"How many {item} does {name} have now?")
    answer.append(f"#### {x}")
    return Problem(" ".join(question), "\n".join(answer), str(x), f"synthetic:{index}")


def _operands(op: str, x: int, max_operand: int) -> list[int]:
    """The operands `op` may take with running amount `x` (empty: op not usable)."""
    if op == "+":
        return list(range(1, max_operand + 1))
    if op == "-":
        return list(range(1, min(x, max_operand) + 1))
    factors = range(2, min(MAX_FACTOR, max_operand) + 1)
    if op == "*":
        return list(factors)
    return [b for b in factors if x > 0 and x % b == 0]
