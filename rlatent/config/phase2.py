"""The config sections of phase 2 and where it runs: grpo (with its rewards), distributed, deepspeed, output."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rlatent.config.sections import Section, sane_lr

class RewardSpec(Section):
    function: str
    """A registered reward name (built-ins in `rewards/`, or an entry point in group `rlatent.rewards`)
    or a dotted path `package.module:function`."""
    weight: float = 1.0
    """Weight of this reward in the total (the advantage is computed on the weighted sum)."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments passed to the reward on every call."""


def reward_names(specs: list[RewardSpec]) -> list[str]:
    """Each reward's metric name: the built-in / entry-point name or the function's last path segment; a
    name used twice gets the spec's index (`gsm8k_correct_2`)."""
    names: list[str] = []
    for i, spec in enumerate(specs):
        name = spec.function.replace(":", ".").rsplit(".", 1)[-1]
        names.append(name if name not in names else f"{name}_{i}")
    return names


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
    dynamic_sampling_rounds: int = Field(1, ge=1)
    """Dynamic sampling (DAPO, arXiv 2503.14476): a group whose rewards are all equal has zero advantage and
    teaches nothing, and a policy that solves one rollout in ten leaves most groups of 8 all wrong. With R > 1,
    while fewer than `prompts_per_step` of the step's groups are informative (`dynamic_sampling_reward` differs
    within the group), up to R - 1 further rounds of `prompts_per_step` prompts are sampled (from a second
    seeded stream, never a prompt the step already drew, so the first round draws what a run without it
    draws); the update takes the first `prompts_per_step` informative groups, topped up with the others in draw
    order when the rounds run out, so its size never changes (DAPO keeps drawing until the batch is full
    instead: here the policy-gradient part of a step shrinks with `groups_informative`). 1 = off."""
    dynamic_sampling_reward: str = "gsm8k_correct"
    """The reward (its metric name, as in `reward/<name>_mean`) whose values decide whether a group is
    informative: the correctness reward, as DAPO filters on accuracy. The weighted total would pass a group of
    eight wrong answers one of which lacks `####` (a format reward differs), with advantages as large as a
    group with one right answer. Must name one of `rewards` when `dynamic_sampling_rounds` > 1."""
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
    decision_loss: Literal["joint", "decoupled"] = "joint"
    """`joint`: start/stop decisions (and explored latents) are aggregated with the tokens, each counting like a
    token. `decoupled`: they are normalised by their own count and weighted by `decision_weight` (Thinkless's
    decoupled GRPO, arXiv 2505.13379: a rare control decision trained jointly with hundreds of tokens collapses)."""
    decision_weight: float = Field(1.0, ge=0)
    """Weight of the decision part of the loss with `decision_loss: decoupled`."""
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
    KL) all get a KL; costs one copy of the trainable weights (a whole model with `model.lora_r: 0`). With
    `latent_noise_std: 0` it computes its own latents (one recurrent no-grad forward), so a drift in how states
    become latents is charged too. `base`: the base model with adapters off (before phase 1; tokens only,
    needs LoRA; scored on the policy's latents)."""
    kl_bias_correction: bool = False
    """Multiply each action's KL by its importance ratio (TRL 1.16's `use_bias_correction_kl`, on there). It
    also sets the KL's direction: the k3 loss's gradient estimates grad KL(ref||pi) without it and grad
    KL(pi||ref) with it, and the exact decision KL follows (docs/grpo.md)."""
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
    logprob_micro_batch_size: int = Field(64, ge=1)
    """Rollouts per no-grad forward of the reference (and of `old_logprobs: recompute`), rounded up to a
    multiple of `micro_batch_size` (verl's `log_prob_micro_batch_size`). Without activations to keep it can
    be large: a latent forward is one pass per latent wave whatever the rows, so fewer, wider passes."""
    lr: float = Field(1e-5, gt=0)
    """AdamW learning rate (constant after warm-up); at most 1, as `sft.lr` (`MAX_LR`)."""

    @field_validator("lr")
    @classmethod
    def _lr_at_most_max(cls, value: float) -> float:
        return sane_lr(value)

    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    reward_errors: Literal["raise", "zero"] = "raise"
    """A reward that raises or returns NaN/inf/wrong length: stop naming it and the sample, or score 0 and count."""
    reward_errors_max_steps: int = Field(3, ge=0)
    """With `reward_errors: zero`: stop the run (one error line, exit 2) once one reward has failed on every
    sample of this many steps in a row, since such a run trains on nothing that reward measures; checkpoints
    written so far are kept. 0 = never stop (failures are still printed per step and summed at the end)."""
    rewards: list[RewardSpec] = [RewardSpec(function="gsm8k_correct"), RewardSpec(function="gsm8k_format", weight=0.1)]
    """Reward functions and weights (docs/guide.md, Rewards); the advantage uses their weighted sum."""
    log_every: int = Field(1, ge=1)
    save_every: int = Field(0, ge=0)
    """0 = checkpoint only at the end."""
    engine: Literal["rlatent", "vllm"] = "rlatent"
    """Rollout engine: rlatent's latent-aware sampler, or vLLM for text-only policies (`latent.mode: none`;
    needs the `vllm` extra). vLLM cannot feed hidden states back, so latent policies always use rlatent's."""
    compile: bool = False
    """As `eval.compile`, for the rollouts."""
    slots: int | None = Field(None, ge=1)
    """Rows the sampler computes at once (continuous batching: a finished row's slot takes the next queued
    completion); null = every completion of the chunk at once, the fastest on a CPU."""
    rollout_chunks: int | None = Field(None, ge=1)
    """The step's prompts are split into this many chunks, each sampled with its own seed (seed, step,
    chunk): the unit a Ray rollout worker takes, and redoes if it dies. Equal chunks give equal rollouts on
    either backend. null = 1 locally, `distributed.rollout_workers` with Ray."""

    @model_validator(mode="after")
    def _dynamic_sampling_reward_is_configured(self) -> "GRPOConfig":
        names = reward_names(self.rewards)
        if self.dynamic_sampling_rounds > 1 and self.dynamic_sampling_reward not in names:
            raise ValueError(f"dynamic_sampling_reward {self.dynamic_sampling_reward!r} is not one of the "
                             f"configured rewards ({', '.join(names)})")
        return self


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
    report_to: list[Literal["tensorboard", "wandb"]] = ["tensorboard"]
    """Where the scalars of metrics.jsonl also go, as TRL's `report_to`: TensorBoard (the run's `tensorboard/`)
    and Weights & Biases (one W&B run per run directory, resumed with it; `pip install -e '.[wandb]'`, then
    `wandb login` or WANDB_MODE=offline). [] = metrics.jsonl only."""
    wandb_project: str = "rlatent"
    """The W&B project runs log to (with `report_to` holding "wandb"); WANDB_ENTITY picks the team."""
