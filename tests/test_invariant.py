"""The invariant: the training forward recomputes exactly what the sampler saw.

Float64, both trunk modes, several blocks of different lengths per row at
different places in one batch. Sampling with random decisions and tokens
makes the rows diverge; the tiny model's heads are biased towards opening and
continuing blocks so every row carries several blocks.
"""

import pytest
import torch
import torch.nn.functional as F

from rlatent.config import LatentConfig, ModelConfig
from rlatent.latent.forward import forward, plan_waves
from rlatent.model.latent_model import LatentModel
from rlatent.latent.sampler import SamplingSettings, sample
from rlatent.sft.diagnostics import latent_norms

TOLERANCE = 1e-9


def build_model(model_dir, trunk, mode="latent", proj="norm_match", device="cpu", dtype=torch.float64):
    torch.manual_seed(0)  # initialised on the CPU (the same weights for every `device`), then moved
    model, tokenizer = LatentModel.from_config(
        ModelConfig(name_or_path=str(model_dir), lora_r=4), LatentConfig(mode=mode, trunk=trunk, proj=proj, k=2),
        dtype=dtype, device=torch.device("cpu"),
    )
    # Make the adapter and heads non-trivial (LoRA B starts at zero) and the heads eager to use latents.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "head" in name:
                param.normal_(0, 0.05)
        model.start_head.net.bias.fill_(-0.5)
        model.stop_head.net.bias.fill_(-0.5)
    return model.to(device).eval(), tokenizer


def sample_batch(model, tokenizer, seed=0, **settings):
    prompts = [tokenizer(text).input_ids for text in ["Tom has 3 apples", "12 + 7 =", "She buys 4 pens and 5 more"]]
    torch.manual_seed(seed)
    base = dict(max_new_tokens=12, temperature=1.0, decisions="sample", max_latents_per_block=3,
                max_blocks=4, max_total_latents=8, record_hidden=True)
    base.update(settings)
    return sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, SamplingSettings(**base))


def recomputed_logprobs(model, traj, out, temperature=1.0):
    batch = traj.batch
    hidden = out.hidden
    logits = model.token_logits(hidden[:, :-1]) / temperature
    token_lp = torch.log_softmax(logits, -1).gather(2, batch.input_ids[:, 1:, None])[..., 0]
    token_lp = F.pad(token_lp, (1, 0)) * batch.target_mask()
    start_logit, stop_logit = model.start_logits(hidden), model.stop_logits(hidden)
    start_mask, start_labels, stop_mask, stop_labels = batch.decision_labels()
    start_lp = F.logsigmoid(torch.where(start_labels.bool(), start_logit, -start_logit))
    stop_lp = F.logsigmoid(torch.where(stop_labels.bool(), stop_logit, -stop_logit))
    return token_lp, start_lp, stop_lp


@pytest.mark.parametrize("trunk", ["shared", "two"])
@pytest.mark.parametrize("gradient", ["recurrent", "detached"])
def test_training_forward_matches_sampler(tiny_model_dir, trunk, gradient):
    model, tokenizer = build_model(tiny_model_dir, trunk)
    traj = sample_batch(model, tokenizer)
    batch = traj.batch
    counts = traj.counts()
    assert (counts["blocks"] >= 2).all(), counts  # several blocks per row ...
    block_lengths = set()
    for row in batch.latent_mask:
        run = 0
        for is_latent in row.tolist() + [False]:
            if is_latent:
                run += 1
            elif run:
                block_lengths.add(run)
                run = 0
    assert len(block_lengths) >= 2  # ... of different lengths
    assert len({tuple(row.nonzero().flatten().tolist()) for row in batch.latent_mask}) == 3  # at different places

    stored = traj.slot_inputs if gradient == "detached" else None
    out = forward(model, batch, gradient=gradient, slot_inputs=stored)
    # The sampler never runs a row's final token (nothing follows it); every other position it computed.
    computed = batch.attention_mask & (batch.positions() < batch.lengths[:, None] - 1)
    assert torch.allclose(out.hidden[computed], traj.hidden[computed], atol=TOLERANCE, rtol=0)
    assert torch.allclose(out.slot_inputs, traj.slot_inputs, atol=TOLERANCE, rtol=0)

    token_lp, start_lp, stop_lp = recomputed_logprobs(model, traj, out)
    assert torch.allclose(token_lp, traj.token_logprobs.double(), atol=TOLERANCE, rtol=0)
    decided = traj.start_decided
    assert decided.sum() > 0 and traj.stop_decided.sum() > 0
    assert torch.allclose(start_lp[decided], traj.start_logprobs[decided].double(), atol=TOLERANCE, rtol=0)
    stop_decided = traj.stop_decided
    assert torch.allclose(stop_lp[stop_decided], traj.stop_logprobs[stop_decided].double(), atol=TOLERANCE, rtol=0)
    # Every free decision sits where the batch's own labels say a decision is made.
    start_mask, _, stop_mask, _ = batch.decision_labels()
    assert not (decided & ~start_mask).any() and not (stop_decided & ~stop_mask).any()


