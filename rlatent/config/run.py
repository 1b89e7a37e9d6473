"""The whole run's config: every section, and the checks that span sections."""

from __future__ import annotations

import yaml
from pydantic import Field, model_validator

from rlatent.config.phase2 import DeepSpeedConfig, DistributedConfig, GRPOConfig, OutputConfig
from rlatent.config.sections import DataConfig, EvalConfig, LatentConfig, ModelConfig, Section, SFTConfig
from rlatent.modes import latent_mode


class RunConfig(Section):
    seed: int = Field(0, ge=0, lt=2**32)
    """Seeds Python, NumPy and torch, and the data order (0 to 2**32 - 1, NumPy's range)."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    latent: LatentConfig = LatentConfig()
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()
    grpo: GRPOConfig = GRPOConfig()
    distributed: DistributedConfig = DistributedConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _data_seed_of_run(cls, values):
        """`data.<task>.seed: run` becomes the run's seed here, so the saved config.yaml names the draw a run
        trained on and `rlatent eval RUN seed=N` cannot move it to another draw."""
        if not isinstance(values, dict) or "data" not in values:
            return values
        data, seed = values["data"], values.get("seed", 0)
        if isinstance(data, Section):
            data = data.model_dump()
        if not isinstance(data, dict):
            return values  # pydantic names the wrong type
        data = dict(data)
        for task in ("synthetic", "graph"):
            section = data.get(task)
            if isinstance(section, Section):
                section = section.model_dump()
            if isinstance(section, dict) and section.get("seed") == "run":
                data[task] = {**section, "seed": seed}
        return {**values, "data": data}

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.latent.trunk == "two" and self.model.lora_r == 0:
            raise ValueError("latent.trunk 'two' needs LoRA (model.lora_r > 0): the latent trunk is the base + adapter")
        mode = latent_mode(self.latent.mode)
        if self.sft.distill.weight > 0 and not (mode.has_slots and self.latent.placement in ("insert", "replace")):
            raise ValueError(f"sft.distill needs latent slots placed at the marks (latent.mode latent or pause, "
                             f"placement insert or replace), got mode {self.latent.mode!r}, placement "
                             f"{self.latent.placement!r}")
        if self.sft.distill.split_steps and (self.sft.distill.weight == 0 or self.latent.k < 2):
            raise ValueError(f"sft.distill.split_steps needs sft.distill.weight > 0 and latent.k >= 2 (a slot for "
                             f"each partial result), got weight {self.sft.distill.weight}, k {self.latent.k}")
        if mode.recurrent and self.latent.max_latents_per_block < self.latent.k:
            raise ValueError(f"latent.max_latents_per_block {self.latent.max_latents_per_block} is below latent.k "
                             f"{self.latent.k}: sampling would cut every block phase 1 trains; raise it to at least "
                             f"{self.latent.k}")
        compress = self.sft.compress
        if compress.weight > 0 and not (mode.has_slots and self.latent.placement == "replace"
                                        and (self.latent.proj == "soft" or not mode.recurrent)):
            raise ValueError(f"sft.compress needs slots standing for the removed expressions (placement "
                             f"'replace') fed back token mixtures (latent.mode 'latent' with proj 'soft') or pause "
                             f"inputs (latent.mode 'pause': the chain-supervised pause control), got mode "
                             f"{self.latent.mode!r}, placement {self.latent.placement!r}, proj {self.latent.proj!r}")
        if compress.decoder_weight > 0 and not (mode.recurrent and self.latent.placement == "replace"):
            raise ValueError(f"sft.compress.decoder_weight decodes each fed-back latent into the piece of the chain "
                             f"its slot stands for: it needs latent.mode 'latent' with placement 'replace', got mode "
                             f"{self.latent.mode!r}, placement {self.latent.placement!r}")
        if compress.random_factor and compress.tokens_per_latent is None:
            raise ValueError("sft.compress.random_factor draws each problem's factor up to "
                             "sft.compress.tokens_per_latent: set it (e.g. 4)")
        if (compress.weight > 0 or compress.decoder_weight > 0) and self.sft.distill.weight > 0:
            raise ValueError("sft.compress and sft.distill are alternatives (teacher-forced slot inputs or matched "
                             "states): set one weight to 0")
        if compress.split_steps and compress.weight > 0 and self.latent.k < 2:
            raise ValueError(f"sft.compress.split_steps needs latent.k >= 2 (a slot for each partial result), "
                             f"got k {self.latent.k}")
        if self.grpo.latent_noise_std > 0 and not mode.explorable:
            raise ValueError(f"grpo.latent_noise_std > 0 needs latent.mode 'latent': {self.latent.mode} slots hold no "
                             "state-dependent latent to explore, so the noise would have no policy density")
        if self.grpo.beta > 0 and self.grpo.reference == "base" and self.model.lora_r == 0:
            raise ValueError("grpo.reference 'base' with model.lora_r 0 is the policy itself (the KL would be 0): "
                             "use grpo.reference 'initial'")
        if self.grpo.beta > 0 and self.grpo.reference == "initial" and self.deepspeed.enabled \
                and self.deepspeed.zero_stage == 3:
            raise ValueError("grpo.reference 'initial' swaps frozen weights into the parameters, which ZeRO-3 "
                             "partitions: use deepspeed.zero_stage <= 2 or grpo.reference 'base'")
        for section in ("grpo", "eval"):
            if getattr(self, section).engine == "vllm" and getattr(self, section).stop:
                raise ValueError(f"{section}.stop is applied by rlatent's sampler; {section}.engine 'vllm' ignores it")
        if self.grpo.engine == "vllm" and mode.has_slots:
            raise ValueError("grpo.engine 'vllm' samples text only: it needs latent.mode 'none'")
        if self.eval.engine == "vllm" and mode.has_slots:
            raise ValueError("eval.engine 'vllm' samples text only: it needs latent.mode 'none'")
        if self.grpo.rollout_chunks is not None and self.grpo.rollout_chunks > self.grpo.prompts_per_step:
            raise ValueError(f"grpo.rollout_chunks {self.grpo.rollout_chunks} exceeds grpo.prompts_per_step "
                             f"{self.grpo.prompts_per_step}: a chunk holds whole prompt groups")
        if self.distributed.learner_workers > 1 and not self.deepspeed.enabled:
            raise ValueError("distributed.learner_workers > 1 needs deepspeed.enabled (it reduces the gradients)")
        if self.distributed.learner_workers > self.grpo.prompts_per_step * self.grpo.group_size:
            raise ValueError("distributed.learner_workers exceeds the rollouts per step: a rank would get no rows")
        if self.deepspeed.enabled and self.sft.curriculum.stages and self.sft.curriculum.reset_optimizer:
            raise ValueError("sft.curriculum.reset_optimizer clears torch AdamW's state; with deepspeed.enabled "
                             "set it to false")
        if self.deepspeed.offload_params and self.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage 3")
        return self

    def rollout_chunks(self) -> int:
        """Chunks a step's prompts are split into (see `grpo.rollout_chunks`)."""
        if self.grpo.rollout_chunks is not None:
            return self.grpo.rollout_chunks
        if self.distributed.backend == "ray":
            return min(self.distributed.rollout_workers, self.grpo.prompts_per_step)
        return 1

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
