"""Self-distillation in phase 1 (`sft.distill`): the teacher lines up with the student's blocks, every layer's
state at the anchors is exact in each forward, the distance is the documented one, the teacher's states are
targets only, accumulation leaves the gradient unchanged, and a run logs both terms."""

from __future__ import annotations

import pytest
import torch

from rlatent.config import LatentConfig, RunConfig, load_config
from rlatent.data.examples import build_example
from rlatent.data.splits import load_split
from rlatent.data.synthetic import generate_problems
from rlatent.errors import ConfigError
from rlatent.io.run_dir import read_metrics
from rlatent.latent.forward import forward, padded_recurrent_forward, parallel_forward, recurrent_forward
from rlatent.run.cli import main
from rlatent.sft.curriculum import Curriculum, staged_examples
from rlatent.sft import distill
from rlatent.sft.distill import distill_loss, teacher_example
from rlatent.sft.trainer import SFTTrainer
from tests.test_invariant import build_model, sample_batch
from tests.test_sft_accumulation import build_model as build_accumulation_model

CONFIG = "configs/tiny.yaml"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def closing_slots(batch):
    """(B, T) True at the slot that closes each block (it predicts the result written after the block)."""
    _, _, stop_mask, stop_labels = batch.decision_labels()
    return stop_mask & stop_labels.bool()


def blocks(latent_mask):
    """(first slot, last slot) of each block."""
    starts = [i for i, z in enumerate(latent_mask) if z and not latent_mask[i - 1]]
    ends = [i for i, z in enumerate(latent_mask) if z and (i + 1 == len(latent_mask) or not latent_mask[i + 1])]
    return list(zip(starts, ends))


@pytest.mark.parametrize("placement", ["replace", "insert"])
@pytest.mark.parametrize("latent_marks", [1, 2, None])
def test_teacher_anchor_predicts_what_the_block_predicts(tiny_tokenizer, placement, latent_marks):
    problems = generate_problems(12, seed=3, min_steps=2, max_steps=4, max_operand=20, operators="+-*")
    for problem in problems:
        student = build_example(problem, tiny_tokenizer, 2, placement, latent_marks)
        teacher = teacher_example(problem, tiny_tokenizer, latent_marks)
        written = build_example(problem, tiny_tokenizer, 0, "insert")
        # The teacher is the written chain of thought: no slot, the same text.
        assert not any(teacher.latent_mask) and teacher.prompt_length == student.prompt_length
        assert tiny_tokenizer.decode(teacher.input_ids) == tiny_tokenizer.decode(written.input_ids)
        spans = blocks(student.latent_mask)
        assert len(spans) == len(teacher.anchors) == (len(problem.answer.split("<<")) - 1 if latent_marks is None
                                                      else latent_marks)
        for (_, end), anchor, following in zip(spans, teacher.anchors, [s for s, _ in spans[1:]] + [None]):
            # The text after the block, up to the next block (or the end), is the same tokens in both.
            after = student.input_ids[end + 1 : following]
            assert after and teacher.input_ids[anchor + 1 : anchor + 1 + len(after)] == after
        if placement == "replace":  # the teacher still writes the expression the student's block replaced
            assert all("=" in tiny_tokenizer.decode(teacher.input_ids[a : a + 1]) for a in teacher.anchors)


def test_staged_teachers_follow_the_curriculum(tiny_tokenizer):
    cfg = load_config(CONFIG, ["model.name_or_path=x", "latent.placement=replace"])
    problems, _ = load_split(cfg.data, "train", 8)
    staged = staged_examples(problems, tiny_tokenizer, cfg.latent, 512, Curriculum(2, 1), teachers=True)
    assert len(staged.teachers) == len(staged.stages) == 3
    for stage, (students, teachers) in enumerate(zip(staged.stages, staged.teachers)):
        for student, teacher in zip(students, teachers):
            assert len(teacher.anchors) == len(blocks(student.latent_mask)) == min(stage, 2)
    assert staged_examples(problems, tiny_tokenizer, cfg.latent, 512, Curriculum(2, 1)).teachers is None


