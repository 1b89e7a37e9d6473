"""`rlatent ablate`: the statistics on hand-computed cases, the grid and its named points, and a 2x2 grid end to
end on the tiny model (every cell on the same problems, reruns skip finished cells, a failing cell never loses
the others); cells as processes (--jobs, --timeout) with some points going on into phase 2."""

import json
from pathlib import Path

import pytest

from rlatent.errors import ConfigError
from rlatent.run import ablate, ablation_grid
from rlatent.run.cli import main
from rlatent.run.overlap import seen_arithmetic
from rlatent.run.pool import Outcome
from rlatent.run.stats import (constant_answer, constant_answer_split, discordant_pairs, mcnemar_exact,
                               mean_t_interval, paired_difference, t_quantile_975, wilson_interval)

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")
SMALL = ["sft.steps=2", "sft.eval_every=1", "sft.batch_size=2", "data.synthetic.num_train=8",
         "data.synthetic.num_eval=4", "eval.limit=4", "eval.batch_size=4", "eval.max_new_tokens=8",
         "eval.num_samples=2"]
GRID = ["--grid", "latent.mode=latent,pause", "--grid", "latent.k=1,2"]


# ---- statistics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("successes, n, expected", [
    (0, 10, (0.0, 0.2775)),      # z^2/(n+z^2) = 3.8415/13.8415
    (5, 10, (0.2366, 0.7634)),
    (10, 10, (0.7225, 1.0)),
    (41, 100, (0.3187, 0.5080)),  # centre 0.429207/1.038415 = 0.41333, half 1.96 * 0.050150 / 1.038415
])
def test_wilson_interval_known_values(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected[0], abs=1e-4) and high == pytest.approx(expected[1], abs=1e-4)


def test_wilson_interval_edges():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


@pytest.mark.parametrize("only_a, only_b, p", [
    (10, 2, 0.038574),   # 2 * (1 + 12 + 66) / 4096
    (2, 10, 0.038574),   # symmetric
    (3, 0, 0.25),        # 2 / 8
    (0, 6, 0.03125),     # 2 / 64
    (5, 5, 1.0),         # capped at 1
    (0, 0, 1.0),         # no discordant pair: no evidence
])
def test_mcnemar_exact_known_values(only_a, only_b, p):
    assert mcnemar_exact(only_a, only_b) == pytest.approx(p, abs=1e-6)


def test_mcnemar_large_counts_do_not_underflow():
    assert 0 < mcnemar_exact(600, 400) < 1e-9  # 2^-1000 tail terms stay exact in rationals


