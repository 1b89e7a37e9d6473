"""Phase-1 losses: next-token LM loss and the start/stop heads' BCE.

The diagnostics that say whether latents are used live in `rlatent.sft.diagnostics`.

Loss = LM cross-entropy on answer tokens
     + lambda_start * BCE(start head, 1 exactly before each block)
     + lambda_stop  * BCE(stop head, 1 at the last latent of each block).

The start label is rare (a few positives per answer of ~100 positions), so its
BCE takes a positive-class weight: fixed, or `auto` = negatives / positives in
the batch (the balanced weighting of a class-imbalanced BCE).

Every term is a sum over its positions divided by a count over the *whole*
batch of an optimizer step (`LossTotals`: target tokens, start decisions and
their positives, stop decisions), so with gradient accumulation the
micro-batch losses add up to the loss of the whole batch in one piece, and the
`auto` weight is that batch's: 1x8, 2x4 and 8x1 give one gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from rlatent.latent.batch import LatentBatch
from rlatent.latent.forward import ForwardOutput
from rlatent.model.latent_model import LatentModel


@dataclass
class SFTLoss:
    total: torch.Tensor  # scalar, differentiable; the four scalars are float32
    lm: torch.Tensor
    start: torch.Tensor
    stop: torch.Tensor
    start_logits: torch.Tensor  # (N_start,) at every start decision, detached
    start_labels: torch.Tensor  # (N_start,)
    stop_logits: torch.Tensor  # (N_stop,)
    stop_labels: torch.Tensor  # (N_stop,)


def token_losses(model: LatentModel, batch: LatentBatch, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each target token (B, T mask) predicted from the position before; returns (N,)."""
    source = targets[:, 1:]  # (B, T-1): position t-1 predicts token t
    logits = _wide(model.token_logits(hidden[:, :-1][source]))  # (N, V): only where needed
    return F.cross_entropy(logits, batch.input_ids[:, 1:][source], reduction="none")


@dataclass(frozen=True)
class LossTotals:
    """The counts that normalise the SFT loss, over every micro-batch of one optimizer step."""

    tokens: int  # target (answer) tokens: the LM loss is a mean over these
    start_decisions: int  # start-head decisions: the start BCE is a mean over these
    start_positives: int  # start labels that are 1 (the `auto` positive weight)
    stop_decisions: int  # stop-head decisions: the stop BCE is a mean over these

    @classmethod
    def of(cls, batches: Iterable[LatentBatch]) -> "LossTotals":
        """Totals from the masks alone (no forward pass)."""
        tokens = starts = positives = stops = 0
        for batch in batches:
            start_mask, start_labels, stop_mask, _ = batch.decision_labels()
            tokens += int(batch.target_mask()[:, 1:].sum())
            starts += int(start_mask.sum())
            positives += int(start_labels[start_mask].sum())
            stops += int(stop_mask.sum())
        return cls(tokens, starts, positives, stops)

    def start_weight(self, start_pos_weight: float | str) -> float:
        """The start BCE's positive-class weight; `auto` = negatives / positives of the whole batch."""
        if start_pos_weight == "auto":
            return (self.start_decisions - self.start_positives) / max(self.start_positives, 1)
        return float(start_pos_weight)


def sft_loss(model: LatentModel, batch: LatentBatch, out: ForwardOutput, lambda_start: float,
             lambda_stop: float, start_pos_weight: float | str, totals: LossTotals | None = None) -> SFTLoss:
    """The SFT loss of `batch` as its share of a larger batch with `totals` (`LossTotals.of` every
    micro-batch of the step): sums divided by the whole batch's counts, so the shares add up to the
    whole batch's loss. Without `totals` the batch is the whole batch (evaluation)."""
    totals = totals if totals is not None else LossTotals.of([batch])
    lm = token_losses(model, batch, out.hidden, batch.target_mask()).sum() / max(totals.tokens, 1)
    start_mask, start_labels, stop_mask, stop_labels = batch.decision_labels()
    zero = out.hidden.sum() * 0.0
    start_logits = _wide(model.start_logits(out.hidden[start_mask]))
    labels = start_labels[start_mask].to(start_logits.dtype)
    start = zero
    if lambda_start > 0 and model.latent_mode.has_slots and labels.numel():
        weight = torch.as_tensor(totals.start_weight(start_pos_weight), dtype=start_logits.dtype)
        start = F.binary_cross_entropy_with_logits(start_logits, labels, pos_weight=weight,
                                                   reduction="sum") / totals.start_decisions
    stop_logits = _wide(model.stop_logits(out.hidden[stop_mask]))
    slabels = stop_labels[stop_mask].to(stop_logits.dtype)
    stop = zero
    if lambda_stop > 0 and model.latent_mode.has_stop_decisions and slabels.numel():
        stop = F.binary_cross_entropy_with_logits(stop_logits, slabels, reduction="sum") / totals.stop_decisions
    total = lm + lambda_start * start + lambda_stop * stop
    return SFTLoss(total.float(), lm.float(), start.float(), stop.float(), start_logits.detach().float(),
                   labels.float(), stop_logits.detach().float(), slabels.float())


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32: half precision is widened, float64 stays float64 (inside the loss;
    float32 kernels round per element differently for different tensor sizes, which would make
    accumulated float64 gradients differ by ~1e-8)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
