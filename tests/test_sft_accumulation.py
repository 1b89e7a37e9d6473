"""SFT gradient accumulation is invariant: one normaliser over the whole accumulated batch.

The same 8 examples taken as 1 micro-batch of 8, 4 of 2 and 8 of 1 give the same
gradient and the same logged losses (float64, tiny random qwen2 with non-trivial
adapter and heads), with the `auto` start weight and a fixed one. The examples
differ in their number of blocks, so a per-micro-batch token mean or `auto`
weight (the old behaviour) would give different gradients.
"""

import pytest
import torch

from rlatent.config import LatentConfig, ModelConfig, RunConfig
from rlatent.data.splits import sft_examples
from rlatent.data.synthetic import generate_problems
from rlatent.latent.batch import collate
from rlatent.latent.forward import forward
from rlatent.model.latent_model import LatentModel
from rlatent.sft.losses import LossTotals, sft_loss
from rlatent.sft.trainer import SFTTrainer

CPU = torch.device("cpu")
EXAMPLES = 8
SPLITS = [(8, 1), (2, 4), (1, 8)]  # (sft.batch_size, sft.grad_accum)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_model(model_dir):
    torch.manual_seed(0)
    model, tokenizer = LatentModel.from_config(
        ModelConfig(name_or_path=str(model_dir), lora_r=4),
        LatentConfig(mode="latent", k=2), dtype=torch.float64, device=CPU,
    )
    with torch.no_grad():  # non-trivial adapter and heads (LoRA B starts at zero)
        for name, param in model.named_parameters():
            if "lora_B" in name or name.startswith(("start_head.", "stop_head.", "proj.")):
                param.normal_(0, 0.05)
    return model, tokenizer


def accumulated_step(model_dir, batch_size, grad_accum, start_pos_weight):
    """Gradients and metrics of one `SFTTrainer.train_step` over the 8 examples, split as given."""
    model, tokenizer = build_model(model_dir)
    problems = generate_problems(EXAMPLES, seed=0, min_steps=1, max_steps=4, max_operand=9, operators="+-*")
    examples, dropped = sft_examples(problems, tokenizer, LatentConfig(mode="latent", k=2), 512)
    assert (len(examples), dropped) == (EXAMPLES, 0)
    cfg = RunConfig.model_validate({"sft": {"batch_size": batch_size, "grad_accum": grad_accum, "warmup_steps": 0,
                                            "steps": 1, "start_pos_weight": start_pos_weight}})
    trainer = SFTTrainer(cfg, model, tokenizer, examples, examples, run=None, logger=None)
    grads = {}

    def capture(where=None):  # instead of the optimizer step: keep the accumulated gradients
        grads.update({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})
        return 0.0

    trainer.optimizer.step = capture
    micro = [trainer.batch(examples[i : i + batch_size]) for i in range(0, EXAMPLES, batch_size)]
    assert len(micro) == grad_accum
    metrics = trainer.train_step(micro)
    return grads, metrics, model, trainer.batch(examples)


@pytest.mark.parametrize("start_pos_weight", ["auto", 3.0])
def test_accumulated_gradient_is_the_full_batch_gradient(tiny_model_dir, start_pos_weight):
    runs = [accumulated_step(tiny_model_dir, b, a, start_pos_weight) for b, a in SPLITS]
    full_grads, full_metrics, model, whole = runs[0]
    assert full_grads and any(g.abs().sum() > 0 for n, g in full_grads.items() if n.startswith("start_head."))
    # The examples disagree on their own `auto` weights: a per-micro-batch weight would differ.
    own = {LossTotals.of([whole.select(torch.tensor([i]))]).start_weight("auto") for i in range(EXAMPLES)}
    assert len(own) > 1
    for (grads, metrics, _, _), (b, a) in zip(runs[1:], SPLITS[1:]):
        assert grads.keys() == full_grads.keys()
        for name, expected in full_grads.items():
            torch.testing.assert_close(grads[name], expected, rtol=0, atol=1e-10, msg=f"{b}x{a}: {name}")
        for key in ("loss", "lm_loss", "start_loss", "stop_loss"):  # the losses are taken in float32
            assert metrics[key] == pytest.approx(full_metrics[key], rel=1e-6), (b, a, key)
    # The logged values are those of the whole batch in one piece (the evaluation call, its own totals).
    with torch.no_grad():
        out = forward(model, whole, "recurrent")
        loss = sft_loss(model, whole, out, 1.0, 1.0, start_pos_weight)
    assert full_metrics["lm_loss"] == pytest.approx(loss.lm.item(), rel=1e-6)
    assert full_metrics["start_loss"] == pytest.approx(loss.start.item(), rel=1e-6)
    assert full_metrics["stop_loss"] == pytest.approx(loss.stop.item(), rel=1e-6)


def test_totals_count_targets_and_decisions(tiny_tokenizer):
    problems = generate_problems(3, seed=1, min_steps=1, max_steps=3, max_operand=9, operators="+-*")
    examples, _ = sft_examples(problems, tiny_tokenizer, LatentConfig(mode="latent", k=2), 512)
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    start_mask, start_labels, stop_mask, _ = batch.decision_labels()
    totals = LossTotals.of([batch])
    assert totals == LossTotals.of([batch.select(torch.tensor([i])) for i in range(3)])
    assert totals.tokens == int(batch.target_mask().sum())
    assert (totals.start_decisions, totals.stop_decisions) == (int(start_mask.sum()), int(stop_mask.sum()))
    positives = int(start_labels[start_mask].sum())
    assert totals.start_positives == positives > 0
    assert totals.start_weight("auto") == (totals.start_decisions - positives) / positives
    assert totals.start_weight(2.5) == 2.5
