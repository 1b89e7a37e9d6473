"""Latent modes (`latent.mode`) as a small registry of behaviours.

Code that depends on the mode asks its `LatentMode` what it does instead of
testing the mode's name, so adding a mode is adding one entry here.

| mode     | slots | slot input          | block length      | stop head | exploration noise |
|----------|-------|---------------------|-------------------|-----------|-------------------|
| `latent` | yes   | proj(previous h)    | decided (stop)    | yes       | yes               |
| `pause`  | yes   | learned embeddings  | fixed at `k`      | no        | no (nothing to explore: the input is a constant) |
| `none`   | no    | -                   | -                 | no        | no                |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatentMode:
    name: str
    has_slots: bool
    """Answers hold latent slots at all (start decisions exist)."""
    slot_input: str | None
    """What fills a slot: `hidden` (the projected previous state, recurrent), `pause` (a constant learned
    embedding per index in the block, one parallel pass) or None."""
    fixed_block_length: bool
    """Blocks are always `latent.k` long: no stop decisions, the block closes by itself."""
    explorable: bool
    """`grpo.latent_noise_std` applies: the slot input is a function of the state that noise can perturb
    with a well-defined density. Pause inputs are constants: noise on them has no policy to score."""

    @property
    def has_stop_decisions(self) -> bool:
        return self.has_slots and not self.fixed_block_length

    @property
    def recurrent(self) -> bool:
        """A slot's input depends on the state before it, so the training forward runs in passes."""
        return self.slot_input == "hidden"


MODES: dict[str, LatentMode] = {
    "latent": LatentMode("latent", has_slots=True, slot_input="hidden", fixed_block_length=False, explorable=True),
    "pause": LatentMode("pause", has_slots=True, slot_input="pause", fixed_block_length=True, explorable=False),
    "none": LatentMode("none", has_slots=False, slot_input=None, fixed_block_length=False, explorable=False),
}


def latent_mode(name: str) -> LatentMode:
    if name not in MODES:
        raise ValueError(f"unknown latent mode {name!r}; expected one of {sorted(MODES)}")
    return MODES[name]
