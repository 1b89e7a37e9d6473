"""GSM8K calculator marks and final answers.

GSM8K answers carry calculator marks, `48/2 = <<48/2=24>>24`: the expression
the annotator typed into a calculator and its result. Each mark is where a
hard, consequential step happens, so that is where latent blocks go
(`rlatent.data.examples`). Final answers follow the last `####`.

Arithmetic is read by a small recursive-descent parser into exact `Fraction`s;
text from a data file is never passed to `eval`. Answers are compared as
numbers, never as strings ("1,000" equals "1000.0").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from rlatent.errors import DataError

# A number as written in GSM8K text: thousands commas only in groups of three
# (so "1,2" is two numbers), an optional decimal part.
_NUMBER = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_TOKEN = re.compile(rf"\s*(?:(?P<number>{_NUMBER})|(?P<op>//|[-+*/()%]))")

# A signed number in free text (rules in `extract_final_answer`). A minus sign
# ("-" or U+2212) is glued to the number ("-3", "= -3", "(-3)", "$-3", "-$3") and
# not itself glued to a word, a number or a bracket before it ("10-3", "x-3");
# "10 - 3" is a subtraction, not -3. A number glued to a letter or a decimal point
# before it ("CO2", "x2", "v1.2") is part of a name, not a number.
_MINUS = r"\-\u2212"  # for a character class
_ANSWER_NUMBER = re.compile(
    rf"(?:(?<![\w).\]{_MINUS}])(?P<sign>[{_MINUS}]))?(?:\$[ \t]?)?"
    rf"(?:(?<![\w).\]])(?P<sign2>[{_MINUS}]))?(?<![\w.])(?P<digits>{_NUMBER})",
    re.ASCII,  # letters are ASCII letters: a number after CJK text is a number
)
# An operand of arithmetic, not a stated answer: right after a binary operator with
# an operand on its left (or a spaced minus opening the text: "#### - 3"), as in
# "10 - 3" or "pages 10-20", or right before one with an operand on its right
# ("18/5", "10 - 3", "3 x 4"). Markdown bold ("**72**") is no operator.
_OPERATOR = r"+*/\u00d7\u00f7^\-\u2212"  # for a character class: + * / × ÷ ^ and the minus signs
_AFTER_OPERATOR = re.compile(rf"(?:\A|[\d)%])[ \t]*[{_OPERATOR}][ \t]*\$?[ \t]*\Z", re.ASCII)
_BEFORE_OPERATOR = re.compile(rf"[ \t]*%?[ \t]*[{_OPERATOR}xX][ \t]*\$?[ \t]*[\d(.]", re.ASCII)
YES_NO = re.compile(r"(yes|no)[.!]?", re.IGNORECASE)
"""A `#### Yes` / `#### No` answer line: the graph-search task's answers (`rlatent.data.graphs`)."""
_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


@dataclass(frozen=True)
class Mark:
    """One `<<expression=result>>` mark.

    `start`/`end` are character offsets of the whole mark, brackets included.
    `value` is the result *as written*: when the annotator's expression
    disagrees with it (a few GSM8K marks do), the written result is what the
    rest of the answer uses, so it is what the model must produce.
    """

    start: int
    end: int
    expression: str
    result: str
    value: Fraction


@dataclass(frozen=True)
class Operation:
    """One binary operation of an expression, `left op right = value`, as `operations` lists them."""

    left: Fraction
    op: str
    right: Fraction
    value: Fraction


MAX_DEPTH = 64
"""Deepest nesting of parentheses and signs a mark may hold: hostile input is refused by the parser with
one line, never by the interpreter's recursion limit."""


