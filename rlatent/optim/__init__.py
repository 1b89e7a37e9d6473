"""The optimizer step both phases take, behind one small interface (`backward`, `step`, `lr`,
`full_parameters`, `state_dict`): plain torch AdamW or a DeepSpeed ZeRO engine."""

from __future__ import annotations

from torch import nn

from rlatent.config import DeepSpeedConfig
from rlatent.optim.state import SchedulerFactory
from rlatent.optim.torch_optimizer import TorchOptimizer


def build_optimizer(deepspeed_cfg: DeepSpeedConfig, model: nn.Module, lr: float, weight_decay: float,
                    max_grad_norm: float, make_scheduler: SchedulerFactory):
    """A `TorchOptimizer`, or a DeepSpeed one when `deepspeed.enabled` (imported only then)."""
    if deepspeed_cfg.enabled:
        from rlatent.optim.deepspeed_optimizer import DeepSpeedOptimizer

        return DeepSpeedOptimizer(deepspeed_cfg, model, lr, weight_decay, max_grad_norm, make_scheduler)
    return TorchOptimizer(model, lr, weight_decay, max_grad_norm, make_scheduler)
