"""The latent-aware model: a Hugging Face causal LM plus what latents need.

`LatentModel` wraps any `AutoModelForCausalLM` (optionally with PEFT LoRA) and
adds the start/stop heads, the projection `proj` from a hidden state to the next
latent input, and, for the `pause` control, learned pause embeddings. It knows
nothing about batching, sampling or training: those call the few methods here
(`embed`, `trunk`, `token_logits`, `start_logits`, `stop_logits`,
`latent_inputs`).

Two trunks share one set of base weights. Language positions run the base with
the latent adapter off; latent slots run it with the adapter on. PEFT switches
adapters per batch, not per position, so `AdapterRouter` gates the adapter's
low-rank branch with a per-position mask: the same single forward computes
each position with its own trunk, exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from torch import nn

from rlatent.io.atomic import load_tensors, save_tensors
from rlatent.errors import CheckpointError, first_line
from rlatent.modes import latent_mode
from rlatent.model.heads import Head
from rlatent.model.kv_cache import KVState, attending, attention_modules, unsupported
from rlatent.model.loading import load_base_model
from rlatent.model.projections import TokenSpace, build_projection

SETTINGS_FILE = "latent.json"
HEADS_FILE = "heads.safetensors"
ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"


@dataclass(frozen=True)
class LatentSettings:
    """What is needed to rebuild a `LatentModel` around its base (saved as latent.json)."""

    base_model: str
    mode: str = "latent"
    trunk: str = "shared"
    proj: str = "norm_match"
    soft_top_k: int = 8
    soft_temperature: float = 1.0
    k: int = 2
    head: str = "linear"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    eos_token_id: int | None = None
    """The token the model learnt to end its answers with, recorded when the model is built (None only in
    checkpoints written before it was): the tokenizer a checkpoint is loaded with must stop on it."""

    @property
    def adapter_name(self) -> str:
        return "latent" if self.trunk == "two" else "default"

    @classmethod
    def from_config(cls, model_cfg, latent_cfg) -> "LatentSettings":
        return cls(
            base_model=model_cfg.name_or_path, mode=latent_cfg.mode, trunk=latent_cfg.trunk,
            proj=latent_cfg.proj, soft_top_k=latent_cfg.soft_top_k, soft_temperature=latent_cfg.soft_temperature,
            k=latent_cfg.k, head=model_cfg.head, lora_r=model_cfg.lora_r,
            lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
            lora_target_modules=model_cfg.lora_target_modules,
        )


class AdapterRouter:
    """Applies one LoRA adapter only where `mask` is 1 (the latent trunk in `two` mode).

    LoRA adds `B(A(x)) * scale`; `B` has no bias, so scaling `A(x)` per position by
    a 0/1 mask switches the whole adapter per position. The mask must be set for
    every forward: a two-trunk forward without routing would silently be wrong.
    """

    def __init__(self, model: nn.Module, adapter_name: str):
        self.mask: torch.Tensor | None = None
        for module in model.modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                module.lora_A[adapter_name].register_forward_hook(self._gate)

    def _gate(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("two-trunk forward without a latent-slot mask; call LatentModel.trunk()")
        return output * self.mask.unsqueeze(-1).to(output.dtype)

    @contextlib.contextmanager
    def route(self, mask: torch.Tensor) -> Iterator[None]:
        self.mask = mask
        try:
            yield
        finally:
            self.mask = None


class LatentModel(nn.Module):
    def __init__(self, base: nn.Module, settings: LatentSettings):
        super().__init__()
        self.base = base
        self.settings = settings
        self.latent_mode = latent_mode(settings.mode)
        hf_model = base.get_base_model() if isinstance(base, PeftModel) else base
        self.backbone = getattr(hf_model, hf_model.base_model_prefix)
        self.lm_head = hf_model.get_output_embeddings()
        self.cache_argument = cache_argument(self.backbone)
        self.kv_unsupported = unsupported(self.backbone)
        """Why the backbone cannot run on rlatent's own KV states (`model/kv_cache.py`); None when it can."""
        self._attention_configs = list({id(c): c for c in [self.backbone.config] + [
            getattr(m, "config", self.backbone.config) for m in attention_modules(self.backbone)]}.values())
        self._attention_layers = len(attention_modules(self.backbone))
        self.logit_softcap = getattr(hf_model.config, "final_logit_softcapping", None)
        embeddings = hf_model.get_input_embeddings().weight
        hidden_size = embeddings.shape[1]
        self.hidden_size = hidden_size  # kept: DeepSpeed ZeRO-3 leaves the weights of idle modules empty
        self.embedding_norm = float(embeddings.detach().float().norm(dim=-1).mean())
        self.start_head = Head(hidden_size, settings.head, prior=0.05)
        self.stop_head = Head(hidden_size, settings.head, prior=1.0 / (settings.k + 1))
        mean = embeddings.detach().mean(0)  # where pause embeddings (and `pause_plus` latents) start
        tokens = TokenSpace(logits=lambda h: self.token_logits(h.to(self.dtype)), embed=self.embed, mean=mean)
        self.proj = build_projection(settings.proj, hidden_size, self.embedding_norm, tokens, settings)
        self.pause = None
        if self.latent_mode.slot_input == "pause":
            self.pause = nn.Parameter(mean.expand(settings.k, -1).clone())
        self.router = AdapterRouter(base, settings.adapter_name) if settings.trunk == "two" else None
        # Heads, projection and pause embeddings train in float32 even on a bf16/fp16 base (like PEFT's
        # adapters); they are tiny, and their inputs and outputs are cast at the boundary.
        self.head_dtype = torch.float32 if embeddings.dtype in (torch.bfloat16, torch.float16) else embeddings.dtype
        for module in (self.start_head, self.stop_head, self.proj):
            module.to(device=embeddings.device, dtype=self.head_dtype)
        if self.pause is not None:
            self.pause.data = self.pause.data.to(device=embeddings.device, dtype=self.head_dtype)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_config(cls, model_cfg, latent_cfg, dtype: torch.dtype, device: torch.device):
        """Load the base model named in the config and wrap it; returns (model, tokenizer)."""
        return cls.from_settings(LatentSettings.from_config(model_cfg, latent_cfg), dtype, device,
                                 model_cfg.cache_dir)

    @classmethod
    def from_settings(cls, settings: LatentSettings, dtype: torch.dtype, device: torch.device,
                      cache_dir: str | None = None):
        """A fresh model of this shape (base + new adapter and heads): what a Ray worker builds before
        the learner's trainable weights are synced into it. Returns (model, tokenizer)."""
        base, tokenizer = load_base_model(settings.base_model, dtype=dtype, cache_dir=cache_dir)
        settings = agree_on_eos(settings, tokenizer, settings.base_model)
        return cls(_with_adapter(base.to(device), settings), settings), tokenizer

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ---- the pieces the forward and the sampler call ------------------------------------

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H) input embeddings."""
        return self.backbone.get_input_embeddings()(input_ids)

    def trunk(self, inputs_embeds, attention_mask, position_ids, latent_slots, cache=None, use_cache=False,
              all_layers=False):
        """Run the transformer on new positions; returns (last-layer hidden states (B, C, H), cache), or with
        `all_layers` a tuple of every layer's output (B, C, H), the last being the last-layer states.

        `attention_mask` (B, past + C) marks real positions (holes = 0); `position_ids`
        (B, C) are explicit so holes do not shift positions; `latent_slots` (B, C)
        selects the latent trunk in `two` mode. The cache is created on first use
        and extended in place.

        With one of rlatent's KV states as `cache` (`model/kv_cache.py`: `PassCache`, `SlotCache`), the state
        attends instead of the model's own attention and cache: `attention_mask` is ignored (the state knows
        which keys each position sees) and the state is returned as the cache.
        """
        route = self.router.route(latent_slots) if self.router is not None else contextlib.nullcontext()
        if isinstance(cache, KVState):
            if self.kv_unsupported:
                raise RuntimeError(f"rlatent's KV states do not cover this model: {self.kv_unsupported}")
            with route, attending(self._attention_configs, cache, self._attention_layers):
                out = self.backbone(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False,
                                    output_hidden_states=all_layers)
            return _states(out, all_layers), cache
        with route:
            out = self.backbone(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=use_cache, output_hidden_states=all_layers, **{self.cache_argument: cache},
            )
        return _states(out, all_layers), getattr(out, self.cache_argument)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V)."""
        logits = self.lm_head(hidden)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def start_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...,) logit of opening a block after each position."""
        return self.start_head(hidden.to(self.head_dtype))

    def stop_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...,) logit of closing the block at each latent slot."""
        return self.stop_head(hidden.to(self.head_dtype))

    def latent_inputs(self, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden state at the previous position (..., H) -> input embedding of a latent slot. `logits`:
        `token_logits(hidden)` when the caller has computed them already (the sampler, to draw a token from
        the same state), so that a projection that reads them (`soft`, `gated`) does not run the LM head again."""
        if logits is not None and getattr(self.proj, "reads_logits", False):
            return self.proj(hidden.to(self.head_dtype), logits).to(self.dtype)
        return self.proj(hidden.to(self.head_dtype)).to(self.dtype)

    def pause_inputs(self, index_in_block: torch.Tensor) -> torch.Tensor:
        """(...) index of each slot within its block -> (..., H) learned pause embeddings."""
        return self.pause[index_in_block.clamp(max=self.pause.shape[0] - 1)].to(self.dtype)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The reference policy: the base with every adapter off."""
        if isinstance(self.base, PeftModel):
            with self.base.disable_adapter():
                yield
        else:
            yield

    # ---- persistence ----------------------------------------------------------------------

    def head_state(self) -> dict[str, torch.Tensor]:
        """Everything trainable that is not in the base/adapter: heads, projection, pause."""
        skip = ("base.", "backbone.", "lm_head.")
        return {name: t for name, t in self.state_dict().items() if not name.startswith(skip)}

    def save(self, directory: Path) -> None:
        """Write adapter (or full weights) + heads + settings into an existing directory."""
        directory = Path(directory)
        if isinstance(self.base, PeftModel):
            self.base.save_pretrained(directory / ADAPTER_DIR)
        else:
            self.base.save_pretrained(directory / FULL_MODEL_DIR)
        save_tensors(directory / HEADS_FILE, self.head_state())
        (directory / SETTINGS_FILE).write_text(json.dumps(asdict(self.settings), indent=2))

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype, device: torch.device, trainable: bool = False,
             cache_dir: str | None = None):
        """Rebuild a saved model around its base; returns (model, tokenizer)."""
        directory = Path(directory)
        settings = read_settings(directory)
        full = directory / FULL_MODEL_DIR
        if full.is_dir():
            base, tokenizer = load_base_model(str(full), dtype=dtype, cache_dir=cache_dir,
                                              tokenizer_from=settings.base_model)
        else:
            base, tokenizer = load_base_model(settings.base_model, dtype=dtype, cache_dir=cache_dir)
        settings = agree_on_eos(settings, tokenizer, str(directory / SETTINGS_FILE))
        base = base.to(device)
        adapter = directory / ADAPTER_DIR
        if adapter.is_dir():
            if settings.adapter_name != "default":  # PEFT saves a named adapter in a subfolder
                adapter = adapter / settings.adapter_name
            try:
                base = PeftModel.from_pretrained(base, adapter, adapter_name=settings.adapter_name,
                                                 is_trainable=trainable)
            except (ValueError, OSError, SafetensorError) as exc:
                raise CheckpointError(f"{adapter}: cannot load the LoRA adapter ({first_line(exc)})") from None
        model = cls(base, settings)
        state = load_tensors(directory / HEADS_FILE)
        expected = model.head_state()
        if set(state) != set(expected):
            raise CheckpointError(f"{directory / HEADS_FILE}: tensors {sorted(set(state) ^ set(expected))} "
                                  "do not match the model's heads")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(f"{directory / HEADS_FILE}: {name} has shape {tuple(tensor.shape)}, "
                                      f"the model needs {tuple(expected[name].shape)}")
        model.load_state_dict(state, strict=False)
        if not trainable:
            model.requires_grad_(False)
        return model, tokenizer


