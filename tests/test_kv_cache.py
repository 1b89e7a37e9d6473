"""rlatent's own KV states (`rlatent/model/kv_cache.py`) against Hugging Face's caches, in float64.

The packed recurrent forward (`PassCache`) must compute what the padded one against a Hugging Face cache
computes, values and gradients; the sampler's slot cache must give the same trajectories whatever the number
of slots; the float64 invariant itself is `tests/test_invariant.py`.
"""

import pytest
import torch

from rlatent.latent.forward import forward, padded_recurrent_forward, recurrent_forward, shared_prompt_sources
from rlatent.latent.sampler import SamplingSettings, sample
from test_invariant import build_model, sample_batch


def loss_and_grads(model, out, batch):
    loss = (out.hidden.sum(-1) * torch.linspace(-1, 1, batch.input_ids.shape[1], device=out.hidden.device)).pow(2).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("trunk", ["shared", "two"])
def test_packed_forward_equals_padded_forward_with_gradients(tiny_model_dir, trunk):
    model, tokenizer = build_model(tiny_model_dir, trunk, proj="mlp")
    assert model.kv_unsupported is None
    traj = sample_batch(model, tokenizer)
    batch = traj.batch
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if "lora_" in name or name.startswith(("start_head.", "stop_head.", "proj.")):
            param.requires_grad_(True)
    with torch.no_grad():
        model.proj.down.weight.normal_(0, 0.01)
    packed = recurrent_forward(model, batch)
    padded = padded_recurrent_forward(model, batch)
    assert packed.num_passes == padded.num_passes
    assert torch.allclose(packed.hidden, padded.hidden, atol=1e-10, rtol=0)
    assert torch.allclose(packed.slot_inputs, padded.slot_inputs, atol=1e-10, rtol=0)
    packed_loss, packed_grads = loss_and_grads(model, packed, batch)
    padded_loss, padded_grads = loss_and_grads(model, padded, batch)
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-10)
    for a, b in zip(packed_grads, padded_grads):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-8)
    assert any(g.abs().sum() > 0 for g in packed_grads)


@pytest.mark.parametrize("pass_cost", [0.0, 4.0])
def test_packed_forward_is_exact_for_split_plans(tiny_model_dir, pass_cost):
    model, tokenizer = build_model(tiny_model_dir, "shared")
    traj = sample_batch(model, tokenizer)
    with torch.no_grad():
        out = recurrent_forward(model, traj.batch, pass_cost=pass_cost)
    batch = traj.batch
    computed = batch.attention_mask & (batch.positions() < batch.lengths[:, None] - 1)
    assert torch.allclose(out.hidden[computed], traj.hidden[computed], atol=1e-9, rtol=0)


def group_batch(model, tokenizer, group_size=3, seed=1):
    """GRPO's layout: each prompt's rollouts consecutive, the same prompt, their own completions."""
    prompts = [tokenizer(text).input_ids for text in ["Tom has 3 apples", "12 + 7 ="] for _ in range(group_size)]
    torch.manual_seed(seed)
    return sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id,
                  SamplingSettings(max_new_tokens=12, temperature=1.0, decisions="sample", max_latents_per_block=3,
                                   max_blocks=4, max_total_latents=8, record_hidden=True))


def test_rows_sharing_a_prompt_compute_it_once_with_the_same_values_and_gradients(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, "shared", proj="mlp")
    with torch.no_grad():  # a contracting recurrence: float64 rounding is not amplified through the latents
        model.proj.down.weight.normal_(0, 0.01)
    traj = group_batch(model, tokenizer)
    batch = traj.batch
    assert shared_prompt_sources(batch).tolist() == [0, 0, 0, 3, 3, 3]
    assert batch.latent_mask.any() and len({tuple(r) for r in batch.input_ids.tolist()}) == 6  # own completions
    embedded = []
    handle = model.backbone.get_input_embeddings().register_forward_hook(
        lambda module, args, out: embedded.append(args[0].numel()))
    try:
        shared = recurrent_forward(model, batch)
    finally:
        handle.remove()
    prompts = batch.prompt_lengths
    assert sum(embedded) == int(batch.lengths.sum() - prompts[[1, 2, 4, 5]].sum())  # each prompt embedded once
    padded = padded_recurrent_forward(model, batch)  # every row computes its own prompt
    assert torch.allclose(shared.hidden, padded.hidden, atol=1e-10, rtol=0)
    assert torch.allclose(shared.slot_inputs, padded.slot_inputs, atol=1e-10, rtol=0)
    shared_loss, shared_grads = loss_and_grads(model, shared, batch)
    padded_loss, padded_grads = loss_and_grads(model, padded, batch)
    assert torch.allclose(shared_loss, padded_loss, rtol=1e-10)
    # The group's gradients meet at the shared prompt's states, before its RMSNorms, which Llama computes in
    # float32 even in a float64 model: agreement to float32 rounding (1e-6 of each tensor's largest entry);
    # a missing or doubled path through the prompt would be off by its whole share.
    for a, b in zip(shared_grads, padded_grads):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-12
    assert any(g.abs().sum() > 0 for g in shared_grads)


