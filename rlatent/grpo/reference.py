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

Directions. k3's *value* estimates KL(pi||ref), but the gradient of k3 used as a
loss, (1 - ref/pi) grad log pi, is in expectation over pi the gradient of
KL(ref||pi) (Tang & Munos, arXiv 2506.09477); multiplied by the importance ratio
(`grpo.kl_bias_correction`) its gradient is that of KL(pi||ref). What beta
anchors is the gradient, so the exact decision term takes the same direction:
KL(ref||pi) by default, KL(pi||ref) with the bias correction (`kl`). The two
agree to second order near the reference (both are half the Fisher form), so
the logged values of the kinds stay comparable. The Gaussian term is symmetric.

The reference forward swaps the frozen tensors into the trainable parameters
for one no-grad pass and swaps them back, so it costs one copy of the
trainable weights: a few MB with LoRA, a whole second copy of the model with
full fine-tuning (`model.lora_r: 0`).

`base`: the base model with every adapter disabled, the model *before*
phase 1. It has never seen a latent and has no heads, so only token actions
get a KL. Kept for those who want it; it needs LoRA (with full fine-tuning the
"base" would be the policy itself and the KL silently 0, which the config
refuses).

The reference scores the sampled sequence: its tokens, and its decisions at the
places they were taken. Its latents depend on whether they are actions (`outputs`):
with exploration noise they are, and the reference reads the sampled ones like
any other action; without it (`grpo.latent_noise_std: 0`, the published recipe)
the `initial` reference computes its own, from its own hidden states.
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
        """The reference's log-probs and distribution parameters on the sampled sequence.

        Without exploration noise a latent is no action: it is a deterministic function of the hidden
        states (trunk, then projection, or LM head and soft mixture). Fed the policy's stored latents, the
        reference would score the policy's latents, and any drift in how states become latents (a LoRA
        on the trunk, the projection's weights) would cost no KL; the logged KL would be conditional on the
        policy's own latents. So the `initial` reference runs its own recurrent forward (no gradient): its
        latents from its own states, at the trajectory's slots, blocks and decisions, and beta anchors the
        whole policy. With noise the sampled latents are actions, drawn around the policy's mean: the
        reference reads them as it reads sampled tokens, and the Gaussian KL of the means charges the
        drift. `base` keeps the stored latents: it has no projection of its own, so "its" latents would
        pass through the policy's current one.
        """
        own_latents = self.kind == "initial" and latent_noise_std == 0
        with self.active(model):
            return recompute_actions(model, batch, slot_inputs, kinds_mask(mask, self.kinds), temperature,
                                     latent_noise_std, "recurrent" if own_latents else "detached", pass_cost)

    def kl(self, new: PolicyOutput, ref: PolicyOutput, latent_noise_std: float,
           bias_correction: bool) -> torch.Tensor:
        """(B, T, K) KL of each action to the reference, with gradient through `new`; 0 where an action has
        no reference. `bias_correction`: whether the loss multiplies these by the importance ratio
        (`grpo.kl_bias_correction`), which sets the decision term's direction (module docstring)."""
        mask = ref.actions.mask
        logprobs = new.actions.logprobs
        token = masked_kl_k3(logprobs[..., 0], ref.actions.logprobs[..., 0], mask[..., 0])
        start = stop = latent = torch.zeros_like(token)
        if ref.start_logits is not None:
            def decision_kl(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
                pair = (policy, reference) if bias_correction else (reference, policy)
                return bernoulli_kl(*pair).to(token.dtype)

            start = torch.where(mask[..., 1], decision_kl(new.start_logits, ref.start_logits), 0.0)
            stop = torch.where(mask[..., 2], decision_kl(new.stop_logits, ref.stop_logits), 0.0)
        if ref.latent_means is not None:
            gaussian = gaussian_kl(new.latent_means, ref.latent_means, latent_noise_std).to(token.dtype)
            latent = torch.where(mask[..., 3], gaussian, 0.0)
        return torch.stack([token, start, stop, latent], -1)
