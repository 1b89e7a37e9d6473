"""A reward for each right step: partial credit read off the reference solution's calculator marks.

A reward for the final answer alone pays a policy that says its training prompts' commonest answer
without reading them; on the arithmetic ladder every phase 2 from a near-base-rate start drifted that way
(docs/results.md). The intermediate results are as verifiable as the answer, and only a policy that reads
the problem gets them right, so paying them gives the update something other than the base rate to
reinforce. `rlatent diagnose --only steps` measures the same per-step outcomes on evaluation samples.
"""

from __future__ import annotations

from rlatent.data.grading import step_outcomes
from rlatent.data.marks import parse_marks


def gsm8k_steps(prompts: list[str], completions: list[str], solution: list[str], **kwargs) -> list[float]:
    """The fraction of the reference `solution`'s marked steps (`<<expr=result>>`) whose result the
    completion states on the matching line, the last step (the answer) included; 0.0 for a solution
    without marks, which has no step to pay."""
    scores = []
    for text, reference in zip(completions, solution):
        results = [mark.result for mark in parse_marks(reference)]
        scores.append(sum(step_outcomes(text, results)) / len(results) if results else 0.0)
    return scores
