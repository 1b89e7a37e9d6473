"""Dynamic sampling: which groups the update takes (by the named reward), the prompt and seed streams of
further rounds, and phase-2 runs with `grpo.dynamic_sampling_rounds` on the tiny model."""

import pytest
import torch

from rlatent.distributed.local_backend import LocalBackend
from rlatent.grpo.loop import GRPOTrainer
from rlatent.grpo.dynamic_sampling import ScoredRound, assemble, enough_informative, informative_groups, pick_groups
from rlatent.config import load_config
from rlatent.errors import ConfigError
from rlatent.grpo.prompts import prompt_order
from rlatent.latent.sampler import SamplingSettings, sample
from rlatent.workers.rollout import chunk_seed
from test_grpo import phase_metric, run_cli, tiny_overrides
from test_invariant import build_model


pytestmark = pytest.mark.usefixtures("repo_root")  # config paths are relative to the repository


def scored(rewards, traj=None, **more_rewards):
    """A round whose total is `rewards` and whose reward "r" is too; `more_rewards` adds named ones."""
    rows = len(rewards)
    return ScoredRound(problems=[None] * rows, traj=traj, rewards=torch.tensor(rewards, dtype=torch.float32),
                       per_reward={"r": list(rewards), **more_rewards}, zeroed={"r": 0}, completions=[""] * rows)


def test_informative_groups_are_those_with_unequal_rewards():
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.1, 0.0]), 2).tolist() == [
        False, True, False, True]


def test_picks_informative_groups_in_draw_order_then_tops_up_with_the_rest():
    first, second = scored([1, 1, 0, 1, 0, 0]), scored([0, 1, 2, 2, 1, 0])  # groups of 2: [F T F], [T F T]
    assert pick_groups([first, second], 2, 3, "r") == [(0, 1), (1, 0), (1, 2)]
    assert enough_informative([first, second], 2, 3, "r") and not enough_informative([first], 2, 2, "r")
    # The rounds ran out: the one informative group first, then the others in the order they were drawn.
    assert pick_groups([first], 2, 3, "r") == [(0, 1), (0, 0), (0, 2)]
    assert pick_groups([scored([0, 0, 0, 0])], 2, 2, "r") == [(0, 0), (0, 1)]


def test_a_format_only_group_is_not_informative():
    """Eight wrong answers, one of them without `####`: the weighted total (correct + 0.1 * format) differs
    within the group, the correctness reward does not. The filter reads the named reward."""
    correct = [0.0] * 8 + [0.0] * 7 + [1.0]
    formatted = [1.0] * 7 + [0.0] + [1.0] * 8
    total = [c + 0.1 * f for c, f in zip(correct, formatted)]
    round_ = scored(total, gsm8k_correct=correct, gsm8k_format=formatted)
    assert informative_groups(torch.tensor(total), 8).tolist() == [True, True]  # what the total would pass
    assert round_.informative("gsm8k_correct", 8).tolist() == [False, True]
    assert round_.informative("gsm8k_format", 8).tolist() == [True, False]
    assert pick_groups([round_], 8, 1, "gsm8k_correct") == [(0, 1)]
    assert not enough_informative([round_], 8, 2, "gsm8k_correct")


def test_the_filter_reward_must_be_a_configured_one():
    base = ["model.name_or_path=x", "grpo.rewards=[{function: gsm8k_format}]"]
    with pytest.raises(ConfigError) as error:
        load_config("configs/tiny.yaml", [*base, "grpo.dynamic_sampling_rounds=2"])
    message = str(error.value)
    assert "\n" not in message
    assert message.endswith("grpo: dynamic_sampling_reward 'gsm8k_correct' is not one of the configured rewards "
                            "(gsm8k_format)")
    assert load_config("configs/tiny.yaml", base).grpo.dynamic_sampling_rounds == 1  # unused when off
    named = load_config("configs/tiny.yaml", [*base, "grpo.dynamic_sampling_rounds=2",
                                              "grpo.dynamic_sampling_reward=gsm8k_format"])
    assert named.grpo.dynamic_sampling_reward == "gsm8k_format"


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
    picks = pick_groups(rounds, 2, 2, "r")
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


def test_round_zero_is_a_seeded_permutation_per_epoch_and_the_draw_is_stateless():
    drawn = [prompt_order(12, step, 4, 7) for step in range(6)]  # two epochs of 12
    assert sorted(sum(drawn[:3], [])) == list(range(12)) == sorted(sum(drawn[3:], []))
    assert drawn == [prompt_order(12, step, 4, 7) for step in range(6)]  # stateless: resumable
    assert drawn[:3] != drawn[3:]  # each epoch its own permutation
    assert chunk_seed(7, 3, 1) == 7 * 1_000_003 + 3 * 1_009 + 1
    # Distinct streams even as torch reads them (the low 32 bits of a seed).
    assert len({chunk_seed(7, 3, 1, r) % 2**32 for r in range(4)}) == 4


