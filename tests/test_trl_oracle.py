"""rlatent's GRPO math against TRL's own code on identical tensors (TRL is the oracle, not a copy of it).

The loss: `trl.GRPOTrainer._compute_loss`, called as an unbound method on a
stand-in `self` that carries only the attributes the method reads, with the
per-token log-probs injected where TRL would run the model. The advantages:
TRL computes them inline in `_generate_and_score_completions` from the group
mean and its `trl.trainer.utils.nanstd` (Bessel's std); rlatent's
`advantage_std: sample` must give the same numbers.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is the oracle for the GRPO math (installed by the test extra)")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

from rlatent.grpo.losses import grpo_loss, group_advantages, masked_kl_k3, normaliser  # noqa: E402

F64 = torch.float64
EPS_LOW, EPS_HIGH, MAX_LEN = 0.2, 0.28, 6


class Accelerator:
    """One process: gather and reduce are the identity."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(logprobs, old, ref, advantages, mask, loss_type, beta, bias_correction):
    """TRL 1.16's loss on these tensors: its `_compute_loss` with the model call replaced by `logprobs`."""
    rows, width = logprobs.shape
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=MAX_LEN, accelerator=Accelerator(),
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None, steps_per_generation=1),
    )
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, width, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(fake, None, inputs)


def random_batch(seed: int, rows: int = 6, width: int = MAX_LEN):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 2, 4, 1, 5, 3][:rows])  # every row has an action, as in TRL's batches
    mask = torch.arange(width)[None, :] < lengths[:, None]
    old = -torch.rand(rows, width, generator=g, dtype=F64) * 3
    new = old + (torch.rand(rows, width, generator=g, dtype=F64) - 0.5)  # ratios 0.6..1.65: some clip
    ref = old + (torch.rand(rows, width, generator=g, dtype=F64) - 0.5)
    advantages = torch.randn(rows, generator=g, dtype=F64)
    return new, old, ref, advantages, mask


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("iteration", [0, 1])
def test_loss_and_gradient_equal_trl(loss_type, beta, bias_correction, iteration):
    new, old, ref, advantages, mask = random_batch(loss_type.__len__() + iteration)
    if iteration == 0:
        old = new.clone()  # the first update: the policy has not moved, the ratio is exactly 1
    theirs_lp = new.clone().requires_grad_()
    theirs = trl_loss(theirs_lp, old, ref, advantages, mask, loss_type, beta, bias_correction)
    theirs.backward()

    ours_lp = new.clone().requires_grad_()
    kl = masked_kl_k3(ours_lp, ref, mask)
    ours, _ = grpo_loss(ours_lp, old, kl, advantages, mask, loss_type=loss_type, epsilon_low=EPS_LOW,
                        epsilon_high=EPS_HIGH, beta=beta, max_actions=MAX_LEN, kl_bias_correction=bias_correction)
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6, rel=1e-6)
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_accumulated_micro_batches_equal_trl_on_the_whole_batch(loss_type):
    """rlatent's micro-batches share the whole batch's normaliser, so their sum is TRL's one-batch loss."""
    new, old, ref, advantages, mask = random_batch(7)
    theirs = trl_loss(new, old, ref, advantages, mask, loss_type, 0.04, False)
    norm = normaliser(mask, loss_type, MAX_LEN)
    ours = sum(grpo_loss(new[r], old[r], masked_kl_k3(new[r], ref[r], mask[r]), advantages[r], mask[r],
                         loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=0.04,
                         max_actions=MAX_LEN, normaliser=norm)[0]
               for r in (slice(0, 2), slice(2, 3), slice(3, 6)))
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6, rel=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_sample_std_advantages_equal_trl(scale):
    g = torch.Generator().manual_seed(3)
    group = 8
    rewards = torch.randint(0, 3, (4 * group,), generator=g).double()
    rewards[:group] = 1.0  # a group whose rewards are all equal gets advantage 0 in both
    mean = rewards.view(-1, group).mean(1).repeat_interleave(group)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group)
    theirs = rewards - mean
    if scale != "none":
        theirs = theirs / (std + 1e-4)
    ours = group_advantages(rewards, group, scale, std="sample")
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    if scale == "group":  # the population std differs by exactly sqrt(G / (G - 1)) where the std is not ~0
        population = group_advantages(rewards, group, scale, std="population")
        moving = rewards.view(-1, group).std(1).repeat_interleave(group) > 0.1
        ratio = (population / ours)[moving & (ours.abs() > 1e-3)]
        torch.testing.assert_close(ratio, torch.full_like(ratio, (group / (group - 1)) ** 0.5), atol=1e-3, rtol=0)