def test_recurrent_forward_matches_plain_forward_without_latents(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, "shared")
    traj = sample_batch(model, tokenizer, max_total_latents=0)
    assert not traj.batch.latent_mask.any()
    out = forward(model, traj.batch)
    batch = traj.batch
    computed = batch.attention_mask & (batch.positions() < batch.lengths[:, None] - 1)
    assert torch.allclose(out.hidden[computed], traj.hidden[computed], atol=TOLERANCE)


def test_gradient_flows_through_the_recurrence(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, "shared", proj="mlp")
    traj = sample_batch(model, tokenizer)
    with torch.no_grad():
        model.proj.down.weight.normal_(0, 0.01)
    model.zero_grad()
    recurrent = forward(model, traj.batch, gradient="recurrent")
    recurrent.hidden.sum().backward()
    assert model.proj.up.weight.grad.abs().sum() > 0  # the projection is trained through the latents
    model.zero_grad()
    detached = forward(model, traj.batch, gradient="detached")
    detached.hidden.sum().backward()
    assert model.proj.up.weight.grad is None or model.proj.up.weight.grad.abs().sum() == 0


def test_caps_force_decisions_without_logprobs(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, "shared")
    with torch.no_grad():
        model.start_head.net.bias.fill_(50.0)  # always open
        model.stop_head.net.bias.fill_(-50.0)  # never stop
    traj = sample_batch(model, tokenizer, decisions="greedy", max_latents_per_block=3, max_blocks=2, max_total_latents=5)
    counts = traj.counts()
    assert (counts["latents"] == 5).all() and (counts["blocks"] == 2).all()
    # Block 1: latents 1-2 decide freely to go on, latent 3 is stopped by the per-block cap.
    # Block 2: latent 1 decides freely, latent 2 is stopped by the total cap. Forced stops carry no log-prob.
    assert (traj.stop_decided.sum(1) == 3).all()
    assert ((traj.batch.latent_mask & ~traj.stop_decided).sum(1) == 2).all()
    assert (traj.stop_logprobs[~traj.stop_decided] == 0).all()
    # Only the two opening decisions were free: after the total cap no block may open.
    assert (traj.start_decided.sum(1) == 2).all()


@pytest.mark.parametrize("pass_cost, passes, width", [(1000.0, 3, 7), (0.0, 4, 7)])
def test_plan_waves_tiles_rows_and_starts_a_chunk_at_every_latent(pass_cost, passes, width):
    latent = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    starts, ends = plan_waves(latent, torch.tensor([6, 6]), pass_cost=pass_cost)
    # Expensive passes: the fewest (1 + most latents in a row). Free passes: less padding (7 < 8 without caps).
    assert starts.shape[0] == passes and (ends - starts).max(1).values.sum() == width
    for row in range(2):
        chunks = [(s, e) for s, e in zip(starts[:, row].tolist(), ends[:, row].tolist()) if e > s]
        assert [s for s, _ in chunks] == [0] + [e for _, e in chunks[:-1]] and chunks[-1][1] == 6
        assert set(latent[row].nonzero().flatten().tolist()) <= {s for s, _ in chunks}


@pytest.mark.parametrize("pass_cost", [0.0, 1e6])
def test_every_wave_plan_is_exact(tiny_model_dir, pass_cost):
    model, tokenizer = build_model(tiny_model_dir, "two")
    traj = sample_batch(model, tokenizer)
    out = forward(model, traj.batch, pass_cost=pass_cost)
    computed = traj.batch.attention_mask & (traj.batch.positions() < traj.batch.lengths[:, None] - 1)
    assert torch.allclose(out.hidden[computed], traj.hidden[computed], atol=TOLERANCE, rtol=0)


