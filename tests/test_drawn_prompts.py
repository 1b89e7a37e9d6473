"""experiments/tools/drawn_prompts.py: the problems it replays are the ones the GRPO trainer launches, step by step, and
its counts are those of the samples it writes, on a tiny model sampled as the rollouts sample."""

import json
from pathlib import Path

import pytest
import torch

from rlatent.config import load_config
from rlatent.data.splits import load_split
from rlatent.grpo.loop import GRPOTrainer
from rlatent.model.latent_model import LatentModel
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["grpo.steps=3", "grpo.prompts_per_step=3", "grpo.group_size=2", "seed=5"]


@pytest.fixture(scope="module")
def drawn_prompts():
    return load_script("drawn_prompts", "experiments/tools")


class RecordingBackend:
    """Stands in for the rollout backend: `launch` hands back the chunks it was given."""

    def launch(self, chunks, version):
        return chunks


def test_drawn_problems_are_the_trainers(drawn_prompts, tiny_tokenizer):
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.name_or_path=x", *OVERRIDES])
    problems = load_split(cfg.data, "train")[0]
    trainer = GRPOTrainer(cfg, None, tiny_tokenizer, problems, None, None, RecordingBackend())
    drawn = drawn_prompts.drawn_problems(cfg)
    assert len(drawn) == 9
    for step in range(3):
        group = trainer.launch(step, version=step)[0]
        assert group == [p for p in drawn[step * 3 : step * 3 + 3] for _ in range(2)]
    assert drawn_prompts.drawn_problems(cfg, prompt_seed=5) == drawn
    assert drawn_prompts.drawn_problems(cfg, prompt_seed=6) != drawn  # another seed's draw


def test_measure_counts_what_it_samples(drawn_prompts, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/tiny.yaml", [f"model.name_or_path={tiny_model_dir}", *OVERRIDES])
    model, _ = LatentModel.from_config(cfg.model, cfg.latent, torch.float32, torch.device("cpu"))
    model.save(tmp_path / "start")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    with pytest.raises(SystemExit, match="grpo.init_checkpoint is not set"):
        drawn_prompts.measure(run, None, None, None, [])
    out = tmp_path / "draw.json"
    result = drawn_prompts.measure(run, None, 6, out, [f"grpo.init_checkpoint={tmp_path / 'start'}"])
    assert result["prompt_seed"] == 6 and result["checkpoint"] == str(tmp_path / "start")
    for name, count in (("drawn", 9), ("held_out", 8)):  # the tiny config holds 8 held-out problems
        rows = [json.loads(line) for line in out.with_suffix(f".{name}.jsonl").read_text().splitlines()]
        assert result[name]["problems"] == len(rows) == count
        assert result[name]["right"] == sum(bool(r["correct"]) for r in rows)
    drawn_rows = [json.loads(line) for line in out.with_suffix(".drawn.jsonl").read_text().splitlines()]
    assert [r["question"] for r in drawn_rows] == [p.question for p in drawn_prompts.drawn_problems(cfg, 6)]
