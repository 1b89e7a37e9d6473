"""What both optimizers share: the portable state format (AdamW moments keyed by parameter name,
the Adam step and the scheduler), so a checkpoint written by one loads into the other."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from rlatent.errors import TrainingError

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


def check_finite_weights(named: list[tuple[str, nn.Parameter]], where: str) -> None:
    """After an update: refuse trainable weights that are NaN/inf or so large that their squares overflow
    float32 (|w| > ~1.8e19; a learning rate like 1e30 makes them +-lr at once and every forward inf), so
    the run stops at the step that broke them, named by `where` ("sft step 12"), not later in a sampler.
    One float32 sum over the weights and one sync; under ZeRO-3 each rank checks its own partition."""
    tensors = [getattr(p, "ds_tensor", p).detach() for _, p in named]
    if not tensors:
        return
    sums = [t.float().square().sum() for t in tensors]
    if torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums]).sum()):
        return
    bad = [name for (name, _), s in zip(named, sums) if not torch.isfinite(s)]
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    raise TrainingError(f"{where}: trainable weights are NaN/inf or too large to compute with after the update "
                        f"({bad[0]}{more}); lower the learning rate")


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C (SIGINT) during the block is held until it ends, then raised: an optimizer step is applied
    whole or not at all, so an interrupted run's weights always match a step count. Only where Python's
    own handler is installed, in the main thread; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
