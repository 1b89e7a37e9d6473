"""Plain torch AdamW behind the optimizer interface.

A trainer calls `backward(loss)` once per micro-batch and `step()` once per
optimizer step (clip, update, schedule, zero the gradients). Two
implementations: plain torch AdamW in this process (`TorchOptimizer`), or a
DeepSpeed ZeRO engine (`rlatent.optim.deepspeed_optimizer`, chosen by
`deepspeed.enabled`). Their `state_dict()` is the same portable format, keyed by
parameter name, so a checkpoint written by one resumes in the other.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from rlatent.optim.state import (MOMENTS, SchedulerFactory, check_finite_weights, check_moments, load_schedule,
                                 trainable_named_parameters, uninterrupted)


class TorchOptimizer:
    """AdamW over the model's trainable parameters, stepped in this process."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, max_grad_norm: float,
                 make_scheduler: SchedulerFactory):
        self.named = trainable_named_parameters(model)
        self.params = [p for _, p in self.named]
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = make_scheduler(self.optimizer)
        self.updates = 0  # completed `step`s on this object (a Ctrl-C never splits one)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, where: str | None = None) -> float:
        """Clip, update, advance the schedule, zero the gradients; returns the pre-clip gradient norm.
        Weights left NaN/inf raise a `TrainingError` naming `where` (the trainer's "sft step 12")."""
        with uninterrupted():
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1
        check_finite_weights(self.named, where or f"optimizer step {self.updates}")
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Parameters are whole here; DeepSpeed ZeRO-3 gathers its shards inside this context."""
        yield

    def reset_moments(self) -> None:
        """Forget AdamW's moments and step counts (a curriculum stage change); the schedule goes on."""
        self.optimizer.state.clear()

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