@pytest.mark.parametrize("pass_cost", [0.0, 4.0])
def test_shared_prompts_are_exact_when_the_plan_splits_the_prompt(tiny_model_dir, pass_cost):
    """With a cheap pass the plan caps chunks, the prompt spans passes, and a row whose first latent comes
    right after the prompt needs the shared prompt's last state from the right pass."""
    model, tokenizer = build_model(tiny_model_dir, "shared")
    traj = group_batch(model, tokenizer, group_size=4, seed=3)
    batch = traj.batch
    with torch.no_grad():
        out = recurrent_forward(model, batch, pass_cost=pass_cost)
    computed = batch.attention_mask & (batch.positions() < batch.lengths[:, None] - 1)
    assert torch.allclose(out.hidden[computed], traj.hidden[computed], atol=1e-9, rtol=0)
    assert torch.allclose(out.slot_inputs, padded_recurrent_forward(model, batch, pass_cost).slot_inputs,
                          atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", ["pause", "latent"])
def test_parallel_forward_packed_equals_hugging_face_padded(tiny_model_dir, mode):
    """Known slot inputs (pause embeddings; stored latents, GRPO's `detached`): one packed pass with shared
    prompts gives the values and gradients of one padded Hugging Face pass."""
    model, tokenizer = build_model(tiny_model_dir, "shared", mode=mode)
    batch = group_batch(model, tokenizer).batch
    assert batch.latent_mask.any()
    if mode == "pause":
        inputs = lambda: model.pause_inputs(batch.block_index()) * batch.latent_mask[..., None]  # noqa: E731
    else:
        stored = recurrent_forward(model, batch).slot_inputs
        inputs = lambda: stored  # noqa: E731
    packed = forward(model, batch, "detached", slot_inputs=None if mode == "pause" else inputs())
    assert model.kv_unsupported is None
    model.kv_unsupported = "forced: Hugging Face's padded pass"
    try:
        padded = forward(model, batch, "detached", slot_inputs=None if mode == "pause" else inputs())
    finally:
        model.kv_unsupported = None
    assert packed.num_passes == padded.num_passes == 1
    assert torch.allclose(packed.hidden, padded.hidden, atol=1e-10, rtol=0)
    packed_loss, packed_grads = loss_and_grads(model, packed, batch)
    padded_loss, padded_grads = loss_and_grads(model, padded, batch)
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-10)
    for a, b in zip(packed_grads, padded_grads):  # float32 RMSNorms at the shared prompts, as above
        assert (a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-12
    assert any(g.abs().sum() > 0 for g in packed_grads)


PROMPTS = ["Tom has 3 apples", "12 + 7 =", "She buys 4 pens and 5 more", "A box", "Tom has 3 apples", "12 + 7 ="]


def sample_prompts(model, tokenizer, seed=0, **overrides):
    prompts = [tokenizer(t).input_ids for t in PROMPTS]
    settings = dict(max_new_tokens=10, temperature=1.0, decisions="sample", max_latents_per_block=3, max_blocks=3,
                    max_total_latents=6, record_hidden=True)
    settings.update(overrides)
    torch.manual_seed(seed)
    return sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, SamplingSettings(**settings))


