"""What both optimizers share: the portable state format (AdamW moments keyed by parameter name,
the Adam step and the scheduler), so a checkpoint written by one loads into the other."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# Scheduler builder: takes the optimizer, returns an LR scheduler (transformers `get_scheduler`).
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
MOMENTS = ("exp_avg", "exp_avg_sq")


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def load_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """Restore a scheduler and the learning rate it last set (loading alone sets it only at the next step)."""
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def check_moments(moments: dict[str, dict[str, torch.Tensor]], named: list[tuple[str, nn.Parameter]]) -> None:
    """Refuse optimizer state written for other parameters."""
    shapes = {name: tuple(p.shape) for name, p in named}
    unknown = sorted(set(moments) - set(shapes))
    if unknown:
        raise KeyError(f"no trainable parameter named {unknown[0]}" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    for name, saved in moments.items():
        if tuple(saved["exp_avg"].shape) != shapes[name]:
            raise ValueError(f"{name}: saved shape {tuple(saved['exp_avg'].shape)}, parameter {shapes[name]}")
