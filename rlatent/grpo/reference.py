"""The reference policy of GRPO's KL term (`grpo.reference`), and the KL of each action kind against it.

`initial` (default): the policy phase 2 starts from, frozen: a copy of every
trainable tensor (LoRA adapter, start/stop heads, projection, pause
embeddings) taken when the learner is built, as TRL's and verl's reference is
the model RL starts from. Every action kind then has a reference, and each
gets its own KL:

- tokens: Schulman's k3 estimator on the sampled token (`grpo.losses.kl_k3`), as TRL;
- start/stop decisions: the exact Bernoulli KL against the frozen heads
  (`policy.bernoulli_kl`): a decision has two outcomes, no estimator needed;
- explored latents: the exact KL between the two isotropic Gaussians,
  |mean - ref mean|^2 / (2 std^2) (`policy.gaussian_kl`).

The reference forward swaps the frozen tensors into the trainable parameters
for one no-grad pass and swaps them back, so it costs one copy of the
trainable weights: a few MB with LoRA, a whole second copy of the model with
full fine-tuning (`model.lora_r: 0`).

`base`: the base model with every adapter disabled, the model *before*
phase 1. It has never seen a latent and has no heads, so only token actions
get a KL. Kept for those who want it; it needs LoRA (with full fine-tuning the
"base" would be the policy itself and the KL silently 0, which the config
refuses).

The reference is evaluated on the sampled sequence, with the stored latents as
inputs, so it scores exactly the actions the policy took.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from rlatent.grpo.losses import masked_kl_k3
from rlatent.latent.batch import LatentBatch
from rlatent.latent.policy import PolicyOutput, bernoulli_kl, gaussian_kl, recompute_actions
from rlatent.latent.trajectory import ACTION_KINDS, kinds_mask
from rlatent.model.latent_model import LatentModel

REFERENCE_KINDS = {"initial": ACTION_KINDS, "base": ("token",)}
"""`grpo.reference` -> the action kinds that have a reference (and so a KL term)."""


class ReferencePolicy:
    def __init__(self, kind: str, model: LatentModel):
        if kind not in REFERENCE_KINDS:
            raise ValueError(f"unknown reference {kind!r}; expected one of {sorted(REFERENCE_KINDS)}")
        self.kind = kind
        self.kinds = REFERENCE_KINDS[kind]
        self.frozen: dict[str, torch.Tensor] = {}
        if kind == "initial":
            self.frozen = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    # ---- the frozen weights --------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen tensors on the CPU (empty for `base`): a resumed run must keep the reference it
        started with, not take the checkpoint's weights as a new one."""
        return {name: t.detach().to("cpu", copy=True) for name, t in self.frozen.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.frozen):
            raise KeyError(f"reference tensors {sorted(set(state) ^ set(self.frozen))[:3]} do not match the model")
        self.frozen = {name: state[name].to(t.device, t.dtype) for name, t in self.frozen.items()}

    @contextlib.contextmanager
    def active(self, model: LatentModel) -> Iterator[None]:
        """Inside, `model` computes the reference policy."""
        if self.kind == "base":
            with model.adapters_disabled():
                yield
            return
        params = dict(model.named_parameters())
        swap = [(params[name], frozen) for name, frozen in self.frozen.items()]
        for param, frozen in swap:
            param.data, frozen.data = frozen.data, param.data
        try:
            yield
        finally:
            for param, frozen in swap:
                param.data, frozen.data = frozen.data, param.data

    # ---- what the loss needs -------------------------------------------------------------------

    @torch.no_grad()
    def outputs(self, model: LatentModel, batch: LatentBatch, slot_inputs: torch.Tensor, mask: torch.Tensor,
                temperature: float, latent_noise_std: float, pass_cost: float | None) -> PolicyOutput:
        """The reference's log-probs and distribution parameters on the sampled sequence (stored latents)."""
        with self.active(model):
            return recompute_actions(model, batch, slot_inputs, kinds_mask(mask, self.kinds), temperature, latent_noise_std,
                                     "detached", pass_cost)

    def kl(self, new: PolicyOutput, ref: PolicyOutput, latent_noise_std: float) -> torch.Tensor:
        """(B, T, K) KL of each action to the reference, with gradient through `new`; 0 where an action has
        no reference."""
        mask = ref.actions.mask
        logprobs = new.actions.logprobs
        token = masked_kl_k3(logprobs[..., 0], ref.actions.logprobs[..., 0], mask[..., 0])
        start = stop = latent = torch.zeros_like(token)
        if ref.start_logits is not None:
            start = torch.where(mask[..., 1], bernoulli_kl(new.start_logits, ref.start_logits).to(token.dtype), 0.0)
            stop = torch.where(mask[..., 2], bernoulli_kl(new.stop_logits, ref.stop_logits).to(token.dtype), 0.0)
        if ref.latent_means is not None:
            gaussian = gaussian_kl(new.latent_means, ref.latent_means, latent_noise_std).to(token.dtype)
            latent = torch.where(mask[..., 3], gaussian, 0.0)
        return torch.stack([token, start, stop, latent], -1)