def _states(out, all_layers: bool) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The last layer's hidden states, or every layer's (the embeddings left out; not stacked, so a caller
    that wants a few positions copies only those)."""
    return out.hidden_states[1:] if all_layers else out.last_hidden_state


def cache_argument(backbone: nn.Module) -> str:
    """The name under which this transformers version takes and returns the KV cache: `cache` from 5.24
    on (where `past_key_values` warns and goes away in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(backbone).forward).parameters else "past_key_values"


def read_settings(directory: Path) -> LatentSettings:
    path = directory / SETTINGS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint ({SETTINGS_FILE} missing)")
    try:
        return LatentSettings(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable latent settings ({exc})") from None


def agree_on_eos(settings: LatentSettings, tokenizer, where: str) -> LatentSettings:
    """Make `tokenizer` stop on the EOS the model was trained with; returns the settings with it recorded.

    The recorded EOS wins over the tokenizer's: the same base model can come with another EOS elsewhere (the
    embedded GGUF read by transformers 5.17 made `<|im_start|>` the EOS), and a model trained to end with one
    token, sampled until another, runs to the length cap on every answer.
    """
    if settings.eos_token_id is None:
        return replace(settings, eos_token_id=tokenizer.eos_token_id)
    if not 0 <= settings.eos_token_id < len(tokenizer):
        raise CheckpointError(f"{where}: eos_token_id {settings.eos_token_id} is not a token of the tokenizer of "
                              f"{settings.base_model} ({len(tokenizer)} tokens)")
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(settings.eos_token_id)
    return settings


def _with_adapter(base: nn.Module, settings: LatentSettings) -> nn.Module:
    """Freeze the base and add the LoRA adapter (or leave everything trainable for full fine-tuning)."""
    if settings.lora_r == 0:
        return base
    config = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config, adapter_name=settings.adapter_name)
