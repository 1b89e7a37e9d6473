"""Training checkpoints: the model's files plus what a resumed run needs to continue exactly.

A checkpoint directory holds the adapter (or full weights), heads and latent
settings (`LatentModel.save`) and `trainer_state.pt`: the phase, its step, the
optimizer state (AdamW moments per parameter name, so plain and DeepSpeed runs
read each other's checkpoints), the scheduler and every RNG state, loaded with
`torch.load(weights_only=True)`. It is written to a temporary directory and
renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlatent.io.atomic import (atomic_directory, capture_rng_state, load_state, load_tensors, restore_rng_state,
                               save_state, save_tensors)
from rlatent.errors import CheckpointError

TRAINER_STATE_FILE = "trainer_state.pt"
REFERENCE_FILE = "reference.safetensors"


def save_checkpoint(path: Path, model, phase: str, step: int, optimizer_state: dict,
                    reference: dict[str, torch.Tensor] | None = None) -> Path:
    """`model`: a `LatentModel`; `optimizer_state`: an `rlatent.optim` optimizer's `state_dict()`. Under
    ZeRO-3 the caller holds `optimizer.full_parameters()` so that the model's weights are whole.
    `reference`: phase 2's frozen reference policy (`rlatent.grpo.reference`), kept so a resumed run
    compares with the policy it started from."""
    with atomic_directory(path) as tmp:
        model.save(tmp)
        if reference:
            save_tensors(tmp / REFERENCE_FILE, reference)
        save_state(tmp / TRAINER_STATE_FILE, {
            "phase": phase, "step": step, "optimizer": optimizer_state, "rng": capture_rng_state(),
        })
    return path


def read_reference(path: Path) -> dict[str, torch.Tensor] | None:
    """The frozen reference policy a phase-2 checkpoint carries, or None."""
    file = Path(path) / REFERENCE_FILE
    return load_tensors(file) if file.is_file() else None


def checkpoint_phase(path: Path) -> tuple[str, int]:
    """(phase, step) a checkpoint was written at."""
    state = load_state(path / TRAINER_STATE_FILE)
    return str(state.get("phase")), int(state.get("step", 0))


def read_training_state(path: Path, phase: str) -> dict:
    """The trainer state of a checkpoint of `phase` (step, optimizer, rng)."""
    state = load_state(path / TRAINER_STATE_FILE)
    if state.get("phase") != phase:
        raise CheckpointError(f"{path}: not a {phase} checkpoint (phase {state.get('phase')!r})")
    return state


def restore_training_state(path: Path, phase: str, optimizer) -> int:
    """Load optimizer (with its scheduler) and RNG states from a checkpoint of `phase`; returns its step."""
    state = read_training_state(path, phase)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not fit this model ({exc})") from None
    restore_rng_state(state["rng"])
    return int(state["step"])
