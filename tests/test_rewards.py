"""Rewards: the built-ins on hand-made completions, finding rewards by name, path and entry
point, exact weighted totals, and the two error policies with their exact messages."""

import importlib.metadata
import math
import os
import sys
import textwrap
from pathlib import Path

import pytest

from rewards import (BUILTIN_REWARDS, gsm8k_correct, gsm8k_flexible_extract, gsm8k_format, gsm8k_steps,
                     gsm8k_strict_match, latent_cost, length_penalty)
from rlatent.data.grading import line_result, step_outcomes
from rlatent.config import GRPOConfig, RewardSpec, load_config
from rlatent.errors import ConfigError, RlatentError
from rewards.registry import RewardSet, resolve_reward, reward_stats

REPO = Path(__file__).parents[1]
COMPLETIONS = [
    "3 * 24 = <<3*24=72>>72\n#### 72",  # correct, formatted
    "She pays $1,000.00 in total.\n#### $1,000.00",  # correct with $ and commas
    "The answer is 71.\n#### 71",  # wrong
    "So the answer is 72.",  # correct by its last number, but no #### line
]
ANSWERS = ["72", "1000", "72", "72"]


def facts(n=4, **overrides):
    base = dict(
        latents=[0, 2, 4, 6][:n],
        blocks=[0, 1, 2, 3][:n],
        tokens=[10, 20, 30, 40][:n],
        forward_passes=[10, 22, 34, 46][:n],
        truncated=[False, False, True, False][:n],
        question=["q"] * n,
        answer=ANSWERS[:n],
        source=["gsm8k"] * n,
    )
    return base | overrides


# --------------------------------------------------------------------------- built-ins


def test_gsm8k_correct_compares_numbers():
    assert gsm8k_correct([""] * 4, COMPLETIONS, **facts()) == [1.0, 1.0, 0.0, 1.0]
    assert gsm8k_correct([""] * 2, ["#### 0.50", "no number here"], answer=["0.5", "3"]) == [1.0, 0.0]


def test_gsm8k_correct_needs_a_final_answer_line_when_truncated():
    text = ["So the answer is 72.", "So the answer is 72.", "#### 72\n", "#### 72", "#### 72"]
    truncated = [False, True, True, True, False]
    assert gsm8k_correct([""] * 5, text, answer=["72"] * 5, truncated=truncated) == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_lm_eval_grades_as_rewards():
    text = ["#### 1,000", "#### 18/5", "The answer is 72.", "#### 0.50", "#### 72\n#### 73"]
    answer = ["1000", "18", "72", "0.5", "73"]
    assert gsm8k_strict_match([""] * 5, text, answer=answer) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert gsm8k_flexible_extract([""] * 5, text, answer=answer) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert gsm8k_correct([""] * 5, text, answer=answer) == [1.0, 0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 72", 1.0),
        ("work\n#### $1,000.\n", 1.0),
        ("#### -3.5", 1.0),
        ("#### 5\nmore\n#### 72", 1.0),  # the last #### counts
        ("So the answer is 72.", 0.0),  # no #### line
        ("####", 0.0),
        ("#### about 7", 0.0),
        ("#### 7 apples", 0.0),
        ("#### 18/5", 0.0),  # a fraction is not one number
        ("#### - 3", 0.0),  # a spaced minus is not a sign
    ],
)
def test_gsm8k_format(text, expected):
    assert gsm8k_format(["q"], [text]) == [expected]


def test_latent_cost_per_latent_and_per_pass():
    assert latent_cost([""] * 4, COMPLETIONS, **facts()) == [-0.0, -0.02, -0.04, -0.06]
    assert latent_cost([""] * 4, COMPLETIONS, **facts(), per="pass", cost=0.5) == [-5.0, -11.0, -17.0, -23.0]
    with pytest.raises(ConfigError, match="per must be 'latent' or 'pass', got 'token'"):
        latent_cost([], [], latents=[], forward_passes=[], per="token")


