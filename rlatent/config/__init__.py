"""One typed config for a whole run.

A run is described by one YAML file whose sections mirror the pieces it builds
(model, data, latent, sft, eval, grpo, distributed, deepspeed, output). Every
field is declared once, with its default and the reason for it: phase 1's
sections in `sections.py`, phase 2's in `phase2.py`, the checks that span
sections in `run.py`. Unknown keys and wrong types are rejected with the full
key path (`sft.lr: Input should be a valid number`). Command-line overrides use
`key.sub=value`, where the value is parsed as YAML (`sft.steps=20`,
`latent.mode=none`, `data.path=null`); see `loading.py`.
"""

from rlatent.config.loading import apply_override, config_reference, load_config
from rlatent.config.phase2 import DeepSpeedConfig, DistributedConfig, GRPOConfig, OutputConfig, RewardSpec
from rlatent.config.run import RunConfig
from rlatent.config.sections import (
    CurriculumConfig,
    DataConfig,
    EvalConfig,
    GraphConfig,
    LatentConfig,
    ModelConfig,
    Section,
    SFTConfig,
    SyntheticConfig,
)

__all__ = [
    "CurriculumConfig", "DataConfig", "DeepSpeedConfig", "DistributedConfig", "EvalConfig", "GRPOConfig",
    "GraphConfig", "LatentConfig", "ModelConfig", "OutputConfig", "RewardSpec", "RunConfig", "Section",
    "SFTConfig", "SyntheticConfig", "apply_override", "config_reference", "load_config",
]