def assert_same(a, b, tolerance=1e-10):
    for name in ("input_ids", "latent_mask", "attention_mask", "prompt_lengths"):
        assert torch.equal(getattr(a.batch, name), getattr(b.batch, name)), name
    assert torch.equal(a.finished, b.finished)
    for name in ("token_logprobs", "start_logprobs", "stop_logprobs", "latent_logprobs", "slot_inputs", "hidden"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=tolerance, rtol=0), name
    assert torch.equal(a.start_decided, b.start_decided) and torch.equal(a.stop_decided, b.stop_decided)


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_continuous_batching_changes_nothing_without_random_draws(tiny_model_dir, slots):
    """Greedy tokens and decisions: the same trajectories whatever the number of slots (refills, moves)."""
    model, tokenizer = build_model(tiny_model_dir, "two")
    greedy = dict(temperature=0.0, decisions="greedy", start_threshold=0.4)
    everything = sample_prompts(model, tokenizer, **greedy)
    assert everything.batch.latent_mask.any()
    assert_same(sample_prompts(model, tokenizer, slots=slots, **greedy), everything)


@pytest.mark.parametrize("settings", [dict(slots=2), dict(slots=4, sync_every=3), dict(sync_every=5),
                                      dict(slots=3, latent_noise_std=0.05, top_p=0.9)])
def test_sampled_rows_in_slots_are_reproducible_and_recomputed_exactly(tiny_model_dir, settings):
    model, tokenizer = build_model(tiny_model_dir, "shared")
    traj = sample_prompts(model, tokenizer, **settings)
    assert_same(sample_prompts(model, tokenizer, **settings), traj, tolerance=0)  # seeded: the very same sample
    counts = traj.counts()
    assert (counts["tokens"] > 0).all() and counts["latents"].sum() > 0
    batch = traj.batch
    noisy = settings.get("latent_noise_std", 0) > 0  # sampled latents are actions: fed back as stored
    with torch.no_grad():
        out = forward(model, batch, slot_inputs=traj.slot_inputs if noisy else None)
    computed = batch.attention_mask & (batch.positions() < batch.lengths[:, None] - 1)
    assert torch.allclose(out.hidden[computed], traj.hidden[computed], atol=1e-9, rtol=0)
    assert torch.allclose(out.slot_inputs, traj.slot_inputs, atol=1e-9, rtol=0)


@pytest.mark.parametrize("mode, noise", [("latent", 0.0), ("latent", 0.05), ("pause", 0.0)])
def test_hugging_face_cache_fallback_samples_the_same(tiny_model_dir, mode, noise):
    """A model rlatent's attention does not cover runs on Hugging Face's cache, with the same draws."""
    model, tokenizer = build_model(tiny_model_dir, "shared", mode=mode)
    ours = sample_prompts(model, tokenizer, latent_noise_std=noise)
    model.kv_unsupported = "forced for the test"
    theirs = sample_prompts(model, tokenizer, latent_noise_std=noise, slots=2)  # (slots ignored: no refills)
    assert_same(theirs, ours, tolerance=1e-9)
    if noise:
        return
    with torch.no_grad():
        padded = forward(model, theirs.batch)  # latent: the padded recurrent forward on HF's cache
    computed = theirs.batch.attention_mask & (theirs.batch.positions() < theirs.batch.lengths[:, None] - 1)
    assert torch.allclose(padded.hidden[computed], theirs.hidden[computed], atol=1e-9, rtol=0)


def test_compile_falls_back_to_eager(tiny_model_dir, monkeypatch):
    """`compile=True` where torch.compile cannot build the step: a warning, then the eager step, same sample."""
    model, tokenizer = build_model(tiny_model_dir, "shared")
    eager = sample_prompts(model, tokenizer)

    def broken(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no compiler here")
        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        compiled = sample_prompts(model, tokenizer, compile=True)
    assert_same(compiled, eager, tolerance=1e-12)


def test_config_options_reach_the_sampler():
    """`grpo.slots`, `grpo.compile` and `eval.compile` are what the rollouts and evaluations sample with."""
    from rlatent.config import load_config

    cfg = load_config(None, ["grpo.slots=3", "grpo.compile=true", "eval.compile=true"])
    rollouts = SamplingSettings.for_rollouts(cfg.latent, cfg.grpo)
    assert rollouts.slots == 3 and rollouts.compile and rollouts.decisions == "sample"
    assert SamplingSettings.from_config(cfg.latent, cfg.eval).compile
    assert not SamplingSettings.from_config(cfg.latent, load_config(None, []).eval).compile
