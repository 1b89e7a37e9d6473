"""GSM8K rewards: the verifiable answer and the `#### <number>` format, and lm-evaluation-harness's
two GSM8K grades (`strict_match`, `flexible_extract`) for logging beside them."""

from __future__ import annotations

from rlatent.data.grading import flexible_extract, has_final_answer_line, numeric_match, strict_match


def gsm8k_correct(prompts: list[str], completions: list[str], answer: list[str],
                  truncated: list[bool] | None = None, **kwargs) -> list[float]:
    """1.0 when a completion's final answer is the reference `answer` as a number, else 0.0.

    The final answer is rlatent's numeric match (`rlatent.data.marks.extract_final_answer`):
    the number on the line after the last `####`; without one, the last number of a
    completion that finished, never of one `truncated` at its token cap (there only a complete
    `####` line counts). Correctness is scored apart from format, which `gsm8k_format` pays for.
    "$1,000.00" matches "1000"; "#### 18/5" and "10 - 3" match nothing. Without `truncated`
    every completion counts as finished.
    """
    finished = [True] * len(completions) if truncated is None else [not t for t in truncated]
    return [float(numeric_match(text, ref, done)) for text, ref, done in zip(completions, answer, finished)]


def gsm8k_format(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 when a completion ends its reasoning with a `#### <number>` line, else 0.0
    (`rlatent.data.grading.has_final_answer_line`: "#### $1,000." counts, "#### about 7", "#### 18/5" and a
    bare "####" do not)."""
    return [float(has_final_answer_line(text)) for text in completions]


def gsm8k_strict_match(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when lm-evaluation-harness's gsm8k `strict-match` grades the completion right (the first
    `#### N`, compared as a string after lm-eval's normalisation; `rlatent.data.grading`), else 0.0."""
    return [float(strict_match(text, ref)) for text, ref in zip(completions, answer)]


def gsm8k_flexible_extract(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when lm-evaluation-harness's gsm8k `flexible-extract` grades the completion right (the last
    number-like run, compared as a string after lm-eval's normalisation; `rlatent.data.grading`), else 0.0."""
    return [float(flexible_extract(text, ref)) for text, ref in zip(completions, answer)]

