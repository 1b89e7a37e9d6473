"""GSM8K rewards: the verifiable answer and the `#### <number>` format."""

from __future__ import annotations

from rlatent.data.marks import answers_match, extract_final_answer, parse_number


def gsm8k_correct(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when a completion's final answer is the reference `answer` as a number, else 0.0.

    The final answer is the number after the last `####`, or the last number in the
    text when there is none (`extract_final_answer`): correctness is scored apart from
    format, which `gsm8k_format` pays for. "$1,000.00" matches "1000".
    """
    return [float(answers_match(extract_final_answer(text), ref)) for text, ref in zip(completions, answer)]


def gsm8k_format(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 when a completion ends its reasoning with a `#### <number>` line, else 0.0.

    The rest of the line after the last `####` must be exactly one number ("#### $1,000."
    counts, "#### about 7" and a bare "####" do not).
    """
    return [float(_has_final_answer_line(text)) for text in completions]


def _has_final_answer_line(text: str) -> bool:
    _, sep, tail = text.rpartition("####")
    return bool(sep) and parse_number(tail.split("\n", 1)[0]) is not None
