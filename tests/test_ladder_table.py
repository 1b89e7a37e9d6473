"""scripts/ladder_table.py on hand-built run directories: where each kind of run keeps each phase's
evaluation, and paired tests only on the problems and seeds two rows share."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlatent.run.stats import mcnemar_exact
from tests.scripts import SCRIPTS, load_script

SCRIPT = SCRIPTS / "ladder_table.py"


@pytest.fixture(scope="module")
def ladder_table():
    return load_script("ladder_table")


def write_run(root: Path, name: str, evaluations: dict[str, list[int]], trained: str | None,
              references: list[str] | None = None, predictions: list[str] | None = None):
    """`evaluations`: metrics phase (test, test_sft, ...) -> per-problem outcomes; `trained`: train | grpo | None;
    `references`, `predictions`: the problems' reference and predicted answers (left out of the samples when
    None)."""
    run = root / name
    (run / "samples").mkdir(parents=True)
    rows = [{"phase": trained, "step": 1}] if trained else []
    rows.append({"phase": "eval", "step": 1, "latent_gain_zeros": 0.1, "latent_gain_noise": 0.2,
                 "latent_gain_shuffle": 0.03})
    stems = {"test": "eval_samples", "test_sft": "eval_samples_sft"}
    for phase, outcomes in evaluations.items():
        base, ood = (phase[:-4], "_ood") if phase.endswith("_ood") else (phase, "")
        rows.append({"phase": phase, "step": 1, "accuracy": sum(outcomes) / len(outcomes), "strict_match": 0.0,
                     "tokens_per_answer": 10.0, "latents_per_answer": 2.0, "forward_passes_per_answer": 12.0,
                     "problems": len(outcomes)})
        refs, said = references or [None] * len(outcomes), predictions or [None] * len(outcomes)
        lines = "".join(json.dumps({"correct": bool(o)} | ({"reference": r} if r else {})
                                   | ({"predicted": p} if p else {})) + "\n"
                        for o, r, p in zip(outcomes, refs, said))
        (run / "samples" / f"{stems[base]}{ood}.jsonl").write_text(lines)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_each_kind_of_run_and_the_paired_tests(ladder_table, tmp_path):
    a, b, c = [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0]
    write_run(tmp_path, "pause-seed0", {"test": a}, trained="train")  # rlatent sft
    write_run(tmp_path, "pause-seed1", {"test": b}, trained="train")
    write_run(tmp_path, "latent-seed0", {"test_sft": b, "test": c}, trained="train")  # rlatent train, both phases
    write_run(tmp_path, "nocot-seed0", {"test_sft": a}, trained="train")  # train stopped in phase 2
    write_run(tmp_path, "pause-grpo-seed0", {"test": c}, trained="grpo")  # rlatent grpo from pause-seed0
    write_run(tmp_path, "latent-seed1", {}, trained="train")  # still training: no evaluation yet
    records = ladder_table.collect(tmp_path)
    kinds = sorted((r["row"], r["seed"], r["phase"], r["test"]["accuracy"]) for r in records if "test" in r)
    assert kinds == [("latent", 0, "grpo", 0.75), ("latent", 0, "sft", 0.5), ("nocot", 0, "sft", 0.5),
                     ("pause", 0, "sft", 0.5), ("pause", 1, "sft", 0.5), ("pause-grpo", 0, "grpo", 0.75)]
    # pause has seeds 0 and 1, latent only 0: the pair is seed 0 against seed 0.
    assert ladder_table.paired(records, ("pause", "sft"), ("latent", "sft"), "test") == (a, b)
    assert ladder_table.paired(records, ("pause", "sft"), ("latent", "sft"), "ood") == (None, None)
    table = ladder_table.tables(records)
    assert "| pause | 2 | 0.500 [" in table and "(n=8)" in table
    assert "| latent | 1 | 0.500 [" in table  # the run still training is left out
    assert f"| pause | latent | test | 1 | 1 | {mcnemar_exact(1, 1):.4f} |" in table
    lifted = table.split("### Phase 2 against its own phase-1 start")[1]
    assert "| latent | test | 0.500 | 0.750 | 1 | 2 |" in lifted  # one train run, before and after
    assert "| pause-grpo | test | 0.500 | 0.750 | 0 | 1 |" in lifted  # seed 0 of pause against its grpo run


def test_a_grpo_run_is_paired_with_the_row_its_init_checkpoint_names(ladder_table, tmp_path):
    before, after = [1, 0, 0, 0], [1, 1, 1, 0]
    write_run(tmp_path, "latent-seed0", {"test": before}, trained="train")
    write_run(tmp_path, "latent_explore-seed0", {"test": after}, trained="grpo")
    init = tmp_path / "latent-seed0" / "checkpoints" / "step_000120"
    (tmp_path / "latent_explore-seed0" / "config.yaml").write_text(f"grpo:\n  init_checkpoint: {init}\n")
    records = ladder_table.collect(tmp_path)
    assert {(r["row"], r["phase"], r["start"]) for r in records} == {
        ("latent", "sft", "latent"), ("latent_explore", "grpo", "latent")}
    lifted = ladder_table.tables(records).split("### Phase 2 against its own phase-1 start")[1]
    assert "| latent_explore | test | 0.250 | 0.750 | 0 | 2 |" in lifted
    assert lifted.splitlines()[4].endswith(" |  |")  # no constant answer without references: nothing to count


def test_the_constant_answer_row_is_the_commonest_reference(ladder_table, tmp_path):
    references = ["No", "No", "Yes", "No", "Yes"]
    write_run(tmp_path, "latent-seed0", {"test": [1, 0, 1, 0, 1]}, trained="train", references=references,
              predictions=["No", "Yes", "Yes", "Yes", "Yes"])
    write_run(tmp_path, "latent-grpo-seed0", {"test": [1, 1, 0, 1, 0]}, trained="grpo", references=references,
              predictions=["No"] * 5)
    write_run(tmp_path, "pause-seed1", {"test": [1, 1]}, trained="train", references=["No", "Yes"])
    records = ladder_table.collect(tmp_path)
    constant = ladder_table.constant_answer_records(records)
    # One answer for every seed: "No", the commonest over both seeds' problems together (4 of 7).
    assert {(r["seed"], r["phase"], r["test"]["answer"], tuple(r["test"]["outcomes"])) for r in constant} == {
        (0, "sft", "No", (1, 1, 0, 1, 0)), (0, "grpo", "No", (1, 1, 0, 1, 0)),
        (1, "sft", "No", (1, 0)), (1, "grpo", "No", (1, 0))}
    table = ladder_table.tables(records)
    assert table.startswith('`constant answer`: "No" on test')
    assert "| constant answer | 2 | 0.571 [" in table  # 4 of 7 over both seeds
    assert f"| latent | constant answer | test | 2 | 2 | {mcnemar_exact(2, 2):.4f} |" in table
    assert f"| latent-grpo | constant answer | test | 0 | 0 | {mcnemar_exact(0, 0):.4f} |" in table  # it answers "No"
    lifted = table.split("### Phase 2 against its own phase-1 start")[1]
    assert "| constant answer |" not in lifted  # no row of its own there, but a count per row:
    # It says "No" on 1 problem, then on all 5; it is right on 2 "Yes" problems, then on none: the same
    # accuracy, made of the one answer after phase 2.
    assert f"| latent-grpo | test | 0.600 | 0.600 | 2 | 2 | {mcnemar_exact(2, 2):.4f} | 1 -> 5 | 2 -> 0 |" in lifted


def test_no_constant_answer_without_references(ladder_table, tmp_path):
    write_run(tmp_path, "latent-seed0", {"test": [1, 0]}, trained="train")  # samples of an older run: no reference
    records = ladder_table.collect(tmp_path)
    assert ladder_table.constant_answer_records(records) == []
    assert "constant answer" not in ladder_table.tables(records)


def test_rows_of_an_earlier_json_join_only_on_the_same_problems(tmp_path):
    refs = ["3", "5", "8"]
    write_run(tmp_path / "old", "latent-seed0", {"test": [0, 0, 1]}, trained="train", references=refs)
    write_run(tmp_path / "old", "pause-seed0", {"test": [1, 0, 0]}, trained="train", references=refs)
    write_run(tmp_path / "old", "cot-seed0", {"test": [1, 1, 1]}, trained="train", references=refs)
    old = tmp_path / "old.json"
    cli = [sys.executable, str(SCRIPT)]
    assert subprocess.run(cli + [str(tmp_path / "old"), "--json", str(old)], capture_output=True).returncode == 0
    write_run(tmp_path / "new", "latent-seed0", {"test": [1, 1, 1]}, trained="train", references=refs)
    write_run(tmp_path / "new", "pause_full-seed0", {"test": [1, 1, 0]}, trained="train", references=refs)
    done = subprocess.run(cli + [str(tmp_path / "new"), "--with", str(old), "--rows", "latent,pause,pause_full"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| latent | 1 | 1.000 [" in done.stdout  # the new run's latent row, not the JSON's
    assert f"| pause | pause_full | test | 0 | 1 | {mcnemar_exact(0, 1):.4f} |" in done.stdout
    assert "| cot |" not in done.stdout  # not among --rows
    write_run(tmp_path / "other", "latent_k4-seed0", {"test": [1, 0, 0]}, trained="train", references=["3", "5", "9"])
    done = subprocess.run(cli + [str(tmp_path / "other"), "--with", str(old)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"ladder_table: {tmp_path / 'old' / 'cot-seed0'} and {tmp_path / 'other' / 'latent_k4-seed0'} were graded "
        "on different test problems (seed 0); they cannot share a table"]