def test_epoch_e_plus_one_of_a_seed_is_not_epoch_e_of_the_next_seed():
    """With the permutation seeded by `seed + epoch`, seed 7's second epoch replayed seed 8's first."""
    second_epoch_of_7 = [prompt_order(12, step, 4, 7) for step in range(3, 6)]
    first_epoch_of_8 = [prompt_order(12, step, 4, 8) for step in range(3)]
    assert second_epoch_of_7 != first_epoch_of_8
    assert prompt_order(12, 0, 4, 7) != prompt_order(12, 0, 4, 8)


@pytest.mark.parametrize("count, per_step", [(10, 3), (7, 2), (13, 4)])
def test_no_prompt_enters_one_step_twice(count, per_step):
    """Rounds 0..2 of a step (stream 0, then stream 1) never share a problem, also where a step crosses an
    epoch boundary of either stream; round 0 is what a run without dynamic sampling draws."""
    rounds = 3
    for step in range(40):
        step_rounds = [prompt_order(count, step, per_step, 5, r, rounds) for r in range(rounds)]
        flat = sum(step_rounds, [])
        assert len(flat) == rounds * per_step and len(set(flat)) == len(flat), (step, step_rounds)
        assert step_rounds[0] == prompt_order(count, step, per_step, 5)


def test_a_step_that_wants_more_problems_than_there_are_repeats_them():
    step_rounds = [prompt_order(4, 0, 3, 5, r, 2) for r in range(2)]
    flat = sum(step_rounds, [])
    assert len(flat) == 6 and set(flat) == {0, 1, 2, 3}


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
    assert phase_metric(dynamic, "grpo", "rollouts_drawn") == [12.0] * 3
    assert phase_metric(plain, "grpo", "rollouts_drawn") == [4.0] * 3
    assert phase_metric(dynamic, "grpo", "groups_informative") == [0.0] * 3
    assert phase_metric(dynamic, "grpo", "dynamic_sampling_informative") == [0.0] * 3
    assert phase_metric(plain, "grpo", "dynamic_sampling_informative") == [None] * 3
    for name in ("loss", "entropy", "actions_token", "actions_start", "advantage_abs_max"):
        assert phase_metric(dynamic, "grpo", name) == phase_metric(plain, "grpo", name), name
    assert "dynamic sampling, up to 3 rounds" in (dynamic / "report.md").read_text()


def test_further_rounds_fill_the_update_with_groups_that_have_a_signal(tiny_model_dir, tmp_path, monkeypatch):
    """Steps draw until the update is full of groups whose filter reward differs, never a prompt twice in a
    step, and log the policy's statistics over every rollout drawn, not over the update's selection."""
    updates, scored_rounds = [], []
    original_update, original_score = LocalBackend.update, GRPOTrainer.score

    def recording_update(self, traj, advantages, step):
        updates.append(advantages.clone())
        return original_update(self, traj, advantages, step)

    def recording_score(self, problems, traj):
        scored_rounds.append((self.step, [p.question for p in problems[::2]], traj.counts()["tokens"]))
        return original_score(self, problems, traj)

    monkeypatch.setattr(LocalBackend, "update", recording_update)
    monkeypatch.setattr(GRPOTrainer, "score", recording_score)
    reward = "grpo.rewards=[{function: 'test_dynamic_sampling:half_the_prompts'}]"
    run = run_cli(tmp_path, "half", *tiny_overrides(tiny_model_dir, reward, *GRPO, "grpo.steps=4",
                                                      "grpo.dynamic_sampling_rounds=4",
                                                      "grpo.dynamic_sampling_reward=half_the_prompts"))
    rounds = phase_metric(run, "grpo", "sampling_rounds")
    informative = phase_metric(run, "grpo", "groups_informative")
    drawn_informative = phase_metric(run, "grpo", "dynamic_sampling_informative")
    tokens = phase_metric(run, "grpo", "tokens_per_completion")
    for step in range(4):
        this_step = [(questions, counts) for s, questions, counts in scored_rounds if s == step]
        assert len(this_step) == rounds[step]
        questions = sum((q for q, _ in this_step), [])
        assert len(set(questions)) == len(questions)  # no prompt twice in one step
        assert tokens[step] == pytest.approx(float(torch.cat([c for _, c in this_step]).float().mean()))
        assert informative[step] == min(drawn_informative[step], 2.0)  # the filter is the total here
    assert len(updates) == 4 and all(a.shape == (4,) for a in updates)
    assert any(r > 1 for r in rounds), rounds  # half the prompts give no signal: some steps draw again
    for advantages, drawn, kept in zip(updates, rounds, informative):
        with_signal = int((advantages.view(2, 2) != 0).any(dim=1).sum())
        assert with_signal == kept
        assert kept == 2 or drawn == 4  # a step stops early only once the update is full of signal
    assert phase_metric(run, "grpo", "groups_drawn") == [2.0 * r for r in rounds]
