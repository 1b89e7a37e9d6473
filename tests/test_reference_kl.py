"""The KL anchor on the tiny model: without latent noise the reference computes its own latents, so a drift in
how states become latents is charged; with noise it scores the sampled latents. And the directions of the
KL terms: what the k3 loss's gradient estimates, and the exact decision term that matches it."""

import pytest
import torch

from rlatent.grpo.losses import kl_k3
from rlatent.grpo.reference import ReferencePolicy
from rlatent.latent.policy import PolicyOutput, bernoulli_kl, recompute_actions
from rlatent.latent.trajectory import Actions
from test_invariant import build_model, sample_batch

TEMPERATURE = 1.0
TOKEN, START, STOP, LATENT = range(4)


def move_projection(model) -> None:
    """Change the latent projection's weights only, as a phase-2 update of `latent.proj: mlp` would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("proj."):
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)


def learner_view(model, tokenizer, reference, noise):
    """A fresh sample of the current policy, and the policy's and the reference's outputs and KL on it, as
    the learner computes them."""
    traj = sample_batch(model, tokenizer, seed=3, latent_noise_std=noise)
    mask = traj.actions(noise > 0).mask
    new = recompute_actions(model, traj.batch, traj.slot_inputs, mask, TEMPERATURE, noise, "recurrent")
    ref = reference.outputs(model, traj.batch, traj.slot_inputs, mask, TEMPERATURE, noise, None)
    return traj, new, ref, reference.kl(new, ref, noise, bias_correction=False)


@pytest.fixture
def mlp_policy(tiny_model_dir):
    return build_model(tiny_model_dir, "shared", proj="mlp")


def test_without_noise_the_reference_charges_a_projection_that_moved(mlp_policy):
    model, tokenizer = mlp_policy
    reference = ReferencePolicy("initial", model)
    traj, new, ref, kl = learner_view(model, tokenizer, reference, 0.0)
    mask = new.actions.mask
    assert mask[..., TOKEN].any() and mask[..., START].any() and not mask[..., LATENT].any()
    assert traj.batch.latent_mask.any()
    assert kl.abs().max() < 1e-12  # at the snapshot the reference is the policy, latents included

    move_projection(model)
    traj, new, ref, kl = learner_view(model, tokenizer, reference, 0.0)
    assert traj.batch.latent_mask.any()
    token_kl = kl[..., TOKEN][mask[..., TOKEN]]
    assert (token_kl >= 0).all() and token_kl.mean() > 1e-3
    gap = (new.actions.logprobs - ref.actions.logprobs)[new.actions.mask].abs().max()
    assert gap > 1e-2
    # Scored on the policy's stored latents, the reference would see no change at all: only the projection
    # moved, and it is applied nowhere but in making latents.
    with reference.active(model):
        on_stored = recompute_actions(model, traj.batch, traj.slot_inputs, mask, TEMPERATURE, 0.0, "detached")
    assert torch.allclose(on_stored.actions.logprobs, new.actions.logprobs, atol=1e-10, rtol=0)


def test_with_noise_the_reference_scores_the_sampled_latents(mlp_policy):
    """Latents are actions: the reference reads the sampled ones, so a moved projection shows in the
    Gaussian KL of the latents' means, not in the tokens."""
    model, tokenizer = mlp_policy
    reference = ReferencePolicy("initial", model)
    _, _, _, kl = learner_view(model, tokenizer, reference, 0.5)
    assert kl.abs().max() < 1e-12
    move_projection(model)
    _, new, _, kl = learner_view(model, tokenizer, reference, 0.5)
    mask = new.actions.mask
    assert mask[..., LATENT].any()
    assert kl[..., TOKEN].abs().max() < 1e-12
    assert kl[..., START].abs().max() < 1e-12
    assert (kl[..., LATENT][mask[..., LATENT]] > 1e-3).all()


def test_the_k3_loss_gradient_is_that_of_kl_ref_to_policy_and_with_the_ratio_of_policy_to_ref():
    """Exact expectations over a Bernoulli action (both outcomes weighted by the sampling probability):
    E_pi[grad k3] = grad KL(ref||pi), and E_old[grad (ratio * k3)] at pi = old is grad KL(pi||ref)."""
    def both_outcomes(logit):
        return torch.stack([torch.nn.functional.logsigmoid(logit), torch.nn.functional.logsigmoid(-logit)])

    def grad(loss_of, logit_value):
        logit = torch.tensor(logit_value, dtype=torch.float64, requires_grad=True)
        return torch.autograd.grad(loss_of(logit), logit)[0].item()

    ref_logit = torch.tensor(-1.3, dtype=torch.float64)
    ref_logp = both_outcomes(ref_logit)

    def expected_k3(logit):  # the actions are sampled from the policy: weights without gradient
        logp = both_outcomes(logit)
        return (logp.detach().exp() * kl_k3(logp, ref_logp)).sum()

    def expected_corrected_k3(logit):  # sampled from the old policy, which the policy still equals
        logp = both_outcomes(logit)
        return (logp.detach().exp() * torch.exp(logp - logp.detach()) * kl_k3(logp, ref_logp)).sum()

    for logit in (0.7, -2.0, 2.5):
        reverse = grad(lambda x: bernoulli_kl(ref_logit, x), logit)
        forward = grad(lambda x: bernoulli_kl(x, ref_logit), logit)
        assert grad(expected_k3, logit) == pytest.approx(reverse, rel=1e-12)
        assert grad(expected_corrected_k3, logit) == pytest.approx(forward, rel=1e-12)
        assert abs(reverse - forward) > 1e-3  # the two directions do differ here


@pytest.mark.parametrize("bias_correction", [False, True])
def test_decision_kl_takes_the_direction_of_the_token_term(bias_correction):
    reference = ReferencePolicy("initial", torch.nn.Linear(1, 1))
    policy_logits = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    ref_logits = torch.tensor([[-1.0, 1.5, 0.5]], dtype=torch.float64)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, :, START] = mask[0, :, STOP] = True

    def output(logits):
        return PolicyOutput(Actions(torch.zeros(1, 3, 4, dtype=torch.float64), mask), torch.zeros(0), logits,
                            -logits, None)

    kl = reference.kl(output(policy_logits), output(ref_logits), 0.0, bias_correction)
    pair = (policy_logits, ref_logits) if bias_correction else (ref_logits, policy_logits)
    assert torch.allclose(kl[..., START], bernoulli_kl(*pair), rtol=1e-12, atol=0)
    assert torch.allclose(kl[..., STOP], bernoulli_kl(-pair[0], -pair[1]), rtol=1e-12, atol=0)
    assert kl[0, 2, START] == 0 and kl[..., TOKEN].abs().max() == 0