def test_length_penalty_counts_tokens_over_target_and_truncation():
    got = length_penalty([""] * 4, COMPLETIONS, **facts(), target=20, cost=0.5, truncation_cost=1.0)
    assert got == [0.0, 0.0, -6.0, -10.0]


def test_builtin_registry():
    assert set(BUILTIN_REWARDS) == {"gsm8k_correct", "gsm8k_format", "gsm8k_strict_match", "gsm8k_flexible_extract",
                                    "gsm8k_steps", "latent_cost", "length_penalty"}
    import rewards.gsm8k
    import rewards.latent
    import rewards.length

    assert BUILTIN_REWARDS["latent_cost"] is rewards.latent.latent_cost


# --------------------------------------------------------------------------- resolving


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user package `userrw` on sys.path, written to tmp_path."""
    (tmp_path / "userrw").mkdir()
    (tmp_path / "userrw" / "__init__.py").write_text("")
    (tmp_path / "userrw" / "scores.py").write_text(
        textwrap.dedent(
            """
            NOT_A_FUNCTION = 3

            def exclaims(prompts, completions, bonus=1.0, **kwargs):
                return [bonus if c.endswith("!") else 0.0 for c in completions]

            def no_kwargs(prompts, completions):
                return [0.0] * len(completions)

            def needs_column(prompts, completions, difficulty, **kwargs):
                return [float(d) for d in difficulty]
            """
        )
    )
    (tmp_path / "userrw" / "broken.py").write_text("import not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("userrw", "userrw.scores", "userrw.broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "userrw.scores"


def test_resolve_builtin():
    assert resolve_reward("gsm8k_correct") is gsm8k_correct


def test_resolve_dotted_path_with_colon_or_dot(user_module):
    fn = resolve_reward("userrw.scores:exclaims")
    assert fn is resolve_reward("userrw.scores.exclaims")
    assert fn(["q", "q"], ["yes!", "no"], bonus=2.0) == [2.0, 0.0]


def test_resolve_entry_point(user_module, monkeypatch):
    calls = []

    def fake_entry_points(group):
        calls.append(group)
        return [importlib.metadata.EntryPoint(name="exclaim", value="userrw.scores:exclaims", group=group)]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    assert resolve_reward("exclaim")(["q"], ["hi!"]) == [1.0]
    assert calls == ["rlatent.rewards"]
    assert resolve_reward("gsm8k_format") is gsm8k_format  # built-ins come first


def test_resolve_example_from_repo_root_without_it_on_sys_path(monkeypatch):
    """`rlatent` run as a console script does not put the current directory on sys.path."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    for name in ("examples", "examples.my_rewards"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    fn = resolve_reward("examples.my_rewards:short_and_correct")
    assert fn([""] * 3, ["#### 8", "#### 8", "#### 9"], answer=["8"] * 3, tokens=[5, 61, 5], truncated=[False] * 3,
              max_tokens=60) == [
        1.0,
        0.0,
        0.0,
    ]


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "gsm8k_corect",
            "grpo.rewards[1].function: 'gsm8k_corect': not a built-in (gsm8k_correct, gsm8k_flexible_extract, "
            "gsm8k_format, gsm8k_steps, gsm8k_strict_match, latent_cost, length_penalty), no entry point in group 'rlatent.rewards', and not a dotted path "
            "'package.module:function'; did you mean 'gsm8k_correct'?",
        ),
        ("mypkg.rw:fn", "grpo.rewards[1].function: 'mypkg.rw:fn': module 'mypkg.rw' not found"),
        ("userrw.nope:fn", "grpo.rewards[1].function: 'userrw.nope:fn': module 'userrw.nope' not found"),
        (
            "userrw.scores:missing",
            "grpo.rewards[1].function: 'userrw.scores:missing': module 'userrw.scores' has no attribute 'missing'",
        ),
        (
            "userrw.scores:NOT_A_FUNCTION",
            "grpo.rewards[1].function: 'userrw.scores:NOT_A_FUNCTION': is a int, not a function",
        ),
        (
            "userrw.broken:fn",
            "grpo.rewards[1].function: 'userrw.broken:fn': importing module 'userrw.broken' failed: "
            "ModuleNotFoundError: No module named 'not_installed_dependency'",
        ),
    ],
)
def test_resolve_errors_are_one_line(user_module, name, message):
    with pytest.raises(ConfigError) as info:
        resolve_reward(name, where="grpo.rewards[1].function")
    assert str(info.value) == message