def test_distill_loss_is_the_spread_scaled_l1():
    teacher = torch.tensor([[[1.0, 3.0]], [[0.0, 4.0]]])  # (L=2, N=1, H=2): stds sqrt(2), sqrt(8)
    student = torch.tensor([[[2.0, 3.0]], [[0.0, 2.0]]], requires_grad=True)
    expected = (0.5 / 2 ** 0.5 + 1.0 / 8 ** 0.5) / 2
    assert distill_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert distill_loss(teacher, teacher).item() == 0.0
    # Two positions are the sum of their losses (so micro-batch shares add up).
    both = distill_loss(torch.cat([student, student], 1), torch.cat([teacher, teacher], 1))
    assert both.item() == pytest.approx(2 * expected, rel=1e-6)
    assert distill_loss(student[:, :0], teacher[:, :0]).item() == 0.0
    # The teacher's states are targets: no gradient reaches them.
    target = teacher.clone().requires_grad_(True)
    distill_loss(student, target).backward()
    assert target.grad is None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("trunk", ["shared", "two"])
def test_every_layer_at_the_anchors_is_exact_in_each_forward(tiny_model_dir, trunk):
    model, tokenizer = build_model(tiny_model_dir, trunk)
    batch = sample_batch(model, tokenizer).batch
    anchors = closing_slots(batch)
    assert anchors.sum() >= 3 and anchors.any(1).sum() >= 2
    packed = recurrent_forward(model, batch, anchors=anchors)
    padded = padded_recurrent_forward(model, batch, anchors=anchors)
    parallel = parallel_forward(model, batch, packed.slot_inputs, anchors=anchors)
    layers = model.backbone.config.num_hidden_layers
    assert packed.layers.shape == (layers, int(anchors.sum()), model.hidden_size)
    for other in (padded, parallel):
        torch.testing.assert_close(other.layers, packed.layers, rtol=0, atol=1e-10)
    # The last layer is the forward's own hidden state there; the first is not it.
    torch.testing.assert_close(packed.layers[-1], packed.hidden[anchors], rtol=0, atol=1e-12)
    assert not torch.allclose(packed.layers[0], packed.layers[-1])
    # Asking for the layers changes nothing else.
    torch.testing.assert_close(recurrent_forward(model, batch).hidden, packed.hidden, rtol=0, atol=0)


def distilled_step(model_dir, batch_size, grad_accum, weight=2.0, curriculum=Curriculum(0, 1), stage=0):
    model, tokenizer = build_accumulation_model(model_dir)
    problems = generate_problems(4, seed=0, min_steps=1, max_steps=3, max_operand=9, operators="+-*")
    latent = LatentConfig(mode="latent", k=2, placement="replace")
    students = staged_examples(problems, tokenizer, latent, 512, curriculum, teachers=True)
    cfg = RunConfig.model_validate({"latent": latent.model_dump(), "sft": {
        "batch_size": batch_size, "grad_accum": grad_accum, "warmup_steps": 0, "steps": 1,
        "curriculum": {"stages": curriculum.stages, "steps_per_stage": curriculum.steps_per_stage},
        "distill": {"weight": weight, "teacher_weight": 0.5}}})
    trainer = SFTTrainer(cfg, model, tokenizer, students.stages[-1], students.stages[-1], run=None, logger=None,
                         earlier_stages=[(s, s) for s in students.stages[:-1]], teachers=students.teachers)
    grads = {}

    def capture(where=None):
        grads.update({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})
        return 0.0

    trainer.optimizer.step = capture
    rows = [list(range(i, i + batch_size)) for i in range(0, 4, batch_size)]
    metrics = trainer.train_step([trainer.batch([students.stages[stage][i] for i in r]) for r in rows],
                                 [trainer.batch([students.teachers[stage][i] for i in r]) for r in rows])
    return grads, metrics


