"""Stop sequences: a row ends where its tokens end with a stop sequence, counts as finished, and the
training forward recomputes exactly the actions the sampler took (nothing after the stop is an action)."""

from __future__ import annotations

import torch

from rlatent.latent.policy import recompute_actions
from rlatent.latent.sampler import SamplingSettings, sample
from test_invariant import build_model


def written_positions(traj, row: int) -> list[int]:
    """A row's completion position by position, -1 at latent slots."""
    start, length = int(traj.batch.prompt_lengths[row]), int(traj.batch.lengths[row])
    return torch.where(traj.batch.latent_mask[row], -1, traj.batch.input_ids[row])[start:length].tolist()


def test_rows_end_at_a_stop_sequence_and_recompute_matches(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, "shared")
    prompts = [tokenizer(t).input_ids for t in ["Tom has 3 apples", "12 + 7 =", "She buys 4 pens", "A box"]]
    base = dict(max_new_tokens=24, temperature=1.0, decisions="sample", max_latents_per_block=2, max_blocks=3,
                max_total_latents=4)
    torch.manual_seed(0)
    free = sample(model, prompts, -1, tokenizer.pad_token_id, SamplingSettings(**base))
    # Take a token pair the unconstrained sample wrote next to each other in row 0 as the stop sequence.
    written = written_positions(free, 0)
    at = next(i for i in range(2, len(written) - 1) if written[i] != -1 and written[i + 1] != -1)
    stop = tuple(written[at:at + 2])
    torch.manual_seed(0)
    traj = sample(model, prompts, -1, tokenizer.pad_token_id, SamplingSettings(**base, stop_sequences=(stop,)))
    for row in range(len(prompts)):
        ids = traj.completion_ids(row)
        ends_with_stop = tuple(ids[-len(stop):]) == stop
        assert bool(traj.finished[row]) == ends_with_stop
        if not ends_with_stop:
            assert len(ids) == base["max_new_tokens"]
        # The stop sequence appears nowhere earlier in the written positions (a latent slot in between breaks a
        # match): the row would have ended there.
        written = written_positions(traj, row)
        assert all(tuple(written[i:i + len(stop)]) != stop for i in range(len(written) - len(stop)))
    assert traj.finished[0] and len(written_positions(traj, 0)) <= at + 2  # same seed: row 0 stops there
    stored = traj.actions(False)
    out = recompute_actions(model, traj.batch, traj.slot_inputs, stored.mask, 1.0, 0.0, "recurrent")
    assert torch.allclose(out.actions.logprobs, stored.logprobs.to(out.actions.logprobs.dtype), atol=1e-9, rtol=0)
