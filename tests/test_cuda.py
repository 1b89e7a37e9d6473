"""The same computation on a CUDA device as on the CPU (skipped where CUDA is not available).

Float64 on both devices. Within one device the invariant holds to 1e-9 (the sampler's log-probs are what the
training forward recomputes). Across devices the discrete outcome (tokens, blocks, decisions) must be identical
and the values equal to float32 precision, not float64: Hugging Face computes the rotary cos/sin in float32
whatever the model's dtype, and CUDA's float32 sin/cos differ from the CPU's in the last bits (the first H200
run measured a 7e-8 relative difference in a float64 loss). One end-to-end `rlatent train` runs in the dtype a
user gets by default on a GPU (`auto`: bfloat16).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from rlatent.latent.forward import forward, padded_recurrent_forward, recurrent_forward
from rlatent.run.cli import main
from test_invariant import build_model, recomputed_logprobs, sample_batch
from test_kv_cache import assert_same, loss_and_grads, sample_prompts

ACROSS_DEVICES = dict(rtol=1e-5, atol=1e-6)  # float32 rotary tables (module docstring)

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
GREEDY = dict(temperature=0.0, decisions="greedy", start_threshold=0.4)


def on_cpu(traj):
    return traj.to(torch.device("cpu"))


def assert_same_across_devices(a, b):
    """Discrete outcome identical, values equal to float32 precision."""
    for name in ("input_ids", "latent_mask", "attention_mask", "prompt_lengths"):
        assert torch.equal(getattr(a.batch, name), getattr(b.batch, name)), name
    assert torch.equal(a.finished, b.finished)
    assert torch.equal(a.start_decided, b.start_decided) and torch.equal(a.stop_decided, b.stop_decided)
    for name in ("token_logprobs", "start_logprobs", "stop_logprobs", "slot_inputs", "hidden"):
        assert torch.allclose(getattr(a, name), getattr(b, name), **ACROSS_DEVICES), name


@pytest.mark.parametrize("trunk, mode, proj", [("shared", "latent", "norm_match"), ("two", "latent", "mlp"),
                                               ("shared", "pause", "norm_match"), ("shared", "latent", "soft")])
def test_sampler_on_cuda_matches_cpu(tiny_model_dir, trunk, mode, proj):
    cpu_model, tokenizer = build_model(tiny_model_dir, trunk, mode=mode, proj=proj)
    cuda_model, _ = build_model(tiny_model_dir, trunk, mode=mode, proj=proj, device="cuda")
    expected = sample_prompts(cpu_model, tokenizer, **GREEDY)
    assert expected.batch.latent_mask.any() or mode == "pause"
    for slots in (None, 2):
        assert_same_across_devices(on_cpu(sample_prompts(cuda_model, tokenizer, slots=slots, **GREEDY)), expected)


def test_training_forward_recomputes_the_cuda_sampler(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, "shared", device="cuda")
    traj = sample_batch(model, tokenizer)
    assert traj.batch.latent_mask.any()
    with torch.no_grad():
        out = forward(model, traj.batch)
    computed = traj.batch.attention_mask & (traj.batch.positions() < traj.batch.lengths[:, None] - 1)
    assert torch.allclose(out.hidden[computed], traj.hidden[computed], atol=1e-9, rtol=0)
    token_lp, start_lp, stop_lp = recomputed_logprobs(model, traj, out)
    assert torch.allclose(token_lp, traj.token_logprobs.double(), atol=1e-9, rtol=0)
    started, stopped = traj.start_decided, traj.stop_decided
    assert started.any() and stopped.any()
    assert torch.allclose(start_lp[started], traj.start_logprobs[started].double(), atol=1e-9, rtol=0)
    assert torch.allclose(stop_lp[stopped], traj.stop_logprobs[stopped].double(), atol=1e-9, rtol=0)


def test_packed_forward_and_gradients_on_cuda_match_cpu(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, "shared", proj="mlp")
    batch = sample_batch(model, tokenizer).batch
    results = []
    for device in ("cpu", "cuda"):
        model, _ = build_model(tiny_model_dir, "shared", proj="mlp", device=device)
        on_device = batch.to(model.device)
        model.requires_grad_(False)
        for name, param in model.named_parameters():
            if "lora_" in name or name.startswith(("start_head.", "stop_head.", "proj.")):
                param.requires_grad_(True)
        packed = recurrent_forward(model, on_device)
        padded = padded_recurrent_forward(model, on_device)
        assert torch.allclose(packed.hidden, padded.hidden, atol=1e-10, rtol=0)
        loss, grads = loss_and_grads(model, packed, on_device)
        results.append((loss.item(), [g.cpu() for g in grads]))
    (cpu_loss, cpu_grads), (cuda_loss, cuda_grads) = results
    assert math.isclose(cpu_loss, cuda_loss, rel_tol=1e-6)
    assert any(g.abs().sum() > 0 for g in cuda_grads)
    for a, b in zip(cpu_grads, cuda_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max()))


def test_compiled_decode_step_on_cuda_samples_like_eager(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, "shared", device="cuda", dtype=torch.float32)
    eager = sample_prompts(model, tokenizer, slots=4, **GREEDY)
    compiled = sample_prompts(model, tokenizer, slots=4, compile=True, **GREEDY)
    assert_same(compiled, eager, tolerance=1e-4)


def test_train_on_cuda_in_the_default_dtype(tiny_model_dir, tmp_path, monkeypatch):
    """`rlatent train` (both phases and the evaluations) on CUDA with `model.dtype=auto`."""
    monkeypatch.chdir(REPO)
    status = main(["train", "configs/tiny.yaml", f"model.name_or_path={tiny_model_dir}", "model.device=cuda",
                   "model.dtype=auto", f"output.dir={tmp_path}", "output.name=cuda", "sft.steps=4",
                   "grpo.steps=2", "eval.limit=4"])
    assert status == 0
    rows = [json.loads(line) for line in (tmp_path / "cuda" / "metrics.jsonl").read_text().splitlines()]
    phases = {row["phase"] for row in rows}
    assert {"train", "grpo"} <= phases
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and key in ("loss", "grad_norm", "reward_mean"):
                assert math.isfinite(value), (row["phase"], row.get("step"), key, value)
    resolved = (tmp_path / "cuda" / "config.yaml").read_text()
    assert "cuda" in resolved