def test_discordant_pairs():
    assert discordant_pairs([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (2, 1)
    with pytest.raises(ValueError):
        discordant_pairs([1, 0], [1])


def test_constant_answer_is_the_commonest_reference_over_every_group():
    answer, outcomes = constant_answer({0: ["7", "3", "3"], 1: ["7", "7", "5"]})
    assert answer == "7" and outcomes == {0: [1, 0, 0], 1: [1, 1, 0]}
    assert constant_answer({"a": ["No", "Yes"]}) == ("No", {"a": [1, 0]})  # a tie: the reference seen first


def test_constant_answer_split_counts_the_answer_and_the_rest():
    # said "0" twice (once rightly); right with another answer: "7" only (None never matches)
    assert constant_answer_split("0", ["0", "0", "7", None, "3"], [1, 0, 1, 0, 0], ["0", "5", "7", "0", "4"]) == (2, 1)
    assert constant_answer_split("Yes", [], [], []) == (0, 0)
    with pytest.raises(ValueError, match="one prediction, outcome and reference per problem"):
        constant_answer_split("0", ["0"], [1, 0], ["0", "1"])


def test_t_interval_known_sample():
    # [1, 2, 3, 4]: mean 2.5, s = 1.290994, se = 0.645497, t(0.975, 3) = 3.182446 -> half-width 2.054260
    mean, low, high = mean_t_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and low == pytest.approx(0.445740, abs=1e-5) and high == pytest.approx(4.554260, abs=1e-5)
    # three seeds 0.40, 0.45, 0.50: s = 0.05, t(0.975, 2) = 4.302653 -> 0.45 +- 0.124207
    mean, low, high = mean_t_interval([0.40, 0.45, 0.50])
    assert mean == pytest.approx(0.45) and high - mean == pytest.approx(0.124207, abs=1e-5)
    assert mean_t_interval([0.3]) == (0.3, None, None)


def test_t_quantiles():
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile_975(30) == pytest.approx(2.0423, abs=1e-4)
    assert t_quantile_975(31) == pytest.approx(2.039513, abs=1e-6)   # the series past the table
    assert t_quantile_975(120) == pytest.approx(1.979930, abs=1e-6)
    assert t_quantile_975(1000) == pytest.approx(1.962339, abs=1e-6)


# ---- the grid ---------------------------------------------------------------------------------------------


def test_parse_grid():
    assert ablation_grid.parse_grid(["latent.mode=latent,pause", "data.synthetic.operators=[+,-],'*'"]) == [
        ("latent.mode", ["latent", "pause"]), ("data.synthetic.operators", ["[+,-]", "'*'"])]
    for bad in (["latent.mode"], ["latent.mode="], ["=1,2"], ["latent.k=1,,2"], ["seed=1,2"], ["output.dir=a,b"],
                ["latent.k=1", "latent.k=2"], ["latent.k=1,1"]):
        with pytest.raises(ConfigError):
            ablation_grid.parse_grid(bad)


def test_parse_points():
    grid = [("latent.k", ["1", "2"])]
    assert ablation_grid.parse_points([["cot", "latent.mode=none", "latent.placement=insert"], ["base"]], grid) == [
        ("cot", ["latent.mode=none", "latent.placement=insert"]), ("base", [])]
    for bad in ([["latent.mode=none"]], [["a", "x"]], [["a", "seed=1"]], [["a", "output.dir=x"]], [["a"], ["a"]],
                [["a", "latent.k=3"]]):
        with pytest.raises(ConfigError):
            ablation_grid.parse_points(bad, grid)


def test_points_cross_the_grid_and_seeds(tmp_path):
    points = [("cot", ["latent.mode=none", "latent.placement=insert"]), ("latent", ["latent.mode=latent"])]
    cells = ablation_grid.plan_cells([("latent.k", ["1", "2"])], [0, 1], tmp_path, points)
    assert [c.id for c in cells[:3]] == ["cot,latent.k=1,seed=0", "cot,latent.k=1,seed=1", "cot,latent.k=2,seed=0"]
    assert len(cells) == 8 and cells[-1].id == "latent,latent.k=2,seed=1"
    assert cells[0].overrides == ["latent.mode=none", "latent.placement=insert", "latent.k=1"]
    assert cells[0].parts == ["cot", "latent.k=1"] and cells[0].label == "cot latent.k=1 seed=0"
    commands = ablate.cell_commands(cells, "sft", ["latent"])
    assert [commands[c.id] for c in cells] == ["sft"] * 4 + ["train"] * 4
    assert set(ablate.cell_commands(cells, "sft", ["latent.k=2"]).values()) == {"sft", "train"}
    with pytest.raises(ConfigError, match="no --point or --grid value of that name"):
        ablate.cell_commands(cells, "sft", ["pause"])
    with pytest.raises(ConfigError, match="every cell runs both phases"):
        ablate.cell_commands(cells, "train", ["latent"])


def test_cell_ids_are_readable_safe_and_unique(tmp_path):
    assert ablation_grid.cell_id(["latent.mode=pause"], 1) == "latent.mode=pause,seed=1"
    assert "/" not in ablation_grid.cell_id(["model.name_or_path=/a/b c"], 0)
    assert len(ablation_grid.cell_id(["x=" + "v" * 500], 0)) <= 120
    cells = ablation_grid.plan_cells([("a", ["x/y", "x:y"]), ("b", ["1", "2"])], [0, 1], tmp_path)
    assert len(cells) == 8 and len({c.id for c in cells}) == 8
    assert [c.seed for c in cells[:2]] == [0, 1] and cells[0].label == "a=x/y b=1 seed=0"


def fake_cell(point, seed, test, ood=None, questions="q", references=None):
    splits = {"test": {"correct": test, "metrics": {"accuracy": sum(test) / len(test), "strict_match": 0.5,
                                                     "tokens_per_answer": 10.0, "latents_per_answer": 2.0,
                                                     "forward_passes_per_answer": 12.0},
                       "questions_sha1": questions}}
    if references is not None:
        splits["test"]["references"] = references
    if ood is not None:
        splits["ood"] = {"correct": ood, "metrics": {"accuracy": sum(ood) / len(ood)}, "questions_sha1": "o"}
    return {"id": f"{point},seed={seed}", "overrides": [point], "seed": seed, "status": "done", "splits": splits,
            "diagnostics": {"latent_gain_shuffle": 0.01 * (seed + 1)}, "wall_seconds": 10.0 + seed}


def test_rows_pool_seeds_and_pairs_match_seeds():
    from rlatent.run.ablation_report import render_markdown
    from rlatent.run.ablation_stats import aggregate, paired_tests

    cells = [fake_cell("m=a", 0, [1, 1, 1, 0], ood=[1, 0]), fake_cell("m=a", 1, [1, 1, 0, 0], ood=[1, 1]),
             fake_cell("m=b", 0, [0, 1, 0, 0], ood=[0, 0]), fake_cell("m=b", 1, [0, 0, 0, 0], ood=[0, 1]),
             {"id": "m=c,seed=0", "overrides": ["m=c"], "seed": 0, "status": "failed", "error": "boom"},
             fake_cell("m=d", 1, [1, 1, 1, 1], questions="other")]
    rows = {r["point"]: r for r in aggregate(cells)}
    a = rows["m=a"]
    assert a["seeds_done"] == 2 and a["test"]["correct"] == 5 and a["test"]["problems"] == 8
    assert a["test"]["wilson95"] == pytest.approx(list(wilson_interval(5, 8)))
    mean, low, high = mean_t_interval([0.75, 0.5])
    assert a["test"]["seed_mean"] == mean and a["test"]["seed_t95"] == pytest.approx([low, high])
    assert a["latent_gain_shuffle"] == pytest.approx(0.015) and a["wall_seconds"] == 10.5
    assert rows["m=c"]["seeds_done"] == 0 and rows["m=c"]["errors"] == ["boom"] and "test" not in rows["m=c"]
    tests = {(t["a"], t["b"], t["split"]): t for t in paired_tests(cells)}
    ab = tests[("m=a", "m=b", "test")]  # a only right: 2 problems of seed 0 + 2 of seed 1
    assert ab["problems"] == 8 and (ab["only_a"], ab["only_b"]) == (4, 0) and ab["difference"] == -0.5
    # both seeds were graded on the same 4 problems ("q"): they count once, and no replicate can favour b
    assert ab["distinct"] == 4 and ab["test"] == "hierarchical bootstrap" and ab["high"] <= 0
    expected = paired_difference([([("q", i) for i in range(4)], x, y) for x, y in
                                  (([1, 1, 1, 0], [0, 1, 0, 0]), ([1, 1, 0, 0], [0, 0, 0, 0]))])
    assert (ab["low"], ab["high"], ab["p"]) == (expected.low, expected.high, expected.p)
    assert tests[("m=a", "m=b", "ood")]["problems"] == 4
    assert tests[("m=a", "m=d", "test")]["seeds"] == [1] and tests[("m=a", "m=d", "test")]["p"] is None
    assert not any("m=c" in key for key in tests)  # nothing finished: nothing to pair
    md = render_markdown({"name": "x", "cells": cells})
    assert "| m=a | 2/2 | 0.625 [" in md and "different problems" in md and "| m=c | 0/1 |" in md
    assert "## Against the baseline\n\nEach row minus the first grid point, *m=a*" in md
    assert f"| m=b | test | 0,1 | 0.625 -> 0.125 | -0.500 [{ab['low']:+.3f}, {ab['high']:+.3f}] |" in md


def test_each_number_names_its_split_and_seen_arithmetic_is_apart():
    from rlatent.run.ablation_report import render_markdown
    from rlatent.run.ablation_stats import aggregate, paired_tests

    cells = [fake_cell("m=a", 0, [1, 1, 0, 0]), fake_cell("m=b", 0, [1, 0, 1, 1])]
    for cell in cells:
        cell["splits"]["test"].update(split="dev", seen=[1, 0, 0, 1])
    [a, b] = aggregate(cells)
    assert a["test"]["arithmetic"] == {"seen": [2, 1], "unseen": [2, 1]}
    assert b["test"]["arithmetic"] == {"seen": [2, 2], "unseen": [2, 1]}
    [test] = paired_tests(cells)
    assert test["test"] == "exact McNemar" and test["p"] == mcnemar_exact(1, 2)
    assert test["arithmetic"] == {"seen": [2, 1, 2], "unseen": [2, 1, 1]}
    md = render_markdown({"name": "x", "cells": cells})
    assert "| dev accuracy [Wilson 95 %] | dev seeds [t 95 %] | dev seen / unseen arithmetic |" in md
    assert "| 0.500 (n=2) / 0.500 (n=2) |" in md and "| m=b | dev | 0 | 0.500 -> 0.750 |" in md
    assert "| 0.500 -> 1.000 (n=2) | 0.500 -> 0.500 (n=2) |" in md  # seen, unseen: baseline -> row
    assert "## Paired comparisons, in distribution (dev)" in md


def test_the_constant_answer_row_pairs_with_every_grid_point():
    from rlatent.run.ablation_report import render_markdown
    from rlatent.run.ablation_stats import CONSTANT, aggregate, paired_tests, with_constant_answer

    cells = [fake_cell("m=a", 0, [1, 0, 1, 0], references=["No", "Yes", "Yes", "Yes"]),
             fake_cell("m=a", 1, [1, 1, 1, 1], references=["No", "No", "No", "Yes"]),
             fake_cell("m=b", 0, [0, 1, 1, 1], references=["No", "Yes", "Yes", "Yes"]),
             fake_cell("m=c", 1, [0, 0], questions="other", references=["Yes", "Yes"])]
    constant = with_constant_answer(cells)[len(cells):]
    # seed 1's cells were graded on different problems: no constant answer for it. Seed 0 alone: "Yes".
    assert [(c["seed"], c["splits"]["test"]["answer"], c["splits"]["test"]["correct"]) for c in constant] == [
        (0, "Yes", [0, 1, 1, 1])]
    assert "ood" not in constant[0]["splits"]  # no references recorded there
    rows = {r["point"]: r for r in aggregate(with_constant_answer(cells))}
    assert rows[CONSTANT]["test"]["accuracy"] == 0.75 and rows[CONSTANT]["tokens_per_answer"] is None
    tests = {(t["a"], t["b"]): t for t in paired_tests(with_constant_answer(cells))}
    assert (tests[("m=a", CONSTANT)]["only_a"], tests[("m=a", CONSTANT)]["only_b"]) == (1, 2)  # seed 0 only
    assert tests[("m=b", CONSTANT)]["only_a"] == tests[("m=b", CONSTANT)]["only_b"] == 0
    assert "| constant answer | 1/1 | 0.750 [" in render_markdown({"name": "x", "cells": cells})


def test_phase_two_is_set_against_each_cells_own_start():
    """Two seeds of one grid point, phase 1 -> 2 on the same problems: pooled discordant counts; the constant
    answer ("7", the commonest reference) said less and right answers that are not it rising; and phase 2's
    own commonest answer ("0", not the constant answer) taking over."""
    from rlatent.run.ablation_report import render_markdown
    from rlatent.run.ablation_stats import phase_two_tests, with_constant_answer

    refs = ["7", "7", "0", "12"]

    def cell(seed, before, after, said_before, said_after):
        c = fake_cell("m=a", seed, after, references=refs)
        c["splits"]["test"]["predictions"] = said_after
        c["phase1_splits"] = {"test": {"correct": before, "questions_sha1": "q", "references": refs,
                                       "predictions": said_before}}
        c["phase2_diagnostics"] = {"latent_gain_shuffle": -0.01 * (seed + 1)}
        return c

    cells = [cell(0, [0, 1, 0, 1], [0, 0, 1, 1], [None, "7", "3", "12"], ["0", "0", "0", "12"]),
             cell(1, [0, 1, 0, 0], [0, 1, 1, 0], ["5", "7", "5", "1"], ["0", "7", "0", "1"]),
             fake_cell("m=b", 0, [1, 1, 1, 1], references=refs)]  # phase 1 only: no phase-2 row
    [test] = phase_two_tests(with_constant_answer(cells))
    assert (test["point"], test["split"], test["seeds"], test["problems"]) == ("m=a", "test", 2, 8)
    assert (test["accuracy_a"], test["accuracy_b"], test["difference"]) == (3 / 8, 4 / 8, 1 / 8)
    assert (test["only_a"], test["only_b"], test["test"]) == (1, 2, "hierarchical bootstrap")
    assert test["constant_answer"] == "7" and test["says_constant"] == [2, 1] and test["right_other"] == [1, 3]
    assert test["top_answer"] == "0" and test["says_top"] == [0, 5]
    assert test["shuffle_gain"] == pytest.approx([0.015, -0.015])  # seeds 0 and 1: +0.01, +0.02 -> -0.01, -0.02
    md = render_markdown({"name": "x", "cells": cells})
    assert "## Phase 2 against phase 1" in md and "| m=a | test | 2 | 0.375 -> 0.500 | 1 | 2 |" in md
    assert "| 2 -> 1 | 1 -> 3 | '0': 0 -> 5 | +0.0150 -> -0.0150 |" in md


# ---- end to end on the tiny model ------------------------------------------------------------------------


def ablate_args(model_dir, output, name, *extra):
    return ["ablate", CONFIG, f"model.name_or_path={model_dir}", f"output.dir={output}", *SMALL, "--command", "sft",
            "--name", name, *extra]


def cell_files(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((root / "cells").glob(f"*/{ablate.CELL_FILE}"))}


@pytest.fixture(scope="module")
def grid_run(tiny_model_dir, tmp_path_factory, one_torch_thread):
    """The 2x2 grid (latent.mode x latent.k), one seed, phase 1 only; run once for the module."""
    output = tmp_path_factory.mktemp("ablate")
    status = main(ablate_args(tiny_model_dir, output, "grid", *GRID))
    return output / "grid", status


def test_grid_runs_every_cell_and_writes_the_table(grid_run):
    root, status = grid_run
    assert status == 0
    data = json.loads((root / "ablation.json").read_text())
    assert [c["status"] for c in data["cells"]] == ["done"] * 4
    assert [c["id"] for c in data["cells"]] == ["latent.mode=latent,latent.k=1,seed=0",
                                                "latent.mode=latent,latent.k=2,seed=0",
                                                "latent.mode=pause,latent.k=1,seed=0",
                                                "latent.mode=pause,latent.k=2,seed=0"]
    for cell in data["cells"]:
        assert (root / cell["run_dir"] / "checkpoints" / "step_000002").is_dir()
        for split in ("test", "ood"):
            entry = cell["splits"][split]
            assert len(entry["correct"]) == 4 and set(entry["correct"]) <= {0, 1}
            assert entry["metrics"]["accuracy"] == pytest.approx(sum(entry["correct"]) / 4)
            assert entry["wilson95"][0] <= entry["metrics"]["accuracy"] <= entry["wilson95"][1]
        assert {"latent_gain_zeros", "latent_gain_noise", "latent_gain_shuffle"} <= set(cell["diagnostics"])
        assert cell["wall_seconds"] > 0
    assert [r["point"] for r in data["rows"]][4:] == ["constant answer"]
    assert len(data["paired"]) == 10 * 2  # every pair of the 5 rows, in and out of distribution
    assert all(t["problems"] == 4 and t["test"] == "exact McNemar" and t["p"] == mcnemar_exact(t["only_a"], t["only_b"])
               and t["low"] <= t["difference"] <= t["high"] for t in data["paired"])
    md = (root / "ablation.md").read_text()
    assert "| latent.mode=pause, latent.k=2 | 1/1 |" in md and "exact McNemar" in md and "out of distribution" in md
    assert "| test accuracy [Wilson 95 %] |" in md and "## Paired comparisons, out of distribution (ood)" in md
    assert (root / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_cell_is_evaluated_on_the_same_problems(grid_run):
    from rlatent.config import load_config
    from rlatent.data.splits import load_split

    root, _ = grid_run
    cells = cell_files(root)
    assert len(cells) == 4
    cfg = load_config(CONFIG, ["model.name_or_path=x", *SMALL])
    for split in ("test", "ood"):
        expected = [p.question for p in load_split(cfg.data, split, 4)[0]]
        assert len(expected) == 4
        assert all(c["splits"][split]["questions"] == expected for c in cells.values())
        references = [p.final_answer for p in load_split(cfg.data, split, 4)[0]]
        assert all(c["splits"][split]["references"] == references for c in cells.values())
        # which split, and which problems' arithmetic the cell's training problems did
        seen = seen_arithmetic(load_split(cfg.data, "train")[0], load_split(cfg.data, split, 4)[0])
        assert all(c["splits"][split]["split"] == split and c["splits"][split]["seen"] == list(map(int, seen))
                   for c in cells.values())
    assert cells["latent.mode=latent,latent.k=1,seed=0"]["splits"]["test"]["questions"] != \
        cells["latent.mode=latent,latent.k=1,seed=0"]["splits"]["ood"]["questions"]


def test_report_is_rebuilt_from_the_json_alone(grid_run, tmp_path):
    root, _ = grid_run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "ablation.json").write_text((root / "ablation.json").read_text())
    assert main(["ablate", "--report", str(copy)]) == 0
    assert (copy / "ablation.md").read_text() == (root / "ablation.md").read_text()
    assert (copy / "ablation.png").is_file()


def test_a_train_cell_is_set_against_its_own_phase_one(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    """`--command train`: the cell keeps phase 1's outcomes beside its final ones, and the report sets them
    against each other. Killed after its final checkpoint, the cell is evaluated again from its checkpoints,
    phase 1's included, to the same outcomes (greedy evaluation)."""
    args = ["ablate", CONFIG, f"model.name_or_path={tiny_model_dir}", f"output.dir={tmp_path}", *SMALL,
            "grpo.steps=1", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=8",
            "--command", "train", "--name", "lift", "--grid", "latent.k=1"]
    assert main(args) == 0
    cell = tmp_path / "lift" / "cells" / "latent.k=1,seed=0"
    first = json.loads((cell / ablate.CELL_FILE).read_text())
    for split in ("test", "ood"):
        for key in ("splits", "phase1_splits"):
            entry = first[key][split]
            assert len(entry["correct"]) == len(entry["predictions"]) == 4, (key, split)
        assert first["phase1_splits"][split]["questions"] == first["splits"][split]["questions"]
    # the latent gains of phase 2's final model, next to phase 1's
    assert {"latent_gain_zeros", "latent_gain_shuffle"} <= set(first["phase2_diagnostics"]) & set(first["diagnostics"])
    data = json.loads((tmp_path / "lift" / "ablation.json").read_text())
    assert [(t["point"], t["split"], t["problems"]) for t in data["phase2_vs_phase1"]] == [
        ("latent.k=1", "test", 4), ("latent.k=1", "ood", 4)]
    for t in data["phase2_vs_phase1"]:
        assert len(t["says_constant"]) == 2
        assert t["shuffle_gain"] == [first["diagnostics"]["latent_gain_shuffle"],
                                     first["phase2_diagnostics"]["latent_gain_shuffle"]]
        # the tiny model may write no number at all: then phase 2 has no commonest answer to report
        assert ("top_answer" in t) == any(p is not None for p in first["splits"][t["split"]]["predictions"])
    assert "## Phase 2 against phase 1" in (tmp_path / "lift" / "ablation.md").read_text()
    (cell / ablate.CELL_FILE).unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "[1/1] latent.k=1 seed=0: done" in capsys.readouterr().out
    again = json.loads((cell / ablate.CELL_FILE).read_text())
    assert (cell / "ablation_eval" / "samples_sft_ood.jsonl").is_file()
    for key in ("splits", "phase1_splits"):
        for split in ("test", "ood"):
            assert again[key][split]["correct"] == first[key][split]["correct"], (key, split)
            assert again[key][split]["predictions"] == first[key][split]["predictions"], (key, split)


def test_rerun_skips_finished_cells(grid_run, tiny_model_dir, capsys):
    root, _ = grid_run
    metrics = {p: p.stat().st_mtime_ns for p in root.glob("cells/*/metrics.jsonl")}
    assert len(metrics) == 4
    capsys.readouterr()
    checkpoints = {p: p.stat().st_mtime_ns for p in root.glob("cells/*/checkpoints/*")}
    assert main(ablate_args(tiny_model_dir, root.parent, "grid", *GRID)) == 0
    assert {p: p.stat().st_mtime_ns for p in root.glob("cells/*/checkpoints/*")} == checkpoints  # nothing retrained
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 4 and "[4/4]" in out and "running" not in out
    assert {p: p.stat().st_mtime_ns for p in root.glob("cells/*/metrics.jsonl")} == metrics
    # A cell killed after its final checkpoint but before its results were recorded is evaluated, not retrained.
    cell = root / "cells" / "latent.mode=pause,latent.k=1,seed=0"
    (cell / ablate.CELL_FILE).unlink()
    assert main(ablate_args(tiny_model_dir, root.parent, "grid", *GRID)) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 3 and "[3/4] latent.mode=pause latent.k=1 seed=0: done" in out
    assert {p: p.stat().st_mtime_ns for p in root.glob("cells/*/metrics.jsonl")} == metrics
    assert json.loads((cell / ablate.CELL_FILE).read_text())["splits"]["test"]["problems"] == 4
    assert (cell / "ablation_eval" / "samples_ood.jsonl").is_file()
    # The same cell with another config is refused, never overwritten: its run and its results stay.
    before = (cell / ablate.CELL_FILE).read_text()
    assert main(ablate_args(tiny_model_dir, root.parent, "grid", "eval.max_new_tokens=9", "--grid",
                            "latent.mode=pause", "--grid", "latent.k=1")) == 1
    out = capsys.readouterr().out
    assert "another config (eval.max_new_tokens: 8 -> 9)" in out
    assert (cell / ablate.CELL_FILE).read_text() == before
    assert {p: p.stat().st_mtime_ns for p in root.glob("cells/*/metrics.jsonl")} == metrics


def test_a_failing_cell_is_recorded_and_the_others_complete(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    # latent.k=0 is refused by the config: that cell fails, the k=1 cell still runs.
    status = main(ablate_args(tiny_model_dir, tmp_path, "bad", "--grid", "latent.k=0,1"))
    assert status == 1
    captured = capsys.readouterr()
    assert "1 of 2 cells failed" in captured.err and "latent.k=0 seed=0: failed" in captured.out
    data = json.loads((tmp_path / "bad" / "ablation.json").read_text())
    failed, done = data["cells"]
    assert failed["status"] == "failed" and "latent.k" in failed["error"] and "\n" not in failed["error"]
    assert done["status"] == "done" and done["splits"]["test"]["problems"] == 4
    md = (tmp_path / "bad" / "ablation.md").read_text()
    assert "| latent.k=0 | 0/1 |" in md and failed["error"].replace("|", "\\|") in md
    assert "| latent.k=1 | 1/1 |" in md


def test_unknown_key_in_the_overrides_stops_before_any_cell(tiny_model_dir, tmp_path, capsys):
    assert main(ablate_args(tiny_model_dir, tmp_path, "x", "sft.lrr=1", "--grid", "latent.k=1,2")) == 2
    assert "sft.lrr" in capsys.readouterr().err and not (tmp_path / "x").exists()


class FakeRay:
    """Just enough of `ray` to check the tasks `rlatent ablate` builds: one per cell to run, each returning
    a canned record (or dying, as a killed worker does)."""

    def __init__(self):
        self.tasks = []

    def remote(self, function):
        fake = self

        class Task:
            def options(self, **options):
                class Bound:
                    def remote(self, spec):
                        fake.tasks.append((function, options, spec))
                        return len(fake.tasks) - 1
                return Bound()
        return Task()

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        function, options, spec = self.tasks[ref]
        if spec["cell_overrides"] == ["latent.k=2"]:
            raise RuntimeError("worker died")
        return {"id": spec["id"], "overrides": spec["cell_overrides"], "seed": spec["seed"], "status": "failed",
                "error": "canned", "wall_seconds": 0.0}


def test_ray_backend_runs_cells_as_tasks(tiny_model_dir, tmp_path, monkeypatch, capsys):
    fake = FakeRay()
    monkeypatch.setattr(ablate, "connect_ray", lambda distributed: (fake, False))
    status = main(ablate_args(tiny_model_dir, tmp_path, "ray", "distributed.backend=ray", "--grid", "latent.k=1,2",
                              "--seeds", "2"))
    assert status == 1
    assert len(fake.tasks) == 4
    assert all(function is ablate.run_cell_task and options["num_cpus"] == ablate.CELL_CPUS
               for function, options, _ in fake.tasks)
    specs = [spec for _, _, spec in fake.tasks]
    assert [s["id"] for s in specs] == ["latent.k=1,seed=0", "latent.k=1,seed=1", "latent.k=2,seed=0",
                                        "latent.k=2,seed=1"]
    assert all(s["command"] == "sft" and Path(s["dir"]).parent == tmp_path / "ray" / "cells" for s in specs)
    json.dumps(specs)  # plain data: what a Ray task is handed
    data = json.loads((tmp_path / "ray" / "ablation.json").read_text())
    assert [c["error"] for c in data["cells"]] == ["canned", "canned", "Ray task: RuntimeError: worker died",
                                                   "Ray task: RuntimeError: worker died"]
    assert "4 of 4 cells failed" in capsys.readouterr().err
    assert "| latent.k=2 | 0/2 |" in (tmp_path / "ray" / "ablation.md").read_text()


@pytest.mark.slow
def test_ray_backend_runs_cells_on_a_real_local_ray(tiny_model_dir, tmp_path, monkeypatch, request):
    """Two cells as parallel Ray tasks (one worker process each) on a Ray instance the command starts and stops."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    if ray.is_initialized():
        pytest.skip("another test left Ray running")
    monkeypatch.chdir(request.config.rootpath)
    status = main(ablate_args(tiny_model_dir, tmp_path, "ray", "distributed.backend=ray", "distributed.num_cpus=2",
                              "--grid", "latent.k=1,2"))
    assert status == 0 and not ray.is_initialized()
    data = json.loads((tmp_path / "ray" / "ablation.json").read_text())
    assert [c["status"] for c in data["cells"]] == ["done", "done"]
    assert data["cells"][0]["splits"]["test"]["questions_sha1"] == data["cells"][1]["splits"]["test"]["questions_sha1"]


def test_cells_stopped_at_the_timeout_or_crashed_are_recorded_with_their_log(tiny_model_dir, tmp_path, monkeypatch,
                                                                             capsys):
    """The process pool's verdicts as `rlatent ablate` records them: no cell trains here (`run_jobs` stands in)."""
    jobs = {}

    def fake_run_jobs(given, parallel, timeout, done):
        jobs.update(parallel=parallel, timeout=timeout, logs=[job.log for job in given])
        done(given[0], Outcome(None, None, 7.5))  # stopped at the limit
        done(given[1], Outcome(None, 1, 2.0))     # died without a record (killed for memory, say)

    monkeypatch.setattr(ablate, "run_jobs", fake_run_jobs)
    assert main(ablate_args(tiny_model_dir, tmp_path, "t", "--grid", "latent.k=1,2", "--jobs", "2",
                            "--timeout", "7")) == 1
    root = tmp_path / "t"
    assert (jobs["parallel"], jobs["timeout"]) == (2, 7.0)
    assert jobs["logs"] == [root / "cells" / "latent.k=1,seed=0.log", root / "cells" / "latent.k=2,seed=0.log"]
    stopped, crashed = json.loads((root / "ablation.json").read_text())["cells"]
    assert stopped["error"] == (f"stopped after --timeout 7 s; run the ablation again to resume it from its last "
                                f"checkpoint (log: {jobs['logs'][0]})")
    assert stopped["wall_seconds"] == 7.5 and stopped["command"] == "sft"
    assert crashed["error"] == f"its process exited with code 1 (log: {jobs['logs'][1]})"
    assert json.loads((root / "cells" / "latent.k=2,seed=0" / ablate.CELL_FILE).read_text())["status"] == "failed"
    assert "2 of 2 cells failed" in capsys.readouterr().err
    assert main(ablate_args(tiny_model_dir, tmp_path, "r", "distributed.backend=ray", "--jobs", "2")) == 2
    assert "--jobs and --timeout run cells as local processes" in capsys.readouterr().err


@pytest.mark.slow
def test_named_points_in_processes_with_one_going_on_into_phase_two(tiny_model_dir, tmp_path, one_torch_thread):
    """Two named points, two cells at once in their own processes, on the dev split; only `long` runs phase 2."""
    status = main(ablate_args(tiny_model_dir, tmp_path, "points", "eval.split=dev", "grpo.steps=1",
                              "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=8",
                              "--point", "short", "latent.k=1", "--point", "long", "latent.k=2", "--phase2", "long",
                              "--jobs", "2"))
    assert status == 0
    root = tmp_path / "points"
    data = json.loads((root / "ablation.json").read_text())
    short, long = data["cells"]
    assert (short["id"], short["point"], short["command"]) == ("short,seed=0", "short", "sft")
    assert (long["id"], long["point"], long["command"]) == ("long,seed=0", "long", "train")
    assert "phase1_splits" in long and "phase1_splits" not in short
    assert short["splits"]["test"]["split"] == long["phase1_splits"]["test"]["split"] == "dev"
    assert all((root / "cells" / f"{c['id']}.log").stat().st_size > 0 for c in data["cells"])  # each run's output
    assert data["points"] == [{"name": "short", "overrides": ["latent.k=1"]},
                              {"name": "long", "overrides": ["latent.k=2"]}] and data["phase2"] == ["long"]
    md = (root / "ablation.md").read_text()
    assert "--point short latent.k=1 --point long latent.k=2 --seeds 1 --command sft --phase2 long" in md
    assert "| dev accuracy [Wilson 95 %] |" in md and "| long | dev | 1 |" in md  # phase 2 of `long` only
