"""Whether a model uses its latents, measured on held-out written chains.

Phase 1 runs these diagnostics every `sft.eval_every` steps; a run's phase 2 runs
them once more on its final model, so a run says whether reinforcement learning
kept the latents problem-specific (the shuffle gain) and kept blocks at the
marks (start/stop F1), not only whether accuracy moved; `rlatent diagnose` runs
them on any checkpoint. The measurement is the same in every place:
teacher-forced all-latent examples of the eval split, `eval.gain_batches`
batches of `sft.batch_size` (`rlatent.sft.losses` defines the losses).

*Latent gain* is the next-step loss (the tokens right after each block up to
the end of the line) with the latents replaced, minus that loss with the real
latents. Replacements: zeros, Gaussian noise of each latent's own norm, and
the batch's latents shuffled across rows. A gain near zero for every
replacement means the model ignores its latents: the failure a public
post-mortem of this very plan ran into.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rlatent.config import RunConfig
from rlatent.data.examples import SFTExample
from rlatent.latent.batch import LatentBatch, collate
from rlatent.latent.forward import ForwardOutput, forward, parallel_forward
from rlatent.model.latent_model import LatentModel
from rlatent.model.projections import PausePlusState, SoftTokens
from rlatent.sft.curriculum import Curriculum, staged_examples
from rlatent.sft.losses import sft_loss, token_losses

GAIN_REPLACEMENTS = ("zeros", "noise", "shuffle")


def held_out_examples(problems: list, tokenizer, cfg: RunConfig) -> list[list[SFTExample]]:
    """The held-out problems' examples at every curriculum stage, as phase 1 evaluates them; the last, all
    latent, is what the diagnostics of a finished phase read (phase 1's last, phase 2's, `rlatent diagnose`),
    so that all of them measure the same examples."""
    return staged_examples(problems, tokenizer, cfg.latent, cfg.data.max_length, Curriculum.from_config(cfg.sft),
                           split_steps=cfg.sft.compress.split_steps,
                           tokens_per_latent=cfg.sft.compress.tokens_per_latent).stages


@torch.no_grad()
def latent_diagnostics(model: LatentModel, examples: list[SFTExample], pad_id: int, cfg: RunConfig, where: str,
                       batches: int | None = None) -> dict[str, float]:
    """LM loss, start/stop F1, latent gains and norms over the first `batches` (default `eval.gain_batches`)
    batches of `examples`, averaged over batches; `latents_ignored` is 1.0 when every gain is below
    `eval.gain_warn_below`, and then a warning naming `where` ("step 60") goes to stderr."""
    model.eval()
    size = cfg.sft.batch_size
    chunks = [examples[i : i + size] for i in range(0, len(examples), size)][: batches or cfg.eval.gain_batches]
    sums: dict[str, float] = {}
    start_logits, start_labels, stop_logits, stop_labels = [], [], [], []
    for index, chunk in enumerate(chunks):
        batch = collate(chunk, pad_id).to(model.device)
        out = forward(model, batch, "recurrent", pass_cost=cfg.latent.pass_cost)
        loss = sft_loss(model, batch, out, 1.0, 1.0, cfg.sft.start_pos_weight)
        values = {"lm_loss": loss.lm.item(), "start_loss": loss.start.item(), "stop_loss": loss.stop.item()}
        values.update(latent_gain(model, batch, out, seed=cfg.seed + index))
        values.update(latent_norms(model, out, batch))
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value / len(chunks)
        start_logits.append(loss.start_logits)
        start_labels.append(loss.start_labels)
        stop_logits.append(loss.stop_logits)
        stop_labels.append(loss.stop_labels)
    latent = cfg.latent
    if model.latent_mode.has_slots:
        sums.update(classifier_scores(torch.cat(start_logits), torch.cat(start_labels), latent.start_threshold, "start"))
    if model.latent_mode.has_stop_decisions:
        sums.update(classifier_scores(torch.cat(stop_logits), torch.cat(stop_labels), latent.stop_threshold, "stop"))
    gains = [v for k, v in sums.items() if k.startswith("latent_gain_")]
    if gains:
        sums["latents_ignored"] = float(max(gains) < cfg.eval.gain_warn_below)
        if sums["latents_ignored"]:
            tqdm.write(f"WARNING {where}: latent gain is ~0 ({', '.join(f'{g:+.4f}' for g in gains)} nats "
                       "for zeros/noise/shuffle): the model is IGNORING its latents", file=sys.stderr)
    return sums


def classifier_scores(logits: torch.Tensor, labels: torch.Tensor, threshold: float, name: str) -> dict[str, float]:
    """Precision, recall and F1 of thresholded decisions (the decisions greedy sampling takes)."""
    predicted = torch.sigmoid(logits) > threshold
    actual = labels > 0.5
    tp = (predicted & actual).sum().item()
    precision = tp / max(predicted.sum().item(), 1)
    recall = tp / max(actual.sum().item(), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {f"{name}_precision": precision, f"{name}_recall": recall, f"{name}_f1": f1}


def replaced_latents(slot_inputs: torch.Tensor, latent_mask: torch.Tensor, how: str,
                     generator: torch.Generator) -> torch.Tensor:
    """(B, T, H) latents with those at latent slots replaced: `zeros`, `noise` (same norm) or `shuffle`."""
    vectors = slot_inputs[latent_mask]  # (N, H)
    if how == "zeros":
        replaced = torch.zeros_like(vectors)
    elif how == "noise":
        noise = torch.randn(vectors.shape, generator=generator, dtype=torch.float32).to(vectors)
        replaced = noise / noise.norm(dim=-1, keepdim=True) * vectors.norm(dim=-1, keepdim=True)
    else:  # shuffle: each row takes the latents of another row (a random cyclic shift over rows)
        rows = latent_mask.nonzero()[:, 0]
        owners = rows.unique()
        if owners.numel() < 2:
            return slot_inputs.clone()  # nothing to shuffle with: no replacement
        shift = int(torch.randint(1, owners.numel(), (1,), generator=generator))
        donors = owners.roll(-shift)
        pieces = []
        for owner, donor in zip(owners.tolist(), donors.tolist()):
            mine, theirs = (rows == owner).sum().item(), vectors[rows == donor]
            pieces.append(theirs[torch.arange(mine) % len(theirs)])
        replaced = torch.cat(pieces)
    out = slot_inputs.clone()
    out[latent_mask] = replaced
    return out


@torch.no_grad()
def latent_gain(model: LatentModel, batch: LatentBatch, out: ForwardOutput, seed: int) -> dict[str, float]:
    """Next-step loss with real latents and its increase under each replacement (nats)."""
    step_tokens = batch.next_step_mask & batch.target_mask()
    if not model.latent_mode.has_slots or not batch.latent_mask.any() or not step_tokens.any():
        return {}
    real = token_losses(model, batch, out.hidden, step_tokens).mean().item()
    metrics = {"next_step_loss": real}
    generator = torch.Generator().manual_seed(seed)
    for how in GAIN_REPLACEMENTS:
        inputs = replaced_latents(out.slot_inputs, batch.latent_mask, how, generator)
        replaced = parallel_forward(model, batch, inputs)
        metrics[f"latent_gain_{how}"] = token_losses(model, batch, replaced.hidden, step_tokens).mean().item() - real
    return metrics


def latent_norms(model: LatentModel, out: ForwardOutput, batch: LatentBatch) -> dict[str, float]:
    """Mean norm of latent inputs vs token embeddings: a scale mismatch is a common silent failure. With
    `latent.proj: pause_plus`, also `latent_state_share`: the mean |z - c| / |z| of the latents, the part
    the state adds to the learned constant (0 at initialisation: the latent is still the pause input).
    With `latent.proj: soft`, also `soft_max_weight`: the mean largest weight of each latent's mixture
    (near 1: the "soft" latent is a one-hot token in disguise)."""
    if not batch.latent_mask.any():
        return {}
    slots = out.slot_inputs[batch.latent_mask].float()
    norms = {"latent_norm": slots.norm(dim=-1).mean().item(), "embedding_norm": model.embedding_norm}
    if isinstance(model.proj, PausePlusState):
        added = (slots - model.proj.constant.detach().float()).norm(dim=-1) / slots.norm(dim=-1).clamp_min(1e-6)
        norms["latent_state_share"] = added.mean().item()
    if isinstance(model.proj, SoftTokens):
        fed_back = F.pad(out.hidden, (0, 0, 1, 0))[:, :-1][batch.latent_mask]  # the state each latent was read from
        weights, _ = model.proj.top_tokens(fed_back.to(model.head_dtype))
        norms["soft_max_weight"] = weights.max(-1).values.float().mean().item()
    return norms
