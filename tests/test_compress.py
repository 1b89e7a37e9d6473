"""Compressed-chain training (`sft.compress`, after CoLaR): each block stands for its mark's written chain,
cut into one piece per slot; in phase 1 a slot is fed its piece's mean embedding and the state before it
predicts the piece; a run trains with it and evaluates on its own fed-back mixtures."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from rlatent.config import load_config
from rlatent.data.examples import block_chains, block_spans, build_example
from rlatent.data.marks import operations, parse_marks
from rlatent.data.synthetic import generate_problems
from rlatent.errors import ConfigError, DataError
from rlatent.data.gsm8k import Problem
from rlatent.io.run_dir import read_metrics
from rlatent.latent.batch import collate
from rlatent.latent.forward import forward
from rlatent.model.latent_model import LatentModel, LatentSettings
from rlatent.run.cli import main
from rlatent.sft.compress import (INPUT_ONLY, chain_inputs, chain_pieces, compress_example, compress_loss,
                                  decoder_loss)
from rlatent.sft.losses import token_losses

CONFIG = "configs/tiny.yaml"
ANSWER = ("Raj then has (9 - 8) x 3 = <<(9-8)*3=3>>3 marbles.\n"
          "After that, she has 13 x 5 - 6 = $<<13*5-6=59>>59.\n#### 59")


def test_block_chains_are_the_text_each_replace_block_stands_for():
    assert block_chains(ANSWER, 1) == [" (9 - 8) x 3 =", " 13 x 5 - 6 ="]
    assert block_chains(ANSWER, 2) == [" 9 - 8 = 1, 1 * 3 =", " 13 * 5 = 65, 65 - 6 ="]
    assert block_chains(ANSWER, 2, latent_marks=1) == [" 9 - 8 = 1, 1 * 3 ="]
    assert block_chains("He pays <<3*4+2=14>>14 dollars.", 1) == [" 3*4+2 ="]  # nothing written: the mark's own
    assert block_chains("It is 10 / 3 * 3 = <<10/3*3=10>>10.", 2) == [" 10 / 3 * 3 ="]  # 10/3 is no decimal


@pytest.mark.parametrize("tokens, slots, pieces", [
    ([1, 2, 3, 4, 5], 2, [(1, 2), (3, 4, 5)]),
    ([1, 2, 3, 4, 5], 3, [(1,), (2, 3), (4, 5)]),
    ([1, 2, 3], 3, [(1,), (2,), (3,)]),
    # Fewer tokens than slots: a slot per token, then fillers fed the last token again but no loss target.
    ([7, 8], 4, [(7,), (8,), (INPUT_ONLY - 8,), (INPUT_ONLY - 8,)]),
])
def test_chain_pieces(tokens, slots, pieces):
    assert chain_pieces(tokens, slots) == pieces


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("latent_marks", [1, None])
def test_each_block_stands_for_its_marks_chain(tiny_tokenizer, k, split, latent_marks):
    problems = generate_problems(12, seed=5, min_steps=1, max_steps=3, multi_op=0.7, allow_zero=False)
    split_somewhere = False
    for problem in problems:
        student = build_example(problem, tiny_tokenizer, k, "replace", latent_marks)
        example = compress_example(problem, student, tiny_tokenizer, latent_marks, split)
        assert example.input_ids == student.input_ids and example.latent_mask == student.latent_mask
        assert len(example.slot_chains) == sum(student.latent_mask)
        pieces = iter(example.slot_chains)
        marks = parse_marks(problem.answer)[:latent_marks]
        for (start, end), mark in zip(block_spans(student.latent_mask), marks, strict=True):
            written = [token for _ in range(start, end) for token in next(pieces)]
            text = tiny_tokenizer.decode(written)
            steps = operations(mark.expression)
            if split >= 2 and len(steps) >= 2:  # every partial result is in some slot's piece
                split_somewhere = True
                assert all(f"= {step.value}," in text for step in steps[:-1])
            assert text.rstrip().endswith("=")
    assert split_somewhere == (split >= 2)


def test_back_to_back_marks_are_a_data_error(tiny_tokenizer):
    problem = Problem("He has 2 and 3.", "He has <<2+3=5>><<5*2=10>>10.\n#### 10", "10", "train:7")
    student = build_example(problem, tiny_tokenizer, 2, "replace")
    with pytest.raises(DataError, match="train:7: 1 latent blocks for 2 converted marks"):
        compress_example(problem, student, tiny_tokenizer, None, 1)


@pytest.fixture
def tiny_latent_model(tiny_model_dir):
    settings = LatentSettings(base_model=str(tiny_model_dir), mode="latent", k=3, proj="soft")
    model, tokenizer = LatentModel.from_settings(settings, torch.float32, torch.device("cpu"))
    return model.eval(), tokenizer


def test_compressed_embeddings_are_the_pieces_mean(tiny_latent_model):
    model, tokenizer = tiny_latent_model
    problems = generate_problems(4, seed=3, min_steps=1, max_steps=2, multi_op=1.0, allow_zero=False)
    examples = [compress_example(p, build_example(p, tokenizer, 3, "replace"), tokenizer, None, 3)
                for p in problems]
    batch = collate(examples, tokenizer.pad_token_id)
    inputs = chain_inputs(model, batch)
    assert not inputs[~batch.latent_mask].any() and (batch.chain_ids[~batch.latent_mask] == -1).all()
    for row, example in enumerate(examples):
        slots = [i for i, z in enumerate(example.latent_mask) if z]
        for slot, piece in zip(slots, example.slot_chains, strict=True):
            assert torch.allclose(inputs[row, slot], model.embed(torch.tensor(piece)).mean(0), atol=1e-6)


def test_one_token_pieces_read_as_the_written_chain(tiny_latent_model):
    """With a slot per token of the chain, the teacher-forced pass is the written chain's forward, and the
    loss is exactly its next-token loss on the chain's tokens: each piece is predicted from the state before
    its slot, in order (an off-by-one in either fails this)."""
    model, tokenizer = tiny_latent_model
    for problem in generate_problems(3, seed=8, min_steps=1, max_steps=1, multi_op=1.0, allow_zero=False):
        chain = tokenizer.encode(block_chains(problem.answer, 2)[0], add_special_tokens=False)
        student = build_example(problem, tokenizer, len(chain), "replace")
        batch = collate([compress_example(problem, student, tokenizer, None, 2)], tokenizer.pad_token_id)
        slots = batch.latent_mask.clone()
        written = replace(batch, input_ids=batch.input_ids.masked_scatter(slots, torch.tensor(chain)),
                          latent_mask=torch.zeros_like(slots), chain_ids=None)
        with torch.no_grad():
            forced = forward(model, batch, slot_inputs=chain_inputs(model, batch))
            reference = forward(model, written)
            assert forced.num_passes == 1 and torch.allclose(forced.hidden, reference.hidden, atol=1e-5)
            expected = token_losses(model, written, reference.hidden, slots).sum()
            assert compress_loss(model, batch, forced).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("proj", ["norm_match", "soft"])
def test_the_decoder_writes_each_slots_piece_from_its_latent_alone(tiny_model_dir, proj):
    """SIM-CoT's loss of a batch (rows of different lengths, slots with pieces of different lengths, fillers)
    is, slot by slot, the model's own next-token loss of the sequence [latent, piece[:-1]] against the piece,
    averaged over the piece; its gradient reaches the states the latents are made from."""
    settings = LatentSettings(base_model=str(tiny_model_dir), mode="latent", k=5, proj=proj)
    model, tokenizer = LatentModel.from_settings(settings, torch.float64, torch.device("cpu"))
    model.eval()
    problems = generate_problems(3, seed=5, min_steps=1, max_steps=2, multi_op=1.0, allow_zero=False)
    examples = [compress_example(p, build_example(p, tokenizer, k, "replace"), tokenizer, None, 2)
                for p, k in zip(problems, (2, 5, 30))]  # several tokens a slot, about one, fillers
    batch = collate(examples, tokenizer.pad_token_id)
    out = forward(model, batch)
    assert (batch.chain_ids[batch.latent_mask][:, 0] <= INPUT_ONLY).any()  # some filler slots
    assert len({int(n) for n in (batch.chain_ids[batch.latent_mask] >= 0).sum(1)}) > 2  # pieces of 0, 1, 2+ tokens
    expected = torch.zeros((), dtype=torch.float64)
    for row, position in batch.latent_mask.nonzero().tolist():
        piece = [t for t in batch.chain_ids[row, position].tolist() if t >= 0]
        if not piece:
            continue
        latent = model.latent_inputs(out.hidden[row, position - 1])
        inputs = torch.cat([latent[None], model.embed(torch.tensor(piece[:-1], dtype=torch.long))])[None]
        hidden = model.backbone(inputs_embeds=inputs).last_hidden_state[0]
        expected = expected + F.cross_entropy(model.token_logits(hidden).double(), torch.tensor(piece))
    loss = decoder_loss(model, batch, out)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    hidden = out.hidden.detach().requires_grad_()
    decoder_loss(model, batch, replace(out, hidden=hidden)).backward()
    before = (batch.latent_mask & (batch.chain_ids[..., 0] >= 0))[:, 1:]  # before each slot with a piece
    assert hidden.grad[:, :-1][before].abs().sum(-1).gt(0).all()
    assert not hidden.grad[:, :-1][~before].any()  # fillers and the text: nothing


@pytest.mark.parametrize("overrides, message", [
    (["latent.mode=none"], "sft.compress needs slots standing for the removed expressions"),
    (["latent.placement=insert"], "sft.compress needs slots standing for the removed expressions"),
    (["latent.proj=mlp"], "sft.compress needs slots standing for the removed expressions"),
    (["sft.distill.weight=1"], "sft.compress and sft.distill are alternatives"),
    (["sft.compress.weight=0", "sft.compress.decoder_weight=1", "sft.distill.weight=1"],
     "sft.compress and sft.distill are alternatives"),
    (["sft.compress.weight=0", "sft.compress.decoder_weight=1", "latent.mode=pause"],
     "sft.compress.decoder_weight decodes each fed-back latent"),
    (["sft.compress.split_steps=true", "latent.k=1"], "sft.compress.split_steps needs"),
])
def test_config_errors(repo_root, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, ["model.name_or_path=x", "latent.mode=latent", "latent.placement=replace",
                             "latent.proj=soft", "sft.compress.weight=1", *overrides])


@pytest.mark.parametrize("forcing", ["true", "false"])
def test_a_compressed_chain_run_trains(repo_root, tiny_model_dir, tmp_path, forcing, monkeypatch):
    import rlatent.sft.trainer as trainer

    fed = []  # the batches phase 1 fed compressed embeddings: every latent one with teacher forcing, none without
    monkeypatch.setattr(trainer, "chain_inputs", lambda model, batch: fed.append(batch) or chain_inputs(model, batch))
    assert main(["sft", CONFIG, f"model.name_or_path={tiny_model_dir}", "sft.steps=2", "sft.compress.weight=1",
                 f"sft.compress.teacher_forcing={forcing}",
                 "sft.compress.split_steps=true", "latent.mode=latent", "latent.placement=replace", "latent.k=3",
                 "latent.proj=soft", "data.synthetic.multi_op=1", "eval.limit=2", f"output.dir={tmp_path}",
                 "output.name=run"]) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if r["phase"] == "train"]
    assert len(train) == 2 and all(r["compress_loss"] > 0 for r in train)
    assert len(fed) == (2 if forcing == "true" else 0)
    assert [r for r in records if r["phase"] == "eval" and "latent_gain_shuffle" in r]


def test_a_sim_cot_run_trains(repo_root, tiny_model_dir, tmp_path):
    """The SIM-CoT row: state latents (`norm_match`) with the decoder loss alone, at two chain tokens a slot,
    through a curriculum whose first stage converts no mark (no slots, no loss)."""
    assert main(["sft", CONFIG, f"model.name_or_path={tiny_model_dir}", "sft.steps=2", "sft.compress.weight=0",
                 "sft.curriculum.stages=1", "sft.curriculum.steps_per_stage=1",
                 "sft.compress.decoder_weight=1", "sft.compress.tokens_per_latent=2", "sft.compress.split_steps=true",
                 "latent.mode=latent", "latent.placement=replace", "latent.k=3", "latent.proj=norm_match",
                 "data.synthetic.multi_op=1", "eval.limit=2", f"output.dir={tmp_path}", "output.name=run"]) == 0
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["phase"] == "train"]
    assert len(train) == 2 and "compress_loss" not in train[0]
    assert [r["decoder_loss"] > 0 for r in train] == [False, True]
