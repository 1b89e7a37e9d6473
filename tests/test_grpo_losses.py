"""GRPO losses against values computed by hand, and the accumulation invariance (1×8 equals 8×1)."""

import math

import pytest
import torch

from rlatent.grpo.losses import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    STD_EPS,
    clipped_objective,
    group_advantages,
    grpo_loss,
    kl_k3,
    masked_kl_k3,
    normaliser,
)

F64 = torch.float64
CLIP = dict(epsilon_low=0.2, epsilon_high=0.28)


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


# --- advantages -----------------------------------------------------------------------------------------------

def test_advantage_scales_registry():
    assert set(ADVANTAGE_SCALES) == {"group", "batch", "none"}
    with pytest.raises(ValueError, match="unknown advantage scale"):
        group_advantages(t([1.0, 0.0]), 2, "rank")
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(t([1.0, 0.0, 1.0]), 4, "group")


def test_group_advantages_by_hand():
    rewards = t([1, 0, 0, 1, 0, 0, 0, 0])
    # Group 1: mean 0.5, centred [.5, -.5, -.5, .5], population std 0.5. Group 2: all equal, std 0.
    centred = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    none = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(none, t(centred))
    group = group_advantages(rewards, 4, "group")
    torch.testing.assert_close(group, t(centred[:4] + [0] * 4) / t([0.5 + STD_EPS] * 4 + [1] * 4))
    assert torch.isfinite(group).all() and (group[4:] == 0).all()  # zero std: 0, not NaN
    # Batch: mean 2/8 = 0.25, variance E[r²] − mean² = 0.25 − 0.0625 = 0.1875, std = 0.4330...
    batch = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(batch, t(centred) / (math.sqrt(0.1875) + STD_EPS))


def test_group_advantages_all_equal_batch_is_zero_not_nan():
    for scale in ADVANTAGE_SCALES:
        adv = group_advantages(torch.zeros(8, dtype=F64), 4, scale)
        assert torch.equal(adv, torch.zeros(8, dtype=F64)), scale


# --- aggregation ----------------------------------------------------------------------------------------------

PER_ACTION = t([[1, 2, float("nan")], [4, float("inf"), 6]])  # garbage where masked
MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_aggregations_by_hand():
    assert AGGREGATIONS["dapo"](PER_ACTION, MASK, 3).item() == pytest.approx((1 + 2 + 4) / 3)
    assert AGGREGATIONS["grpo"](PER_ACTION, MASK, 3).item() == pytest.approx(((1 + 2) / 2 + 4 / 1) / 2)
    assert AGGREGATIONS["dr_grpo"](PER_ACTION, MASK, 3).item() == pytest.approx((1 + 2 + 4) / (2 * 3))
    assert AGGREGATIONS["dr_grpo"](PER_ACTION, MASK, 10).item() == pytest.approx((1 + 2 + 4) / (2 * 10))


def test_grpo_aggregation_skips_empty_rows():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert AGGREGATIONS["grpo"](PER_ACTION, mask, 3).item() == pytest.approx((1 + 2) / 2)  # one row counted
    assert AGGREGATIONS["dapo"](PER_ACTION, torch.zeros_like(mask), 3).item() == 0.0  # nothing: 0, not NaN


def test_dr_grpo_budget_is_a_constant_even_below_the_longest_row():
    """TRL's Dr. GRPO divides by B x max_completion_length whatever the completions hold; with decisions
    as actions a row may hold more actions than the token budget, and that is no error."""
    assert AGGREGATIONS["dr_grpo"](PER_ACTION, MASK, 1).item() == pytest.approx((1 + 2 + 4) / (2 * 1))


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type"):
        normaliser(MASK, "bnpo", 3)


# --- clipping -------------------------------------------------------------------------------------------------

