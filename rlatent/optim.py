"""The optimizer step both phases take, behind one small interface.

A trainer calls `backward(loss)` once per micro-batch and `step()` once per
optimizer step (clip, update, schedule, zero the gradients). Two
implementations: plain torch AdamW in this process (`TorchOptimizer`), or a
DeepSpeed ZeRO engine (`rlatent.deepspeed_optim`, chosen by
`deepspeed.enabled`). Their `state_dict()` is the same portable format, keyed by
parameter name, so a checkpoint written by one resumes in the other.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

# Scheduler builder: takes the optimizer, returns an LR scheduler (transformers `get_scheduler`).
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
MOMENTS = ("exp_avg", "exp_avg_sq")


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class TorchOptimizer:
    """AdamW over the model's trainable parameters, stepped in this process."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, max_grad_norm: float,
                 make_scheduler: SchedulerFactory):
        self.named = trainable_named_parameters(model)
        self.params = [p for _, p in self.named]
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = make_scheduler(self.optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, update, advance the schedule, zero the gradients; returns the pre-clip gradient norm."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Parameters are whole here; DeepSpeed ZeRO-3 gathers its shards inside this context."""
        yield

    def state_dict(self) -> dict:
        """Portable state: AdamW moments per parameter name, the Adam step count and the scheduler."""
        moments, adam_step = {}, 0
        for name, p in self.named:
            state = self.optimizer.state.get(p)
            if state:
                moments[name] = {key: state[key].detach().cpu() for key in MOMENTS}
                adam_step = int(state["step"])
        return {"moments": moments, "adam_step": adam_step, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of `state_dict`; raises KeyError/ValueError when the names or shapes do not fit."""
        check_moments(state["moments"], self.named)
        for name, p in self.named:
            if name in state["moments"]:
                saved = state["moments"][name]
                self.optimizer.state[p] = {"step": torch.tensor(float(state["adam_step"])),
                                           **{key: saved[key].to(p.device, p.dtype).clone() for key in MOMENTS}}
        load_schedule(self.scheduler, state["scheduler"])


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


def build_optimizer(cfg, model: nn.Module, lr: float, weight_decay: float, max_grad_norm: float,
                    make_scheduler: SchedulerFactory):
    """A `TorchOptimizer`, or a DeepSpeed one when `deepspeed.enabled` (imported only then)."""
    if cfg.deepspeed.enabled:
        from rlatent.deepspeed_optim import DeepSpeedOptimizer

        return DeepSpeedOptimizer(cfg.deepspeed, model, lr, weight_decay, max_grad_norm, make_scheduler)
    return TorchOptimizer(model, lr, weight_decay, max_grad_norm, make_scheduler)
