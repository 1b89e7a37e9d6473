"""A user reward, plugged into a run by dotted path:

    grpo:
      rewards:
        - {function: gsm8k_correct, weight: 1.0}
        - {function: "examples.my_rewards:short_and_correct", weight: 0.5, kwargs: {max_tokens: 60}}

A reward is a plain function of the batch returning one float per completion.
It takes by name the facts it needs (`answer` from the dataset, `tokens` from
the trajectory; see `rewards/__init__.py` for the full list), its own options
from the config's `kwargs`, and ignores the rest through `**kwargs`.

Try it:  python examples/my_rewards.py
"""

from __future__ import annotations

from rlatent.data.marks import answers_match, extract_final_answer


def short_and_correct(
    prompts: list[str],
    completions: list[str],
    answer: list[str],
    tokens: list[int],
    truncated: list[bool],
    max_tokens: int = 60,
    **kwargs,
) -> list[float]:
    """1.0 for a correct final answer written in at most `max_tokens` answer tokens, else 0.0.

    Latents are not counted: reasoning moved into latents makes the written answer
    shorter, which is the behaviour this reward pays for. A completion cut at its
    token cap is graded only by a finished `#### N` line (`finished=not cut`).
    """
    return [
        float(n <= max_tokens and answers_match(extract_final_answer(text, finished=not cut), ref))
        for text, ref, n, cut in zip(completions, answer, tokens, truncated)
    ]


if __name__ == "__main__":
    completions = ["5 + 3 = 8\n#### 8", "Let me think at length... " * 20 + "#### 8", "#### 9"]
    print(short_and_correct(["What is 5+3?"] * 3, completions, answer=["8"] * 3, tokens=[8, 130, 3],
                            truncated=[False] * 3))