def clip_case():
    # Row 0 has A = +1, row 1 has A = −1; ε_low = 0.2 → [0.8, 1.28] ← ε_high = 0.28.
    ratios = t([[1.5, 1.1, 0.5], [0.5, 0.9, 1.5]])
    old = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.5]])
    logprobs = (old + ratios.log()).requires_grad_()
    return logprobs, old, t([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool)


def test_clipping_both_sides_loss_gradient_stats():
    logprobs, old, adv, mask = clip_case()
    per_action, stats = clipped_objective(logprobs, old, adv, mask, **CLIP)
    # −min(r·A, clip(r)·A):
    #   A=+1: r=1.5 → −1.28 (clipped high); r=1.1 → −1.1; r=0.5 → −min(0.5, 0.8) = −0.5 (not clipped)
    #   A=−1: r=0.5 → −min(−0.5, −0.8) = 0.8 (clipped low); r=0.9 → 0.9; r=1.5 → −min(−1.5, −1.28) = 1.5
    expected = t([[-1.28, -1.1, -0.5], [0.8, 0.9, 1.5]])
    torch.testing.assert_close(per_action, expected)
    assert stats == pytest.approx({"clip_low": 1 / 6, "clip_high": 1 / 6, "ratio_mean": 6.0 / 6})

    args = dict(loss_type="dapo", beta=0.0, max_actions=3, **CLIP)
    loss, stats = grpo_loss(logprobs, old, None, adv, mask, **args)
    assert loss.item() == pytest.approx((-1.28 - 1.1 - 0.5 + 0.8 + 0.9 + 1.5) / 6)
    assert stats["clip_fraction"] == pytest.approx(2 / 6) and stats["actions"] == 6 and "kl" not in stats
    loss.backward()
    # d(−A·r)/d logp = −A·r, divided by the normaliser 6; the clipped actions get 0.
    torch.testing.assert_close(logprobs.grad, t([[0.0, -1.1, -0.5], [0.0, 0.9, 1.5]]) / 6)


# --- KL -------------------------------------------------------------------------------------------------------

def test_kl_k3_by_hand():
    logprobs = t([math.log(0.5), math.log(0.25), -1.7])
    ref = t([math.log(0.25), math.log(0.5), -1.7])
    # d = ref − logp: −ln 2 → 0.5 + ln 2 − 1; +ln 2 → 2 − ln 2 − 1; 0 → 0
    expected = t([0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0])
    torch.testing.assert_close(kl_k3(logprobs, ref), expected)
    assert (kl_k3(logprobs, ref) >= 0).all() and kl_k3(ref, ref).abs().max() == 0


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_beta_adds_aggregated_kl(loss_type):
    ln2 = math.log(2)
    logprobs = t([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]]).requires_grad_()
    ref = logprobs.detach() + t([[ln2, 0.0, 5.0], [-ln2, ln2, 0.0]])  # the last of row 0 is masked
    mask = torch.tensor([[True, True, False], [True, True, True]])
    k_plus, k_minus = 1 - ln2, ln2 - 0.5  # k3 at d = +ln 2 and d = −ln 2
    kl = [[k_plus, 0.0], [k_minus, k_plus, 0.0]]
    by_hand = {
        "dapo": sum(kl[0] + kl[1]) / 5,
        "grpo": (sum(kl[0]) / 2 + sum(kl[1]) / 3) / 2,
        "dr_grpo": sum(kl[0] + kl[1]) / (2 * 4),
    }[loss_type]
    # Advantages 0 and ratio 1: the surrogate is 0, what remains is β·KL.
    args = dict(loss_type=loss_type, beta=0.1, max_actions=4, **CLIP)
    loss, stats = grpo_loss(logprobs, logprobs.detach(), masked_kl_k3(logprobs, ref, mask), torch.zeros(2, dtype=F64), mask, **args)
    assert loss.item() == pytest.approx(0.1 * by_hand)
    assert stats["kl"] == pytest.approx(sum(kl[0] + kl[1]) / 5)
    without_ref, _ = grpo_loss(logprobs, logprobs.detach(), None, torch.zeros(2, dtype=F64), mask, **args)
    assert without_ref.item() == 0.0


# --- num_iterations -------------------------------------------------------------------------------------------

def test_two_updates_against_the_same_old_logprobs():
    theta = t([[-1.0, -2.0], [-0.5, -1.5]]).requires_grad_()  # stands in for the policy's log-probs
    old = theta.detach().clone()  # stored once at sampling time
    adv, mask = t([2.0, -1.0]), torch.ones(2, 2, dtype=torch.bool)
    args = dict(loss_type="dapo", beta=0.0, max_actions=2, **CLIP)

    # Update 1: logprobs == old, ratio 1, loss = −Σ A / 4, gradient −A / 4 per action.
    loss, stats = grpo_loss(theta, old, None, adv, mask, **args)
    assert loss.item() == pytest.approx((-2 - 2 + 1 + 1) / 4) and stats["ratio_mean"] == 1.0
    loss.backward()
    torch.testing.assert_close(theta.grad, t([[-2.0, -2.0], [1.0, 1.0]]) / 4)

    # The optimizer moves the policy; update 2 uses the same stored `old`.
    with torch.no_grad():
        theta += t([[math.log(1.2), math.log(1.5)], [math.log(0.9), math.log(0.7)]])
    theta.grad = None
    loss, stats = grpo_loss(theta, old, None, adv, mask, **args)
    # A=+2: r=1.2 → −2.4; r=1.5 → clipped at 1.28 → −2.56.
    # A=−1: r=0.9 → 0.9;  r=0.7 → clipped at 0.8 → 0.8.
    assert loss.item() == pytest.approx((-2.4 - 2.56 + 0.9 + 0.8) / 4)
    assert stats["clip_high"] == stats["clip_low"] == 0.25
    loss.backward()
    torch.testing.assert_close(theta.grad, t([[-2 * 1.2, 0.0], [0.9, 0.0]]) / 4)


