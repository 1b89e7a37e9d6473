"""Phase 1's curriculum: stages from written chain of thought to latents, logged per stage, shared by the
pause control, exact on resume; and the control ladder's text rows (CoT, no-CoT) from one override."""

from __future__ import annotations

import pytest

from rlatent.config import load_config
from rlatent.data.splits import load_split
from rlatent.errors import ConfigError
from rlatent.io.run_dir import read_metrics
from rlatent.run.cli import main
from rlatent.sft.curriculum import Curriculum, staged_examples

CONFIG = "configs/tiny.yaml"


pytestmark = pytest.mark.usefixtures("repo_root")  # config paths are relative to the repository


def test_stage_schedule():
    c = Curriculum(stages=2, steps_per_stage=3)
    assert [c.stage(s) for s in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [c.latent_marks(s) for s in range(3)] == [0, 1, None]
    assert Curriculum(0, 3).stage(100) == 0 and Curriculum(0, 3).latent_marks(0) is None


@pytest.mark.parametrize("mode", ["latent", "pause", "none"])
def test_stages_move_from_text_to_the_modes_treatment(tiny_tokenizer, mode):
    cfg = load_config(CONFIG, ["model.name_or_path=x", f"latent.mode={mode}", "latent.placement=replace"])
    problems, _ = load_split(cfg.data, "train", 16)
    staged = staged_examples(problems, tiny_tokenizer, cfg.latent, 512, Curriculum(2, 1))
    stages, dropped = staged.stages, staged.dropped
    assert dropped == 0 and len(stages) == 3 and all(len(s) == len(problems) for s in stages)
    for first, second, last in zip(*stages):
        slots = [sum(e.latent_mask) for e in (first, second, last)]
        assert slots[0] == 0  # stage 0: the written chain of thought
        if mode == "none":
            assert slots == [0, 0, 0] and len(last.input_ids) < len(first.input_ids)  # expressions removed
        else:
            assert slots[1] == cfg.latent.k and slots[2] == 2 * cfg.latent.k  # one more mark per stage


def test_curriculum_run_logs_stages_and_resumes_exactly(tiny_model_dir, tmp_path, one_torch_thread):
    common = ["sft", CONFIG, f"model.name_or_path={tiny_model_dir}", "sft.steps=6", "sft.eval_every=3",
              "sft.curriculum.stages=2", "sft.curriculum.steps_per_stage=2", "eval.limit=2", f"output.dir={tmp_path}"]
    assert main([*common, "output.name=full"]) == 0
    full = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["phase"] == "train"]
    assert [r["curriculum_stage"] for r in full] == [0, 0, 1, 1, 2, 2]
    # Stop after step 3 (mid-stage, after an optimizer reset) and resume: the same losses.
    assert main([*common, "output.name=cut", "sft.save_every=3"]) == 0
    cut = tmp_path / "cut"
    for late in sorted((cut / "checkpoints").iterdir())[1:]:
        import shutil

        shutil.rmtree(late)
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")  # data line + steps 1-3
    assert main(["sft", "--resume", str(cut)]) == 0
    resumed = {r["step"]: r for r in read_metrics(cut / "metrics.jsonl") if r["phase"] == "train"}
    for row in full[3:]:
        assert resumed[row["step"]]["loss"] == pytest.approx(row["loss"], rel=1e-5)


def test_a_curriculum_longer_than_phase_one_is_refused():
    with pytest.raises(ConfigError, match="exceed steps"):
        load_config(CONFIG, ["model.name_or_path=x", "sft.steps=4", "sft.curriculum.stages=3",
                             "sft.curriculum.steps_per_stage=2"])