class _Parser:
    """Recursive descent over `expr := term (('+'|'-') term)*`,
    `term := unary (('*'|'/'|'//') unary)*`, `unary := ('-'|'+') unary | atom '%'*`,
    `atom := number | '(' expr ')'`."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = self._tokenize(text)
        self.pos = 0
        self.depth = 0
        self.operations: list[Operation] = []  # every binary operation, in the order it is evaluated

    def _nested(self, parse):
        """`parse()` one level deeper, refused beyond `MAX_DEPTH`."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise DataError(f"expression nested deeper than {MAX_DEPTH} levels")
        try:
            return parse()
        finally:
            self.depth -= 1

    @staticmethod
    def _tokenize(text: str) -> list[str]:
        tokens, i = [], 0
        while i < len(text):
            if text[i:].strip() == "":
                break
            match = _TOKEN.match(text, i)
            if match is None:
                raise DataError(f"unexpected {text[i:].strip()[0]!r} in {text!r}")
            tokens.append(match.group("number") or match.group("op"))
            i = match.end()
        return tokens

    def parse(self) -> Fraction:
        if not self.tokens:
            raise DataError(f"empty expression {self.text!r}")
        value = self._expr()
        if self.pos != len(self.tokens):
            raise DataError(f"unexpected {self.tokens[self.pos]!r} in {self.text!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise DataError(f"expression {self.text!r} ends too early")
        self.pos += 1
        return token

    def _expr(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            op = self._take()
            right = self._term()
            value = self._record(value, op, right, value + right if op == "+" else value - right)
        return value

    def _record(self, left: Fraction, op: str, right: Fraction, value: Fraction) -> Fraction:
        self.operations.append(Operation(left, op, right, value))
        return value

    def _term(self) -> Fraction:
        value = self._unary()
        while self._peek() in ("*", "/", "//"):
            op = self._take()
            right = self._unary()
            if op != "*" and right == 0:
                raise DataError(f"division by zero in {self.text!r}")
            result = value * right if op == "*" else value / right if op == "/" else Fraction(value // right)
            value = self._record(value, op, right, result)
        return value

    def _unary(self) -> Fraction:
        if self._peek() in ("-", "+"):
            sign = self._take()
            value = self._nested(self._unary)
            return -value if sign == "-" else value
        value = self._atom()
        while self._peek() == "%":
            self._take()
            value /= 100
        return value

    def _atom(self) -> Fraction:
        token = self._take()
        if token == "(":
            value = self._nested(self._expr)
            if self._take() != ")":
                raise DataError(f"unbalanced parentheses in {self.text!r}")
            return value
        if token[0].isdigit() or token[0] == ".":
            return Fraction(token.replace(",", ""))
        raise DataError(f"unexpected {token!r} in {self.text!r}")


def evaluate_expression(text: str) -> Fraction:
    """The exact value of an arithmetic expression: numbers (decimals,
    thousands commas), unary +/-, `+ - * /`, parentheses, `%` as a percent
    suffix, and `//` (floor division: the annotators' calculator was Python,
    and two GSM8K train marks use it). Anything else, or a division by zero, raises `DataError`."""
    return _Parser(text).parse()


def operations(expression: str) -> list[Operation]:
    """The binary operations of `expression` in the order they are evaluated (precedence and parentheses
    respected): "12*7+5" -> 12 * 7 = 84, then 84 + 5 = 89. Unary signs and `%` fold into their operand.
    A stepwise teacher (`rlatent.data.examples.split_marks`) writes a mark as these steps."""
    parser = _Parser(expression)
    parser.parse()
    return parser.operations


def parse_marks(text: str, where: str = "") -> list[Mark]:
    """Every `<<expression=result>>` mark in `text`, in order.

    A mark that does not parse raises `DataError` whose message starts with
    `where` (e.g. "train.jsonl:17"). A mark whose expression disagrees with
    its result is kept, with `value` taken from the result (see `Mark`).
    """
    prefix = f"{where}: " if where else ""
    marks, i = [], 0
    while True:
        opening, closing = text.find("<<", i), text.find(">>", i)
        if opening < 0 and closing < 0:
            return marks
        if opening < 0 or 0 <= closing < opening:
            snippet = text[max(0, closing - 30) : closing + 2]
            raise DataError(f"{prefix}calculator mark '...{snippet}' does not parse: '>>' without '<<'")
        if closing < 0 or "<<" in text[opening + 2 : closing]:
            snippet = text[opening : opening + 30].split("\n")[0]
            raise DataError(f"{prefix}calculator mark '{snippet}...' does not parse: '<<' without '>>'")
        end = closing + 2
        body = text[opening + 2 : closing]
        try:
            if body.count("=") != 1:
                raise DataError(f"expected exactly one '=', found {body.count('=')}")
            expression, result = body.split("=")
            evaluate_expression(expression)
            value = evaluate_expression(result)
        except DataError as error:
            raise DataError(f"{prefix}calculator mark '<<{body}>>' does not parse: {error}") from None
        marks.append(Mark(opening, end, expression, result, value))
        i = end


def strip_marks(text: str) -> str:
    """`text` with every mark removed: "48/2 = <<48/2=24>>24" -> "48/2 = 24"."""
    return re.sub(r"<<[^<>]*>>", "", text)


def parse_number(text: str) -> Fraction | None:
    """The value of one number as written in an answer ("$1,000.", "-3.50", "-$5"), or None when
    `text` is not a single number ("- 3", "18/5", "CO2", "seventy-two" are not)."""
    match = _ANSWER_NUMBER.fullmatch(text.strip().rstrip("."))
    return _value(match) if match else None


def canonical_number(value: Fraction) -> str:
    """The shortest decimal form: 7 -> "7", 1/2 -> "0.5", -7/2 -> "-3.5".
    Values that do not end as decimals (1/3) are written as a fraction."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    decimal = Decimal(value.numerator) / Decimal(value.denominator)
    return format(decimal.normalize(), "f")


def extract_final_answer(text: str, finished: bool = True) -> str | None:
    """The final answer of `text` as a canonical number string, or None (rlatent's numeric match).

    1. With a `####`, the line after the last one decides (leading blank lines skipped): Yes or No
       (the graph-search task's answers, "#### yes." -> "Yes"), else its first
       number ("#### 72 clips" -> 72, "#### $1,000.00" -> 1000, "#### 18." -> 18, "#### 25%" -> 25,
       "#### -3" -> -3), or None when there is none or it is an operand of arithmetic: "#### 18/5"
       (GSM8K references, like lm-eval's answer pattern, are decimal numbers, so a fraction is no
       answer), "#### 10 - 3", "#### - 3".
    2. Else the last `\\boxed{...}` when it holds exactly one number ("\\boxed{\\$1{,}000}" -> 1000).
    3. Else, only when the completion `finished` (ended by EOS, not cut at its token cap), the last
       number in the text, None when that is an operand ("so 10 - 3" -> None, "she ate 18/5" ->
       None). A completion cut at its cap has no final answer but a complete `####` line (one a
       line break ends): a rambling text's last number is not an answer, nor is "#### 12" cut from
       "#### 125".

    Numbers: thousands commas ("1,000"), decimals ("0.50" = 0.5), "$" and "%" are ignored; a minus
    is a sign only when glued to the number ("= -3" -> -3, "10 - 3" and "10-3" end in 3); a
    number glued to a letter before it is no number ("CO2"). References (GSM8K answers) always
    finish; `rewards.gsm8k.gsm8k_correct` passes `finished=not truncated`.
    """
    _, sep, tail = text.rpartition("####")
    if sep:
        rest = tail.lstrip()
        line, newline, _ = rest.partition("\n")
        if not finished and not newline:
            return None
        if word := YES_NO.fullmatch(line.strip()):
            return word.group(1).capitalize()
        match = _ANSWER_NUMBER.search(line)
        if match is None or _is_operand(line, match):
            return None
        return canonical_number(_value(match))
    boxed = _BOXED.findall(text)
    if boxed:
        content = boxed[-1].replace("{,}", ",").replace("\\$", "$").replace("\\%", "").replace("%", "")
        value = parse_number(re.sub(r"\\[,!; ]", "", content))
        return canonical_number(value) if value is not None else None
    if not finished:
        return None
    matches = list(_ANSWER_NUMBER.finditer(text))
    if not matches or _is_operand(text, matches[-1]):
        return None
    return canonical_number(_value(matches[-1]))


def first_number(text: str) -> str | None:
    """The first number stated in free text, as a canonical number string ("$1,250" -> "1250", "-3" -> "-3";
    "CO2" states none), read by `extract_final_answer`'s rules; None when there is none."""
    match = _ANSWER_NUMBER.search(text)
    return canonical_number(_value(match)) if match else None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether two answers are the same number ("1000" and "1,000.0" are), or the same Yes/No."""
    if predicted is None:
        return False
    if reference in ("Yes", "No"):
        return predicted.strip().rstrip(".").capitalize() == reference
    a, b = parse_number(predicted), parse_number(reference)
    return a is not None and b is not None and a == b


def _is_operand(text: str, match: re.Match) -> bool:
    """Whether the number `match` is an operand of arithmetic in `text` (a binary operator before or after)."""
    return bool(_AFTER_OPERATOR.search(text, 0, match.start()) or _BEFORE_OPERATOR.match(text, match.end()))


def _value(match: re.Match) -> Fraction:
    value = Fraction(match.group("digits").replace(",", ""))
    return -value if match.group("sign") or match.group("sign2") else value