# --- masked garbage -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_masked_garbage_changes_nothing(loss_type):
    mask = torch.tensor([[True, False, False], [True, True, False]])
    clean = t([[-1.0, 0.0, 0.0], [-0.5, -2.0, 0.0]])
    old = t([[-1.2, 0.0, 0.0], [-0.4, -2.1, 0.0]])
    ref = t([[-0.9, 0.0, 0.0], [-0.6, -1.9, 0.0]])
    inf, nan = float("inf"), float("nan")
    dirty = clean.clone()
    dirty[0, 1:], dirty[1, 2] = t([nan, -inf]), inf
    old_dirty, ref_dirty = old.clone(), ref.clone()
    old_dirty[0, 1:], ref_dirty[1, 2] = t([inf, nan]), -inf
    args = dict(loss_type=loss_type, beta=0.04, max_actions=3, **CLIP)
    adv = t([1.5, -0.5])

    a = clean.clone().requires_grad_()
    loss_a, stats_a = grpo_loss(a, old, masked_kl_k3(a, ref, mask), adv, mask, **args)
    loss_a.backward()
    b = dirty.clone().requires_grad_()
    loss_b, stats_b = grpo_loss(b, old_dirty, masked_kl_k3(b, ref_dirty, mask), adv, mask, **args)
    loss_b.backward()
    assert torch.isfinite(loss_b) and loss_b.item() == pytest.approx(loss_a.item())
    assert stats_b == pytest.approx(stats_a)
    assert torch.isfinite(b.grad).all() and (b.grad[~mask] == 0).all()
    torch.testing.assert_close(b.grad, a.grad)


# --- accumulation invariance ----------------------------------------------------------------------------------

def random_batch(seed, rows=8, slots=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 3, 0, 4, 2, 5, 3])  # varied, one empty row
    mask = torch.arange(slots)[None, :] < lengths[:, None]  # (B, A)
    old = -torch.rand(rows, slots, generator=g, dtype=F64) * 3
    logprobs = old + (torch.rand(rows, slots, generator=g, dtype=F64) - 0.5)  # ratios ≈ 0.6..1.65: some clip
    ref = old + (torch.rand(rows, slots, generator=g, dtype=F64) - 0.5)
    adv = torch.randn(rows, generator=g, dtype=F64)
    return logprobs, old, ref, adv, mask


def test_dapo_is_action_weighted_average_of_micro_batches():
    logprobs, old, ref, adv, mask = random_batch(0)
    args = dict(loss_type="dapo", beta=0.0, max_actions=5, **CLIP)
    full, _ = grpo_loss(logprobs, old, masked_kl_k3(logprobs, ref, mask), adv, mask, **args)
    parts = [grpo_loss(logprobs[r], old[r], masked_kl_k3(logprobs[r], ref[r], mask[r]), adv[r], mask[r], **args) for r in (slice(0, 3), slice(3, 8))]
    weighted = sum(loss * stats["actions"] for loss, stats in parts) / mask.sum()
    assert weighted.item() == pytest.approx(full.item())
    # ...whereas the plain mean of the micro-batch losses is not the batch loss.
    assert (parts[0][0] + parts[1][0]).item() / 2 != pytest.approx(full.item())


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("micro", [1, 2, 4, 8])
def test_accumulation_with_full_batch_normaliser_equals_full_batch(loss_type, micro):
    logprobs, old, ref, adv, mask = random_batch(1)
    args = dict(loss_type=loss_type, beta=0.04, max_actions=5, **CLIP)

    full_lp = logprobs.clone().requires_grad_()
    full, _ = grpo_loss(full_lp, old, masked_kl_k3(full_lp, ref, mask), adv, mask, **args)
    full.backward()

    acc_lp = logprobs.clone().requires_grad_()
    norm = normaliser(mask, loss_type, 5)  # once, from the whole batch
    total = 0.0
    for start in range(0, 8, micro):
        r = slice(start, start + micro)
        loss, _ = grpo_loss(acc_lp[r], old[r], masked_kl_k3(acc_lp[r], ref[r], mask[r]), adv[r], mask[r], normaliser=norm,
                            **args)
        loss.backward()  # no division by the number of micro-batches
        total += loss.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(acc_lp.grad, full_lp.grad, rtol=1e-12, atol=1e-15)
