"""What moves from the learner to rollout workers: the trainable tensors only.

With LoRA that is the adapter, the start/stop heads, the projection and pause
embeddings, a few percent of the model; the frozen base never moves, since
every worker loads it once itself. Names are `LatentModel.named_parameters()`
names, so a worker built from the same settings accepts exactly this set.
"""

from __future__ import annotations

import torch
from torch import nn

from rlatent.errors import TrainingError


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every trainable parameter, by name."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_state` into a model of the same settings; refuses any other set of names."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        diff = sorted(set(state) ^ set(params))
        raise TrainingError(f"weight sync: tensors {diff[:3]}{' ...' if len(diff) > 3 else ''} do not match the "
                            "worker's trainable parameters (learner and worker built from different settings?)")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, frozen or not (what a full-weight sync would move)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
