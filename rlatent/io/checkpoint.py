"""Training checkpoints: the model's files plus what a resumed run needs to continue exactly.

A checkpoint directory holds the adapter (or full weights), heads and latent
settings (`LatentModel.save`) and `trainer_state.pt`: the phase, its step, the
optimizer state (AdamW moments per parameter name, so plain and DeepSpeed runs
read each other's checkpoints), the scheduler and every RNG state, loaded with
`torch.load(weights_only=True)`. It is written to a temporary directory and
renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlatent.io.atomic import (atomic_directory, capture_rng_state, load_state, load_tensors, restore_rng_state,
                               safetensors_problem, save_state, save_tensors)
from rlatent.errors import CheckpointError, first_line

TRAINER_STATE_FILE = "trainer_state.pt"
REFERENCE_FILE = "reference.safetensors"
# What `LatentModel.save` writes (rlatent.model.latent_model), named here so the io layer can check a
# checkpoint without importing the model: settings, heads, and the adapter or the full weights.
SETTINGS_FILE = "latent.json"
HEADS_FILE = "heads.safetensors"
ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"


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


def check_checkpoint_files(path: str | Path, training: bool = False) -> None:
    """Refuse a checkpoint that lacks a file its model needs, with one line naming it (`CheckpointError`).

    Loading alone would not always fail: without its adapter directory a LoRA checkpoint loads as the
    base model with trained heads, a silently different model. Checked: the settings (`latent.json`),
    the heads, the adapter (config and weights) when `lora_r > 0` or the full model's weights when 0,
    every safetensors file whole, and with `training` the trainer state a resumed run continues from.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    settings_file = path / SETTINGS_FILE
    if not settings_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint ({SETTINGS_FILE} missing)")
    try:
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{settings_file}: unreadable latent settings ({first_line(exc)})") from None
    lora_r = settings.get("lora_r", 16) if isinstance(settings, dict) else None
    if not isinstance(lora_r, int):
        raise CheckpointError(f"{settings_file}: unreadable latent settings (no integer lora_r)")
    needed = [path / HEADS_FILE] + ([path / TRAINER_STATE_FILE] if training else [])
    if lora_r > 0:
        adapter = path / ADAPTER_DIR
        configs = sorted(adapter.rglob("adapter_config.json")) if adapter.is_dir() else []
        if not configs:
            raise CheckpointError(f"{adapter}: LoRA adapter missing (the checkpoint has model.lora_r {lora_r}; "
                                  "without it the model would be the base model)")
        for config in configs:
            weights = [config.parent / name for name in ("adapter_model.safetensors", "adapter_model.bin")]
            if not any(w.is_file() for w in weights):
                raise CheckpointError(f"{weights[0]}: LoRA adapter weights missing")
    else:
        full = path / FULL_MODEL_DIR
        if not (full / "config.json").is_file():
            raise CheckpointError(f"{full}: fully fine-tuned model missing (config.json not found)")
        if not [*full.glob("*.safetensors"), *full.glob("*.bin")]:
            raise CheckpointError(f"{full}: fully fine-tuned model has no weight files")
    for file in needed:
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
    for file in sorted(path.rglob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise CheckpointError(f"{file}: corrupt safetensors file ({problem})")