def test_reward_set_checks_specs_before_any_sampling(user_module):
    no_kwargs = r"^grpo.rewards\[1\].function: 'userrw.scores:no_kwargs' must accept \*\*kwargs"
    with pytest.raises(ConfigError, match=no_kwargs):
        RewardSet([RewardSpec(function="gsm8k_correct"), RewardSpec(function="userrw.scores:no_kwargs")])
    with pytest.raises(ConfigError) as info:
        RewardSet([RewardSpec(function="latent_cost", kwargs={"costs": 0.1})])
    assert str(info.value) == "grpo.rewards[0].kwargs: 'latent_cost' takes no option 'costs' (it takes: per, cost)"
    with pytest.raises(ConfigError, match=r"^grpo.rewards\[0\].kwargs: latent_cost: per must be"):
        RewardSet([RewardSpec(function="latent_cost", kwargs={"per": "token"})])
    with pytest.raises(ConfigError, match=r"^grpo.rewards\[0\].kwargs: 'latents' is a trajectory fact"):
        RewardSet([RewardSpec(function="userrw.scores:exclaims", kwargs={"latents": 3})])
    with pytest.raises(ConfigError, match=r"^grpo.rewards\[0\].weight: must be finite, got nan"):
        RewardSet([RewardSpec.model_construct(function="gsm8k_correct", weight=math.nan, kwargs={})])
    rewards = RewardSet([RewardSpec(function="userrw.scores:needs_column")])
    with pytest.raises(ConfigError, match="needs 'difficulty', which is neither a trajectory fact nor a dataset col"):
        rewards.score(["q"], ["a"], facts(1))


# --------------------------------------------------------------------------- scoring


def test_weights_combine_exactly(user_module):
    specs = [
        RewardSpec(function="gsm8k_correct", weight=1.0),
        RewardSpec(function="gsm8k_format", weight=0.25),
        RewardSpec(function="latent_cost", weight=2.0, kwargs={"per": "pass", "cost": 0.125}),
        RewardSpec(function="userrw.scores:exclaims", weight=-0.5, kwargs={"bonus": 4.0}),
    ]
    rewards = RewardSet(specs)
    completions = COMPLETIONS[:3] + ["So the answer is 72!"]
    total, per_reward, zeroed = rewards.score([""] * 4, completions, facts())
    assert per_reward == {
        "gsm8k_correct": [1.0, 1.0, 0.0, 1.0],
        "gsm8k_format": [1.0, 1.0, 1.0, 0.0],
        "latent_cost": [-1.25, -2.75, -4.25, -5.75],
        "exclaims": [0.0, 0.0, 0.0, 4.0],
    }
    # 1*c + 0.25*f + 2*l - 0.5*e, all exact in binary floating point
    assert total == [1.0 + 0.25 - 2.5, 1.0 + 0.25 - 5.5, 0.25 - 8.5, 1.0 - 11.5 - 2.0]
    assert zeroed == {name: 0 for name in per_reward}


def test_same_reward_twice_gets_distinct_names():
    specs = [RewardSpec(function="latent_cost"), RewardSpec(function="latent_cost", kwargs={"per": "pass"})]
    rewards = RewardSet(specs)
    assert rewards.names == ["latent_cost", "latent_cost_1"]


