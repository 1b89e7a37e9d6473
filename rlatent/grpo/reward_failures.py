"""Rewards that fail under `grpo.reward_errors: zero`, made visible and bounded.

`zero` scores a failing sample 0.0 so that one bad completion does not end a long run. The reward set
warns once per reward; after that failures were only counted in `reward/<name>_zeroed`, so a reward that
failed on every sample of every step ended in exit 0 with nothing learnt from it. `RewardFailures` prints
each step's failures while they go on, a summary at the end of the phase, and stops the run with one
error line once a reward has failed on every sample for `grpo.reward_errors_max_steps` steps in a row.
"""

from __future__ import annotations

from rlatent.errors import TrainingError


class RewardFailures:
    def __init__(self, max_steps: int):
        """`max_steps`: steps in a row of total failure that stop the run; 0 = never."""
        self.max_steps = max_steps
        self.in_a_row: dict[str, int] = {}
        self.failed: dict[str, int] = {}  # samples scored 0.0 over the phase, per reward
        self.steps: dict[str, int] = {}  # steps with at least one failure, per reward
        self.seen_steps = 0

    def observe(self, step: int, zeroed: dict[str, int], samples: int) -> list[str]:
        """Count step `step` (1-based), whose `samples` completions each reward scored, `zeroed[name]` of them
        failed; returns the console lines for it. Raises `TrainingError` when a reward has now failed on
        every sample for `max_steps` steps in a row."""
        self.seen_steps += 1
        lines = []
        for name, count in zeroed.items():
            self.in_a_row[name] = self.in_a_row.get(name, 0) + 1 if count == samples else 0
            if not count:
                continue
            self.failed[name] = self.failed.get(name, 0) + count
            self.steps[name] = self.steps.get(name, 0) + 1
            lines.append(f"grpo step {step}: reward {name!r} failed on {count} of {samples} samples, scored 0.0 "
                         "(grpo.reward_errors: zero)")
            if self.max_steps and self.in_a_row[name] >= self.max_steps:
                raise TrainingError(
                    f"grpo step {step}: reward {name!r} failed on every sample for {self.in_a_row[name]} steps in a "
                    "row, so the run learns nothing from it (its first error was printed above); fix the reward, "
                    "or set grpo.reward_errors_max_steps (0 = never stop)")
        return lines

    def summary(self) -> list[str]:
        """One line per reward that failed at all during the phase."""
        return [f"grpo: reward {name!r} failed on {count} samples in {self.steps[name]} of {self.seen_steps} steps, "
                "each scored 0.0 (grpo.reward_errors: zero)" for name, count in self.failed.items()]
