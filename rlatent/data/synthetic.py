"""Synthetic GSM8K-format arithmetic word problems, with calculator marks.

For tests, CPU demos and controlled ablations: the answers have the exact
shape of GSM8K answers (`Tom gets 12 + 7 = <<12+7=19>>19 apples.`, a final
`#### 19`), so the same parsing and latent placement apply, but the difficulty
is a knob (number of steps, operand size, operators) and every result is a
small non-negative integer that a tiny model can learn.

Two knobs make a step hard to compute in one forward pass, so that latents
have work to do: `max_multiplier` (two-digit x one-digit products, `7 * 16`)
and `multi_op`, the chance that one step (one mark, one latent block) applies
two operations, `<<12*7+5=89>>`. Their defaults draw nothing extra from the
random stream, so problems stay byte-identical to those of earlier versions.

A third, `allow_zero=False`, keeps every running amount at 1 or more. With it
on (the default), about 6 % of the chains end at 0 (a subtraction takes all,
and products of 0 stay 0), which makes "0" by far the commonest answer: a
policy rewarded for right answers can gain by saying "0" without reading the
problem. Off, the answers have no such base rate.

A problem is a chain: a person starts with some amount, each step applies one
operator (or two, see `multi_op`) to the running amount, and the question asks for the final amount.
Templates vary the wording, the item (or dollars) and how the expression is
written (`12 + 7`, `12+7`, `3 x 4`) so that the task is not one fixed string.
Same `seed`, same problems: all randomness comes from one `random.Random`.
"""

from __future__ import annotations

import random

from rlatent.data.gsm8k import Problem

OPERATORS = "+-*/"
# Multipliers and divisors stay small by default so that answers stay a few digits long.
MAX_FACTOR = 5
# A running amount above this takes only one-digit multipliers (at most one multi-digit operand).
ONE_DIGIT = 9
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
# The answer line of a two-operation step.
MULTI_ANSWER_TEMPLATES = ["After that, {he} has {step}.", "{name} then has {step}."]
WRITTEN = {"+": ["+"], "-": ["-"], "*": ["*", "x"], "/": ["/"]}
APPLY = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}


def generate_problems(
    n: int,
    seed: int,
    min_steps: int = 2,
    max_steps: int = 3,
    max_operand: int = 20,
    operators: str = "+-*",
    max_multiplier: int = MAX_FACTOR,
    multi_op: float = 0.0,
    allow_zero: bool = True,
) -> list[Problem]:
    """`n` problems of `min_steps`..`max_steps` marked steps each.

    Starting amounts and added/subtracted amounts are 1..`max_operand`;
    multipliers and divisors are 2..min(`max_multiplier`, `max_operand`), and
    a running amount above 9 takes only one-digit multipliers, so no product
    multiplies two multi-digit numbers (`7 * 16` and `14 * 6`, never `14 * 16`).
    Subtraction never goes below zero and division is used only when exact.
    With probability `multi_op` a step applies two operations in one mark
    (`(12+7)*5`: parentheses where precedence needs them). `allow_zero=False`
    stops a subtraction one short of the whole amount, so no answer is 0.
    """
    if n < 0 or not 1 <= min_steps <= max_steps or max_operand < 2 or max_multiplier < 2:
        raise ValueError(
            "need n >= 0, 1 <= min_steps <= max_steps, max_operand >= 2 and max_multiplier >= 2; "
            f"got n={n}, min_steps={min_steps}, max_steps={max_steps}, max_operand={max_operand}, "
            f"max_multiplier={max_multiplier}"
        )
    if not 0.0 <= multi_op <= 1.0:
        raise ValueError(f"multi_op must be a probability in [0, 1], got {multi_op}")
    if not operators or set(operators) - set(OPERATORS):
        raise ValueError(f"operators must be a non-empty subset of {OPERATORS!r}, got {operators!r}")
    rng = random.Random(seed)
    problems, failures = [], 0
    while len(problems) < n:
        problem = _try_problem(rng, len(problems), min_steps, max_steps, operators,
                               (max_operand, max_multiplier, 0 if allow_zero else 1), multi_op)
        if problem is not None:
            problems.append(problem)
            failures = 0
        elif (failures := failures + 1) == MAX_TRIES:  # e.g. operators="/" with max_operand=2
            raise ValueError(
                f"no {min_steps}-step chain with operators {operators!r} and max_operand {max_operand} "
                f"found in {MAX_TRIES} tries"
            )
    return problems


def _try_problem(rng, index, min_steps, max_steps, operators, bounds, multi_op) -> Problem | None:
    """One problem, or None when the chain got stuck (say, only '/' allowed
    and a prime amount); the caller then draws again. `bounds` is
    (max_operand, max_multiplier). The draws of a one-operation step come in
    the order of earlier versions (op, operand, symbol, spacing, templates)."""
    max_operand = bounds[0]
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
        terms, r = [], x  # (operator, operand) pairs applied in order; r: the running result
        for _ in range(2 if multi_op and rng.random() < multi_op else 1):
            choices = [op for op in operators if _operands(op, r, bounds)]
            if not choices:
                return None
            op = rng.choice(choices)
            b = rng.choice(_operands(op, r, bounds))
            terms.append((op, b))
            r = APPLY[op](r, b)
        symbols = [rng.choice(WRITTEN[op]) for op, _ in terms]
        if "x" in symbols:  # one way of writing times per step
            symbols = ["x" if op == "*" else symbol for (op, _), symbol in zip(terms, symbols)]
        spaces = " " if "x" in symbols else rng.choice([" ", ""])  # "3x4" would read as a word
        written = _expression(x, terms, symbols, spaces)
        mark = f"<<{_expression(x, terms, [op for op, _ in terms], '')}={r}>>"
        step = f"{written} = ${mark}{r}" if item == MONEY else f"{written} = {mark}{r} {item}"
        for op, b in terms:
            question.append(rng.choice(QUESTION_TEMPLATES[op]).format(amount=amount(b), b=b, **words))
        templates = ANSWER_TEMPLATES[op] if len(terms) == 1 else MULTI_ANSWER_TEMPLATES
        answer.append(rng.choice(templates).format(step=step, **words))
        x = r
    if item == MONEY:
        question.append(f"How much money does {name} have now?")
    else:
        question.append(f"How many {item} does {name} have now?")
    answer.append(f"#### {x}")
    return Problem(" ".join(question), "\n".join(answer), str(x), f"synthetic:{index}")


def _expression(x: int, terms: list[tuple[str, int]], symbols: list[str], spaces: str) -> str:
    """`x` with `terms` applied left to right, written with `symbols`; an
    addition or subtraction followed by `*` or `/` gets parentheses, so the
    usual precedence gives the value the step computed."""
    text, additive = str(x), False
    for (op, b), symbol in zip(terms, symbols, strict=True):
        if additive and op in "*/":
            text = f"({text})"
        text, additive = f"{text}{spaces}{symbol}{spaces}{b}", op in "+-"
    return text


def _operands(op: str, x: int, bounds: tuple[int, int, int]) -> list[int]:
    """The operands `op` may take with running amount `x` (empty: op not usable)."""
    max_operand, max_multiplier, lowest = bounds
    if op == "+":
        return list(range(1, max_operand + 1))
    if op == "-":
        return list(range(1, min(x - lowest, max_operand) + 1))
    factors = range(2, min(max_multiplier, max_operand) + 1)
    if op == "*":
        return [b for b in factors if x <= ONE_DIGIT or b <= ONE_DIGIT]
    return [b for b in factors if x > 0 and x % b == 0]