def test_default_config_rewards_build():
    rewards = RewardSet(GRPOConfig().rewards, GRPOConfig().reward_errors)
    total, _, _ = rewards.score([""] * 4, COMPLETIONS, facts())
    assert total == [1.1, 1.1, 0.1, 1.0]


def test_reward_set_from_yaml_with_example(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the resolver may append the current directory
    path = tmp_path / "run.yaml"
    path.write_text(
        textwrap.dedent(
            """
            grpo:
              reward_errors: zero
              rewards:
                - {function: gsm8k_correct, weight: 1.0}
                - {function: "examples.my_rewards:short_and_correct", weight: 0.5, kwargs: {max_tokens: 25}}
            """
        )
    )
    config = load_config(path)
    rewards = RewardSet(config.grpo.rewards, config.grpo.reward_errors)
    total, per_reward, _ = rewards.score([""] * 4, COMPLETIONS, facts())
    assert per_reward["short_and_correct"] == [1.0, 1.0, 0.0, 0.0]
    assert total == [1.5, 1.5, 0.0, 1.0]


# --------------------------------------------------------------------------- error policies


def _raises_on_71(prompts, completions, **kwargs):
    return [float(c[-2:]) if "71" not in c else float("seventy-one") for c in completions]


def _nan_on_third(prompts, completions, **kwargs):
    return [math.nan if i == 2 else 1.0 for i in range(len(completions))]


def _one_short(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def _a_string(prompts, completions, **kwargs):
    return ["1.0"] + [1.0] * (len(completions) - 1)


def _scalar(prompts, completions, **kwargs):
    return 1.0


def _bad_reward_set(monkeypatch, fn, errors):
    """A set of gsm8k_correct (weight 1) and the bad reward `fn` (weight 10), found by name."""
    monkeypatch.setitem(BUILTIN_REWARDS, "bad", fn)
    return RewardSet([RewardSpec(function="gsm8k_correct"), RewardSpec(function="bad", weight=10.0)], errors)


@pytest.mark.parametrize(
    "fn, message",
    [
        (
            _raises_on_71,
            "reward 'bad' raised ValueError: could not convert string to float: 'seventy-one' "
            "on sample 2 (\"The answer is 71. #### 71\")",
        ),
        (_nan_on_third, "reward 'bad' returned nan for sample 2 (\"The answer is 71. #### 71\")"),
        (_one_short, "reward 'bad' returned 3 values for 4 completions, expected a list of 4 floats"),
        (_a_string, "reward 'bad' returned '1.0' for sample 0 (\"3 * 24 = <<3*24=72>>72 #### 72\")"),
        (_scalar, "reward 'bad' returned a float for 4 completions, expected a list of 4 floats"),
    ],
)
def test_raise_policy_names_reward_and_sample(monkeypatch, fn, message):
    rewards = _bad_reward_set(monkeypatch, fn, "raise")
    with pytest.raises(RlatentError) as info:
        rewards.score([""] * 4, COMPLETIONS, facts())
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_raise_policy_excerpt_is_short(monkeypatch):
    rewards = _bad_reward_set(monkeypatch, _nan_on_third, "raise")
    long = ["x"] * 2 + ["The answer is " + "very " * 50 + "long"] + ["x"]
    with pytest.raises(RlatentError) as info:
        rewards.score([""] * 4, long, facts())
    assert str(info.value) == "reward 'bad' returned nan for sample 2 (\"The answer is very very very very ver...\")"


def test_raise_policy_batch_only_failure(monkeypatch):
    def fails_on_batches(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("judge server refused\nsecond line")
        return [0.0]

    rewards = _bad_reward_set(monkeypatch, fails_on_batches, "raise")
    with pytest.raises(RlatentError) as info:
        rewards.score([""] * 4, COMPLETIONS, facts())
    assert str(info.value) == (
        "reward 'bad' raised RuntimeError: judge server refused (on the whole batch; no single sample fails alone)"
    )


@pytest.mark.parametrize(
    "fn, bad_values, count",
    [
        (_raises_on_71, [0.0, 0.0, 0.0, 0.0], 4),  # a raise zeroes the whole batch of that reward
        (_nan_on_third, [1.0, 1.0, 0.0, 1.0], 1),
        (_one_short, [0.0, 0.0, 0.0, 0.0], 4),
        (_a_string, [0.0, 1.0, 1.0, 1.0], 1),
    ],
)
def test_zero_policy_scores_zero_and_counts(monkeypatch, caplog, fn, bad_values, count):
    rewards = _bad_reward_set(monkeypatch, fn, "zero")
    total, per_reward, zeroed = rewards.score([""] * 4, COMPLETIONS, facts())
    assert per_reward == {"gsm8k_correct": [1.0, 1.0, 0.0, 1.0], "bad": bad_values}
    assert zeroed == {"gsm8k_correct": 0, "bad": count}
    assert total == [c + 10.0 * b for c, b in zip(per_reward["gsm8k_correct"], bad_values)]
    assert "reward 'bad'" in caplog.text
    caplog.clear()
    assert rewards.score([""] * 4, COMPLETIONS, facts())[2]["bad"] == count  # counted again, warned once
    assert caplog.text == ""


def test_fact_sizes_are_checked():
    rewards = RewardSet([RewardSpec(function="gsm8k_correct")])
    with pytest.raises(RlatentError, match="4 completions but 4 prompts and facts of sizes"):
        rewards.score([""] * 4, COMPLETIONS, facts() | {"answer": ["72"]})


def test_reward_stats():
    stats = reward_stats({"gsm8k_correct": [1.0, 0.0, 1.0, 0.0], "latent_cost": [-0.5, -0.5]})
    assert stats == {
        "reward/gsm8k_correct_mean": 0.5,
        "reward/gsm8k_correct_std": 0.5,
        "reward/latent_cost_mean": -0.5,
        "reward/latent_cost_std": 0.0,
    }


def test_line_results():
    assert line_result("After that, she has 17-5 = 12 stickers.") == "12"  # written chain
    assert line_result("She has 3*24 = <<3*24=72>>72 dollars.") == "72"  # a calculator mark
    assert line_result("After that, she has 13 stickers.") == "13"  # expression replaced by a block
    assert line_result("She has no idea.") is None
    assert step_outcomes("A 3 b.\nC 9 d.\n#### 9", ["3", "8", "9"]) == [True, False, False]
    assert step_outcomes("It costs $1,000.0 = 1000.0.\n#### 1000", ["1000"]) == [True]  # compared as numbers
    assert line_result("She pays $1,250 in all.") == "1250" and line_result("Then 12, 13 and 14.") == "12"
    assert line_result("She has -3 = -3 left.") == "-3" and line_result("It makes CO2.") is None
    assert step_outcomes("She pays $1,250 in all.", ["1250"]) == [True]


def test_steps_reward_pays_each_right_step_on_its_line():
    solution = "She has 17-5 = <<17-5=12>>12.\nThen 12*3 = <<12*3=36>>36.\nThen 36+4 = <<36+4=40>>40.\n#### 40"
    completions = [
        "She has 12.\nThen 36.\nThen 40.\n#### 40",  # every step
        "She has 12.\nThen 35.\nThen 40.\n#### 40",  # the middle step wrong
        "She has 12 left.\n#### 12",  # stops after the first step
        "Then 36.\nShe has 12.\nThen 40.",  # right numbers on the wrong lines
        "#### 40",  # the answer alone: no step line
    ]
    scores = gsm8k_steps(["q"] * 5, completions, solution=[solution] * 5)
    assert scores == [1.0, 2 / 3, 1 / 3, 1 / 3, 0.0]
    assert gsm8k_steps(["q"], ["#### 4"], solution=["No calculator here.\n#### 4"]) == [0.0]
    assert RewardSet([RewardSpec(function="gsm8k_steps")]).names == ["gsm8k_steps"]
