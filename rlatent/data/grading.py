"""GSM8K grading: rlatent's numeric match beside lm-evaluation-harness's two filters.

`numeric_match` is rlatent's own grade (`rlatent.data.marks.extract_final_answer`:
the `#### N` line, compared as numbers). Published GSM8K tables use
lm-evaluation-harness's task `gsm8k` (lm_eval/tasks/gsm8k/gsm8k.yaml, version 3.0),
which reports `exact_match` under two filters, reproduced here exactly:

- `strict-match`: regex `#### (\\-?[0-9\\.\\,]+)`, the first match (`group_select: 0`);
- `flexible-extract`: regex `(-?[$0-9.,]{2,})|(-?[0-9]+)`, the last match
  (`group_select: -1`), the first non-empty group of it;

each stripped, "[invalid]" when nothing matches (lm_eval/filters/extraction.py
`RegexFilter`). Prediction and reference are then compared as strings after the
metric's `regexes_to_ignore` (`,`, `\\$`, `(?s).*#### `, `\\.$`, applied in that
order to both), `ignore_case: true`, `ignore_punctuation: false`
(lm_eval/api/metrics.py `exact_match_hf_evaluate`). So "0.50" is not "0.5" and
"#### 18/5" reads "18" there: these are the community's numbers, quirks included.

lm-eval's reference is the whole GSM8K answer; the regexes reduce it to the text
after its `#### `, which is what a `Problem.final_answer` holds for every GSM8K
problem (all are integers), so either may be passed as `reference`. lm-eval also
cuts generations at `Question:`; these functions grade the text they are given.

Every grade of a completion lives here, whoever asks for it (evaluation, the
rewards, `rlatent diagnose`): the final answer's three grades, whether a
completion ends in a `#### <answer>` line (the format), and each step's result
(`step_outcomes`, line j against the reference's mark j).
"""

from __future__ import annotations

import re

from rlatent.data.marks import YES_NO, answers_match, extract_final_answer, first_number, parse_number

STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")  # the gsm8k task's regexes_to_ignore, in order
INVALID = "[invalid]"  # RegexFilter's fallback
_STRICT, _FLEXIBLE = re.compile(STRICT_PATTERN), re.compile(FLEXIBLE_PATTERN)


def lm_eval_extract(text: str, pattern: re.Pattern, group_select: int) -> str:
    """lm-eval's `RegexFilter`: `findall`, the `group_select`-th match, its first non-empty group, stripped."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), INVALID)
    return match.strip()


def lm_eval_normalize(text: str) -> str:
    """The gsm8k task's `exact_match` normalisation: `regexes_to_ignore` removed in order, lower case."""
    for regex in IGNORED:
        text = re.sub(regex, "", text)
    return text.lower()


def strict_match(completion: str, reference: str) -> bool:
    """lm-eval gsm8k `exact_match,strict-match`: the first `#### <digits,.->` equals the reference."""
    return lm_eval_normalize(lm_eval_extract(completion, _STRICT, 0)) == lm_eval_normalize(reference)


def flexible_extract(completion: str, reference: str) -> bool:
    """lm-eval gsm8k `exact_match,flexible-extract`: the last number-like run equals the reference."""
    return lm_eval_normalize(lm_eval_extract(completion, _FLEXIBLE, -1)) == lm_eval_normalize(reference)


def numeric_match(completion: str, reference: str, finished: bool = True) -> bool:
    """rlatent's grade: `extract_final_answer(completion, finished)` equals the reference as a number."""
    return answers_match(extract_final_answer(completion, finished), reference)


def grade(completion: str, reference: str, finished: bool = True) -> dict[str, bool]:
    """All three grades: `correct` (rlatent's numeric match), `strict_match`, `flexible_extract`."""
    return {"correct": numeric_match(completion, reference, finished),
            "strict_match": strict_match(completion, reference),
            "flexible_extract": flexible_extract(completion, reference)}


def has_final_answer_line(text: str) -> bool:
    """Whether `text` ends its reasoning with a `#### <answer>` line: the rest of the line after the last
    `####` is exactly one number ("#### $1,000." counts; "#### about 7", "#### 18/5" and a bare "####" do
    not) or Yes/No."""
    _, sep, tail = text.rpartition("####")
    line = tail.split("\n", 1)[0]
    return bool(sep) and (parse_number(line) is not None or YES_NO.fullmatch(line.strip()) is not None)


def line_result(line: str) -> str | None:
    """The step result a completion line states: the first number after its last `=` (a written
    expression or a mark), else its first number (a line whose expression a latent block replaced)."""
    return first_number(line.rsplit("=", 1)[-1])


def step_lines(completion: str) -> list[str]:
    """A completion's step lines: its non-empty lines before `####` (one step per line, as the reference
    solutions and the ladder's answers are written)."""
    return [line for line in completion.split("####")[0].splitlines() if line.strip()]


def step_outcomes(completion: str, results: list[str]) -> list[bool]:
    """Per reference step j, whether the completion's j-th step line states its result (compared as
    numbers, `answers_match`)."""
    lines = step_lines(completion)
    return [j < len(lines) and answers_match(line_result(lines[j]), result) for j, result in enumerate(results)]


def answer_concentration(predicted: list[str | None], references: list[str]) -> dict[str, float]:
    """How much a batch of answers to different problems agrees, and how much of its accuracy that is.

    A policy can raise its reward without learning the task by saying the
    answer that is right most often (a base rate: "0" for a task where many
    chains end at zero, "No" for a reachability question). Rollouts then
    agree across problems that have different answers. `answer_top_share` is
    the share of all `predicted` taken by the commonest answer (None, no
    answer, never counts as one), and `accuracy_top_answer` the share that is
    that answer and right: the part of the batch's accuracy the one answer
    makes. Answers are compared as the same number or Yes/No (`answers_match`).
    """
    counts: dict[str, int] = {}
    for answer in predicted:
        if answer is not None:
            key = next((seen for seen in counts if answers_match(answer, seen)), answer)
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return {"answer_top_share": 0.0, "accuracy_top_answer": 0.0}
    top = max(counts, key=counts.get)
    right = sum(answers_match(answer, top) and answers_match(answer, reference)
                for answer, reference in zip(predicted, references))
    return {"answer_top_share": counts[top] / len(predicted), "accuracy_top_answer": right / len(predicted)}
