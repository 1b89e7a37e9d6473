"""Which training problems a GRPO step draws, round by round, as a function of the step alone.

Round 0 takes the step's `prompts_per_step` problems from stream 0; dynamic sampling's further rounds
(`grpo.dynamic_sampling_rounds`) take theirs from stream 1, so round 0 draws what a run without dynamic
sampling draws. A stream is epochs of permutations of the problems. Within one step no problem is drawn
twice, in any round: a problem in two groups of one update would weigh double and, drawn in round 0 and
again later, be counted twice towards the informative groups. (Only when the step wants more problems than
there are do they repeat.)

Each epoch's permutation is seeded by a hash of (run seed, stream, epoch), NumPy's `SeedSequence`. The
earlier `seed + epoch` made run seed s at epoch e + 1 the same permutation as seed s + 1 at epoch e, so two
"independent" seeds trained on shifted copies of one order.

Everything here is stateless: a resumed run draws what an uninterrupted one draws, and the local and Ray
backends (whose driver runs the same loop) draw the same prompts.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def epoch_seed(seed: int, stream: int, epoch: int) -> int:
    """The torch seed of one epoch's permutation (32 bits: torch's CPU generator reads no more)."""
    return int(np.random.SeedSequence([seed, stream, epoch]).generate_state(1)[0])


def stream_indices(count: int, seed: int, stream: int, start: int) -> Iterator[int]:
    """Problem indices of `stream` from position `start` on, without end: epoch after epoch of permutations."""
    epoch, offset = divmod(start, count)
    while True:
        generator = torch.Generator().manual_seed(epoch_seed(seed, stream, epoch))
        yield from torch.randperm(count, generator=generator)[offset:].tolist()
        epoch, offset = epoch + 1, 0


def prompt_order(count: int, step: int, per_step: int, seed: int, round_index: int = 0,
                 rounds: int = 1) -> list[int]:
    """Problem indices of `step`'s round `round_index` (of `rounds`), each not yet drawn in the step.

    Round 0 reads stream 0 from position step * per_step; the further rounds read stream 1 from position
    step * (rounds - 1) * per_step. A problem the step already holds is skipped and the next one taken,
    so a step that crosses an epoch boundary, or a further round that meets a round-0 problem, reads a
    few positions further than its nominal share (the next step then starts where its share starts).
    """
    taken: set[int] = set()
    drawn = _fresh(stream_indices(count, seed, 0, step * per_step), taken, per_step, count)
    further = stream_indices(count, seed, 1, step * (rounds - 1) * per_step)
    for _ in range(round_index):
        drawn = _fresh(further, taken, per_step, count)
    return drawn


def _fresh(indices: Iterator[int], taken: set[int], wanted: int, count: int) -> list[int]:
    """The next `wanted` of `indices` not in `taken`, added to it; once every problem is taken, `taken`
    starts again (a step that wants more problems than there are repeats them rather than waiting)."""
    drawn: list[int] = []
    while len(drawn) < wanted:
        index = next(indices)
        if len(taken) == count:
            taken.clear()
        if index not in taken:
            taken.add(index)
            drawn.append(index)
    return drawn
