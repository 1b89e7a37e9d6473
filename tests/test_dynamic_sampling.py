"""Dynamic sampling: which groups the update takes, the prompt and seed streams of further rounds, and a
phase-2 run with `grpo.dynamic_sampling_rounds` on the tiny model."""

import pytest
import torch

from rlatent.distributed.local_backend import LocalBackend
from rlatent.grpo.dynamic_sampling import ScoredRound, assemble, enough_informative, informative_groups, pick_groups
from rlatent.grpo.loop import prompt_order
from rlatent.latent.sampler import SamplingSettings, sample
from rlatent.workers.rollout import chunk_seed
from test_grpo import phase_metric, run_cli, tiny_overrides
from test_invariant import build_model


@pytest.fixture(autouse=True)
def repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def scored(rewards, traj=None):
    rows = len(rewards)
    return ScoredRound(problems=[None] * rows, traj=traj, rewards=torch.tensor(rewards, dtype=torch.float32),
                       per_reward={"r": list(rewards)}, zeroed={"r": 0}, completions=[""] * rows)


def test_informative_groups_are_those_with_unequal_rewards():
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.1, 0.0]), 2).tolist() == [
        False, True, False, True]


def test_picks_informative_groups_in_draw_order_then_tops_up_with_the_rest():
    first, second = scored([1, 1, 0, 1, 0, 0]), scored([0, 1, 2, 2, 1, 0])  # groups of 2: [F T F], [T F T]
    assert pick_groups([first, second], 2, 3) == [(0, 1), (1, 0), (1, 2)]
    assert enough_informative([first, second], 2, 3) and not enough_informative([first], 2, 2)
    # The rounds ran out: the one informative group first, then the others in the order they were drawn.
    assert pick_groups([first], 2, 3) == [(0, 1), (0, 0), (0, 2)]
    assert pick_groups([scored([0, 0, 0, 0])], 2, 2) == [(0, 0), (0, 1)]


def test_assemble_joins_the_picked_groups_rows_and_rewards(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, "shared")
    settings = SamplingSettings(max_new_tokens=10, temperature=1.0, decisions="sample", max_latents_per_block=3,
                                max_blocks=2, max_total_latents=6)
    prompts = [tokenizer(t).input_ids for t in ["Tom has 3 apples", "Tom has 3 apples", "12 + 7 =", "12 + 7 ="]]
    rounds = []
    for seed, rewards in ((0, [1, 0, 2, 2]), (1, [3, 3, 5, 4])):
        torch.manual_seed(seed)
        rounds.append(scored(rewards, sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                             settings)))
    picks = pick_groups(rounds, 2, 2)
    assert picks == [(0, 0), (1, 1)]
    traj, rewards = assemble(rounds, picks, 2, tokenizer.pad_token_id)
    assert rewards.tolist() == [1, 0, 5, 4]
    assert traj.forward_passes == rounds[0].traj.forward_passes + rounds[1].traj.forward_passes
    sources = [(rounds[0].traj, 0), (rounds[0].traj, 1), (rounds[1].traj, 2), (rounds[1].traj, 3)]
    for row, (source, source_row) in enumerate(sources):
        length = int(source.batch.lengths[source_row])
        assert int(traj.batch.lengths[row]) == length
        assert torch.equal(traj.batch.input_ids[row, :length], source.batch.input_ids[source_row, :length])
        assert torch.equal(traj.token_logprobs[row, :length], source.token_logprobs[source_row, :length])
        assert traj.completion_ids(row) == source.completion_ids(source_row)
    # One round whose groups are all taken, in order, is the round itself.
    assert assemble(rounds[:1], [(0, 0), (0, 1)], 2, tokenizer.pad_token_id)[0] is rounds[0].traj


def test_round_zero_keeps_the_prompts_and_seeds_of_a_run_without_dynamic_sampling():
    for step in range(3):
        before = [int(torch.randperm(10, generator=torch.Generator().manual_seed(7 + i // 10))[i % 10])
                  for i in range(step * 4, step * 4 + 4)]
        assert prompt_order(10, step, 4, 7) == before
    assert chunk_seed(7, 3, 1) == 7 * 1_000_003 + 3 * 1_009 + 1
    second = [prompt_order(10, step, 4, 7, stream=1) for step in range(5)]
    assert second == [prompt_order(10, step, 4, 7, stream=1) for step in range(5)]  # stateless: resumable
    assert second != [prompt_order(10, step, 4, 7) for step in range(5)]
    # Distinct streams even as torch reads them (the low 32 bits of a seed).
    assert len({chunk_seed(7, 3, 1, r) % 2**32 for r in range(4)}) == 4


def half_the_prompts(prompts, completions, **kwargs):
    """Test reward: a completion's length on prompts whose text has an even character sum, else 0 (so
    their groups carry no advantage)."""
    return [float(len(c)) if sum(map(ord, p)) % 2 == 0 else 0.0 for p, c in zip(prompts, completions)]


GRPO = ["grpo.steps=3", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=8", "eval.limit=2"]


def test_unlearnable_reward_draws_every_round_and_trains_on_the_first(tiny_model_dir, tmp_path):
    """The tiny model never solves a problem: no group has a signal, so each step draws all 3 rounds and
    the update takes round 1's groups, exactly the batch of a run without dynamic sampling."""
    correct = "grpo.rewards=[{function: gsm8k_correct}]"
    plain = run_cli(tmp_path, "plain", *tiny_overrides(tiny_model_dir, correct, *GRPO))
    dynamic = run_cli(tmp_path, "dynamic", *tiny_overrides(tiny_model_dir, correct, *GRPO,
                                                             "grpo.dynamic_sampling_rounds=3"))
    assert phase_metric(dynamic, "grpo", "sampling_rounds") == [3.0] * 3
    assert phase_metric(dynamic, "grpo", "groups_drawn") == [6.0] * 3
    assert phase_metric(plain, "grpo", "groups_drawn") == [2.0] * 3
    assert phase_metric(dynamic, "grpo", "groups_informative") == [0.0] * 3
    for name in ("loss", "latents_per_completion", "tokens_per_completion", "entropy"):
        assert phase_metric(dynamic, "grpo", name) == phase_metric(plain, "grpo", name), name
    assert "dynamic sampling, up to 3 rounds" in (dynamic / "report.md").read_text()


def test_further_rounds_fill_the_update_with_groups_that_have_a_signal(tiny_model_dir, tmp_path, monkeypatch):
    updates = []
    original = LocalBackend.update

    def recording(self, traj, advantages, step):
        updates.append(advantages.clone())
        return original(self, traj, advantages, step)

    monkeypatch.setattr(LocalBackend, "update", recording)
    reward = "grpo.rewards=[{function: 'test_dynamic_sampling:half_the_prompts'}]"
    run = run_cli(tmp_path, "half", *tiny_overrides(tiny_model_dir, reward, *GRPO, "grpo.steps=4",
                                                      "grpo.dynamic_sampling_rounds=4"))
    rounds = phase_metric(run, "grpo", "sampling_rounds")
    informative = phase_metric(run, "grpo", "groups_informative")
    assert len(updates) == 4 and all(a.shape == (4,) for a in updates)
    assert any(r > 1 for r in rounds), rounds  # half the prompts give no signal: some steps draw again
    for advantages, drawn, kept in zip(updates, rounds, informative):
        with_signal = int((advantages.view(2, 2) != 0).any(dim=1).sum())
        assert with_signal == kept
        assert kept == 2 or drawn == 4  # a step stops early only once the update is full of signal
    assert phase_metric(run, "grpo", "groups_drawn") == [2.0 * r for r in rounds]
