"""The learner's optimizer step on a DeepSpeed ZeRO engine (`deepspeed.enabled`).

Same interface and same portable state as `rlatent.optim.torch_optimizer.TorchOptimizer`, so the
trainers do not know which one they hold and checkpoints move between them. The
trainers call the model's submodules themselves, never the engine's forward:
ZeRO-3 gathers each submodule's weights in that submodule's own forward hooks,
and what the engine's forward would do first (start a new micro-batch) is done
here at the end of each `backward`.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from rlatent.config import DeepSpeedConfig
from rlatent.errors import ConfigError, TrainingError, first_line
from rlatent.optim.state import (MOMENTS, SchedulerFactory, check_finite_weights, check_moments, load_schedule,
                                 trainable_named_parameters, uninterrupted)

try:
    import deepspeed
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state
except ImportError:  # the optional extra
    deepspeed = None


class DeepSpeedOptimizer:
    """AdamW stepped by a DeepSpeed engine at `zero_stage` 0-3.

    The optimizer is always torch's AdamW (`torch_adam`), with or without
    `offload_optimizer`: offload does not need DeepSpeedCPUAdam (faster on big
    offloaded states, but a ~1 min JIT compile on first use), and torch's AdamW
    keeps the update the same arithmetic as `TorchOptimizer`'s. Per setting:

    - stage 0: DeepSpeed only averages gradients across ranks; AdamW steps the
      model's own parameters, and the clipping happens here because DeepSpeed
      does not report the norm at stage 0.
    - stages 1-3: float32 master partitions of the trainable weights (so a bf16
      model trains in mixed precision), moments partitioned across ranks (1),
      gradients too (2), the weights too (3; `full_parameters()` gathers them).
      DeepSpeed clips (`gradient_clipping`) and reports the pre-clip norm.
    - `offload_optimizer` (stages 1-3): master weights, moments and the update on
      the CPU; `offload_params` (stage 3): weights on the CPU between uses.

    DeepSpeed's bf16 mode is not used: it casts every parameter to bf16, the
    heads the model keeps in float32 included.
    """

    def __init__(self, settings: DeepSpeedConfig, model: nn.Module, lr: float, weight_decay: float,
                 max_grad_norm: float, make_scheduler: SchedulerFactory):
        if deepspeed is None:
            raise ConfigError("deepspeed.enabled: deepspeed is not installed "
                              "(pip install -e '.[deepspeed]' with DS_BUILD_OPS=0)")
        check_settings(settings, model)
        self.stage, self.model = settings.zero_stage, model
        self.named = trainable_named_parameters(model)
        params = [p for _, p in self.named]
        init_distributed(params[0].device)
        config = engine_config(settings, lr, weight_decay, max_grad_norm if self.stage else 0.0)
        try:
            self.engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                                   lr_scheduler=make_scheduler)
        except Exception as exc:  # DeepSpeed reports bad settings as assertions and runtime errors
            raise ConfigError(f"deepspeed (zero_stage {self.stage}): {first_line(exc)}") from exc
        self.zero = isinstance(self.engine.optimizer, ZeROOptimizer)
        self.adam = self.engine.basic_optimizer  # torch's AdamW over the (master) weights
        self.stage0_norm = 0.0
        self.updates = 0  # completed `step`s on this object (a Ctrl-C never splits one)
        if self.stage == 0:
            def clip(optimizer, args, kwargs):
                self.stage0_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))

            self.adam.register_step_pre_hook(clip)

    def backward(self, loss: torch.Tensor) -> None:
        """Add this micro-batch's gradients; the loss comes scaled, so DeepSpeed must not divide it."""
        # DeepSpeed averages gradients over ranks; each rank's loss is its share of the batch's loss.
        self.engine.backward(loss * torch.distributed.get_world_size(), scale_wrt_gas=False)
        if self.zero:  # else ZeRO overwrites instead of accumulating at the next micro-batch
            self.engine.optimizer.clear_backward_seen_flag()

    def step(self, where: str | None = None) -> float:
        """Reduce, clip, update, advance the schedule, zero the gradients; returns the pre-clip norm.
        Weights left NaN/inf raise a `TrainingError` naming `where` on every rank (the trainer's "grpo step 3").

        Every `step` is an accumulation boundary (`managed_gradient_accumulation: false`)."""
        with uninterrupted():
            self.engine.step()
            self.updates += 1
        norm = self.stage0_norm if self.stage == 0 else float(self.engine.get_global_grad_norm())
        where = where or f"optimizer step {self.updates}"
        try:
            check_finite_weights(self.named, where)
            broken = torch.zeros(1)
        except TrainingError:
            broken = torch.ones(1)
        if torch.distributed.get_world_size() > 1:  # ZeRO-3 ranks check different partitions: all stop together
            device = self.named[0][1].device if torch.distributed.get_backend() == "nccl" else "cpu"
            broken = broken.to(device)
            torch.distributed.all_reduce(broken, op=torch.distributed.ReduceOp.MAX)
        if broken.item():
            check_finite_weights(self.named, where)  # this rank's own message
            raise TrainingError(f"{where}: trainable weights are NaN/inf or too large to compute with after the "
                                "update (on another rank); lower the learning rate")
        return norm

    @property
    def lr(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    @contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Whole weights inside (ZeRO-3 gathers them); in-place writes to trainable ones there are kept,
        master copies included, as they would be with `TorchOptimizer` (every rank must write the same)."""
        gather = (deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0)
                  if self.stage == 3 else nullcontext())
        with gather:
            versions = [p._version for _, p in self.named]
            yield
            if self.zero:
                for (_, p), version in zip(self.named, versions):
                    if p._version != version:
                        safe_set_full_fp32_param(p, p.detach().float())

    def state_dict(self) -> dict:
        """`TorchOptimizer.state_dict`'s format: whole moments per parameter name, step, scheduler."""
        states = adam_states(self.adam)
        moments = {name: {key: self._moment(p, key).detach().cpu().clone() for key in MOMENTS}
                   for name, p in self.named} if states else {}
        return {"moments": moments, "adam_step": int(states[0]["step"]) if states else 0,
                "scheduler": self.engine.lr_scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of `state_dict`; raises KeyError/ValueError when the names or shapes do not fit."""
        check_moments(state["moments"], [(name, shape_only(p)) for name, p in self.named])
        if state["moments"]:
            self._create_adam_states()
            for name, p in self.named:
                saved = state["moments"].get(name)
                for key in MOMENTS:
                    self._set_moment(p, key, saved[key] if saved else torch.zeros(shape_only(p).shape))
            for adam_state in adam_states(self.adam):
                adam_state["step"] = torch.tensor(float(state["adam_step"]))
        load_schedule(self.engine.lr_scheduler, state["scheduler"])

    # ---- AdamW's state behind ZeRO's partitions ----------------------------------------------

    def _create_adam_states(self) -> None:
        """The zero state AdamW creates at its first step, so that saved moments can be written in."""
        # ZeRO-3 lends AdamW its flat master partitions only while stepping them.
        masters = (self.engine.optimizer.fp32_partitioned_groups_flat if self.stage == 3
                   else [p for group in self.adam.param_groups for p in group["params"]])
        for p in masters:
            if not self.adam.state.get(p):
                self.adam.state[p] = {"step": torch.tensor(0.0), **{key: torch.zeros_like(p) for key in MOMENTS}}
        if hasattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link them lazily
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    def _moment(self, p: nn.Parameter, key: str) -> torch.Tensor:
        if not self.zero:  # stage 0: AdamW holds the parameter itself
            return self.adam.state[p][key]
        return safe_get_full_optimizer_state(p, key).reshape(shape_only(p).shape)

    def _set_moment(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None:
        if not self.zero:
            self.adam.state[p][key].copy_(value)
        else:
            safe_set_full_optimizer_state(p, value.to(torch.float32), key)


def check_settings(settings: DeepSpeedConfig, model: nn.Module) -> None:
    """Refuse combinations DeepSpeed would reject late or run wrongly."""
    if settings.offload_optimizer and settings.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer: needs deepspeed.zero_stage 1, 2 or 3")
    if settings.zero_stage != 3:
        return
    own = [name for name, _ in model.named_parameters(recurse=False)]
    if own:  # ZeRO-3 gathers a module's weights when its forward runs; the model's own forward never runs
        raise ConfigError(f"deepspeed.zero_stage: 3 cannot gather {', '.join(own)} (read outside any submodule's "
                          "forward, as in latent.mode pause); use zero_stage 2")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    if len(dtypes) > 1:  # ZeRO-3 packs all trainable partitions into one buffer
        raise ConfigError(f"deepspeed.zero_stage: 3 needs one dtype for all trainable weights, not "
                          f"{' and '.join(dtypes)} (full fine-tuning keeps a bf16 model's heads in float32); "
                          "use zero_stage 2 or LoRA")


def adam_states(adam: torch.optim.Optimizer) -> list[dict]:
    """AdamW's per-tensor states (flat master partitions under ZeRO); empty before the first step."""
    return [s for s in adam.state.values() if s]


def shape_only(p: nn.Parameter) -> torch.Tensor:
    """A storage-free stand-in with `p`'s whole shape (ZeRO-3 leaves an empty local tensor)."""
    return torch.empty(getattr(p, "ds_shape", p.shape), device="meta")


def engine_config(settings: DeepSpeedConfig, lr: float, weight_decay: float, gradient_clipping: float) -> dict:
    """rlatent batches and accumulates itself: one micro-batch per rank for DeepSpeed's bookkeeping, and
    unmanaged accumulation (any number of `backward`s, every `step` a boundary)."""
    zero: dict = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": gradient_clipping,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True}},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # allow torch's AdamW with offload
        "steps_per_print": 2**62,
    }


def init_distributed(device: torch.device) -> None:
    """Join (alone: create) the process group; later calls in the process reuse it.

    A launcher sets the rendezvous variables; a lone process gets rank 0 of 1 on a
    free port. DeepSpeed's shared-memory all-reduce op is turned off: only its
    inference all-reduce uses it, and on a CPU it JIT-compiles for ~40-90 s.
    """
    added = {}
    if not torch.distributed.is_initialized():
        defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        added = {name: value or str(free_port()) for name, value in defaults.items() if name not in os.environ}
    os.environ.update(added)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    try:
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    finally:
        # The port is read once, at init. Left set, it would leak into child processes (Ray actors), whose
        # own process group would then try to listen on it. DeepSpeed reads the others again later.
        if "MASTER_PORT" in added:
            del os.environ["MASTER_PORT"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
