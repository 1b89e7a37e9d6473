"""Whether a model uses its latents, measured on held-out written chains.

Phase 1 runs these diagnostics every `sft.eval_every` steps; a run's phase 2 runs
them once more on its final model, so a run says whether reinforcement learning
kept the latents problem-specific (the shuffle gain) and kept blocks at the
marks (start/stop F1), not only whether accuracy moved. The measurement is the
same in both places: teacher-forced all-latent examples of the eval split,
`eval.gain_batches` batches of `sft.batch_size` (`rlatent.sft.losses` defines
the losses and the latent gain).
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from rlatent.config import RunConfig
from rlatent.data.examples import SFTExample
from rlatent.latent.batch import collate
from rlatent.latent.forward import forward
from rlatent.model.latent_model import LatentModel
from rlatent.sft.losses import classifier_scores, latent_gain, latent_norms, sft_loss


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