def test_distilled_accumulation_is_the_full_batch_gradient(tiny_model_dir):
    full_grads, full = distilled_step(tiny_model_dir, 4, 1)
    assert full["distill_loss"] > 0 and full["teacher_lm_loss"] > 0
    assert full["loss"] == pytest.approx(full["lm_loss"] + full["start_loss"] + full["stop_loss"]
                                         + 2.0 * full["distill_loss"] + 0.5 * full["teacher_lm_loss"], rel=1e-6)
    for batch_size, grad_accum in ((2, 2), (1, 4)):
        grads, metrics = distilled_step(tiny_model_dir, batch_size, grad_accum)
        assert grads.keys() == full_grads.keys()
        for name, expected in full_grads.items():
            torch.testing.assert_close(grads[name], expected, rtol=0, atol=1e-10, msg=name)
        for key in ("distill_loss", "teacher_lm_loss"):
            assert metrics[key] == pytest.approx(full[key], rel=1e-6)


def test_a_written_stage_takes_the_teacher_loss_from_the_students_forward(tiny_model_dir, monkeypatch):
    """A curriculum's written stage has no block: the teacher reads exactly what the student reads, so its
    loss comes from the student's forward (one forward per micro-batch) with the loss and gradient of two."""
    written = {"curriculum": Curriculum(1, 1), "stage": 0}
    calls = []
    monkeypatch.setattr(distill, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    reused_grads, reused = distilled_step(tiny_model_dir, 2, 2, **written)
    assert calls == [] and reused["distill_loss"] == 0 and reused["teacher_lm_loss"] > 0
    monkeypatch.setattr(distill, "reads_the_same", lambda student, teacher: False)
    grads, metrics = distilled_step(tiny_model_dir, 2, 2, **written)
    assert len(calls) == 2  # the teacher's own forward, once per micro-batch
    assert metrics["teacher_lm_loss"] == pytest.approx(reused["teacher_lm_loss"], rel=1e-9)
    assert metrics["lm_loss"] == pytest.approx(reused["teacher_lm_loss"], rel=1e-6)  # the same chain, the same loss
    assert reused_grads.keys() == grads.keys() and any(bool(g.abs().sum() > 0) for g in grads.values())
    for name, expected in grads.items():
        torch.testing.assert_close(reused_grads[name], expected, rtol=1e-4, atol=1e-7)  # float32: summation order
    distilled_step(tiny_model_dir, 2, 2, curriculum=Curriculum(1, 1), stage=1)
    assert len(calls) == 4  # a stage with blocks never reuses


def test_the_distillation_term_reaches_the_adapter(tiny_model_dir):
    """Doubling the distillation weight changes the adapter's gradient: the term is trained, not just logged."""
    twice, _ = distilled_step(tiny_model_dir, 4, 1, weight=2.0)
    once, _ = distilled_step(tiny_model_dir, 4, 1, weight=1.0)
    lora = [name for name in twice if "lora_" in name]
    assert lora and any(not torch.allclose(twice[name], once[name]) for name in lora)


@pytest.mark.parametrize("override, named", [("latent.mode=none", "mode 'none'"),
                                             ("latent.placement=step", "placement 'step'")])
def test_distillation_needs_blocks_at_the_marks(repo_root, override, named):
    with pytest.raises(ConfigError, match=f"sft.distill needs latent slots.*{named}"):
        load_config(CONFIG, ["model.name_or_path=x", "sft.distill.weight=1", override])


def test_a_distilled_curriculum_run_logs_both_terms(repo_root, tiny_model_dir, tmp_path):
    assert main(["sft", CONFIG, f"model.name_or_path={tiny_model_dir}", "sft.steps=4", "sft.distill.weight=1",
                 "sft.curriculum.stages=1", "sft.curriculum.steps_per_stage=2", "latent.placement=replace",
                 "eval.limit=2", f"output.dir={tmp_path}", "output.name=run"]) == 0
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["phase"] == "train"]
    assert [r["curriculum_stage"] for r in train] == [0, 0, 1, 1]
    assert all(r["distill_loss"] == 0 for r in train[:2])  # the written stage has no block to teach
    assert all(r["distill_loss"] > 0 and r["teacher_lm_loss"] > 0 for r in train[2:])