def test_pause_control_matches_sampler(tiny_model_dir):
    """`pause`: learned embeddings at the slots, blocks exactly k long, no stop decisions."""
    model, tokenizer = build_model(tiny_model_dir, "shared", mode="pause")
    with torch.no_grad():
        model.pause.normal_(0, 0.1)
    traj = sample_batch(model, tokenizer)
    batch = traj.batch
    assert batch.latent_mask.any() and not traj.stop_decided.any()
    assert (batch.block_index()[batch.latent_mask] < 2).all()  # every block is k = 2 long
    out = forward(model, batch)
    computed = batch.attention_mask & (batch.positions() < batch.lengths[:, None] - 1)
    assert torch.allclose(out.hidden[computed], traj.hidden[computed], atol=TOLERANCE, rtol=0)
    assert torch.allclose(out.slot_inputs, traj.slot_inputs, atol=TOLERANCE, rtol=0)
    token_lp, start_lp, _ = recomputed_logprobs(model, traj, out)
    assert torch.allclose(token_lp, traj.token_logprobs, atol=TOLERANCE, rtol=0)
    decided = traj.start_decided
    assert torch.allclose(start_lp[decided], traj.start_logprobs[decided], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("trunk", ["shared", "two"])
@pytest.mark.parametrize("proj", ["soft", "gated", "pause_plus"])
def test_learned_projections_match_sampler(tiny_model_dir, trunk, proj):
    """`soft` (top-k mixture of token embeddings), `gated` (learned gate between the greedy token's
    embedding and the state) and `pause_plus` (a learned vector plus a linear read of the state) are exact
    in the training forward, gradient included."""
    model, tokenizer = build_model(tiny_model_dir, trunk, proj=proj)
    with torch.no_grad():
        if proj == "gated":
            model.proj.gate.weight.normal_(0, 0.05)  # a gate that depends on the state
        if proj == "pause_plus":
            model.proj.read.weight.normal_(0, 0.05)  # a latent that depends on the state
    traj = sample_batch(model, tokenizer)
    assert traj.batch.latent_mask.any()
    out = forward(model, traj.batch, gradient="recurrent")
    computed = traj.batch.attention_mask & (traj.batch.positions() < traj.batch.lengths[:, None] - 1)
    assert torch.allclose(out.hidden[computed], traj.hidden[computed], atol=TOLERANCE, rtol=0)
    assert torch.allclose(out.slot_inputs, traj.slot_inputs, atol=TOLERANCE, rtol=0)
    token_lp, _, _ = recomputed_logprobs(model, traj, out)
    assert torch.allclose(token_lp, traj.token_logprobs.double(), atol=TOLERANCE, rtol=0)
    norms = latent_norms(model, out, traj.batch)
    share, top_weight = norms.get("latent_state_share"), norms.get("soft_max_weight")
    assert (share is None) == (proj != "pause_plus") and (share is None or share > 0)
    assert (top_weight is None) == (proj != "soft")
    if proj == "soft":
        assert 1 / model.proj.top_k < top_weight < 0.99  # a real mixture, not a one-hot in disguise
        # the diagnostic reads the states the latents were made from: its mixtures rebuild the slot inputs
        fed_back = F.pad(out.hidden, (0, 0, 1, 0))[:, :-1][traj.batch.latent_mask]
        assert torch.allclose(model.proj(fed_back), out.slot_inputs[traj.batch.latent_mask], atol=TOLERANCE, rtol=0)
    # The latent inputs lie near the embedding table's scale, not at the raw state's.
    slots = traj.slot_inputs[traj.batch.latent_mask].norm(dim=-1)
    assert slots.mean() < 3 * model.embedding_norm


@pytest.mark.parametrize("proj", ["soft", "gated"])
def test_sampler_runs_the_lm_head_once_a_step(tiny_model_dir, proj, monkeypatch):
    """A projection that reads the LM head's logits takes the ones the sampler computed to draw the token from
    the same state: one LM-head call per decode step, and the same trajectories as computing them again."""
    model, tokenizer = build_model(tiny_model_dir, "shared", proj=proj)
    calls = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    shared = sample_batch(model, tokenizer, seed=3)
    handle.remove()
    steps = len(calls)
    assert steps > 0 and shared.batch.latent_mask.any()
    assert steps == shared.forward_passes  # one call per state that emits: the prefill's last, then each step's
    own = model.latent_inputs
    monkeypatch.setattr(model, "latent_inputs", lambda hidden, logits=None: own(hidden))  # the head again
    again = sample_batch(model, tokenizer, seed=3)
    for name in ("input_ids", "latent_mask", "lengths"):
        assert torch.equal(getattr(shared.batch, name), getattr(again.batch, name)), name
    assert torch.equal(shared.slot_inputs, again.slot_inputs)
    assert torch.equal(shared.token_logprobs, again.token_logprobs)


def test_pause_plus_starts_as_the_pause_control(tiny_model_dir):
    """Untrained, a `pause_plus` latent is the pause control's input whatever the state, and the read of
    the state still gets a gradient: training can let the state in."""
    def fresh(mode, proj):
        return LatentModel.from_config(ModelConfig(name_or_path=str(tiny_model_dir), lora_r=4),
                                       LatentConfig(mode=mode, proj=proj, k=2), dtype=torch.float64,
                                       device=torch.device("cpu"))[0]

    latent, pause = fresh("latent", "pause_plus"), fresh("pause", "norm_match")
    hidden = torch.randn(3, latent.hidden_size, dtype=torch.float64) * 40
    inputs = latent.latent_inputs(hidden)
    assert torch.equal(inputs, pause.pause_inputs(torch.tensor([0, 1, 1])))
    (inputs * torch.randn_like(inputs)).sum().backward()
    assert latent.proj.read.weight.grad.abs().sum() > 0
