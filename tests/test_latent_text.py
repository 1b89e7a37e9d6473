"""`rlatent.run.latent_text` and `rlatent diagnose --only text,tokens` on hand-built samples: a block whose
latents spell its step's chain writes the operands and the partial result, read against its own problem;
against the next problem's, only where the numbers happen to agree; the blocks are cut from the sample's
latents by its `[z]` runs, and its tokens are counted under both readings."""

import json
from pathlib import Path

import pytest

from rlatent.config import load_config
from rlatent.data.examples import block_chains
from rlatent.data.splits import load_split
from rlatent.errors import DataError
from rlatent.run import latent_text
from rlatent.run.cli import main

ROOT = Path(__file__).resolve().parents[1]


def sample(source: str, blocks: list[str]) -> dict:
    """A sample whose latents' nearest tokens are the characters of `blocks`, one block per `[z]` run."""
    shown = "He has" + "".join("[z]" * len(text) + f" {i}." for i, text in enumerate(blocks))
    latents = [{"lm_head": [c], "nearest_embeddings": [c, "x"]} for text in blocks for c in text]
    return {"source": source, "completion": "", "with_latents": shown, "latents": latents, "correct": False}


def test_blocks_are_cut_by_their_runs():
    assert latent_text.block_texts(sample("s", ["12*7", "=84"])) == ["12*7", "=84"]
    broken = sample("s", ["12*7"])
    broken["latents"].pop()
    with pytest.raises(DataError, match="4 latents shown, 3 recorded"):
        latent_text.block_texts(broken)
    assert latent_text.block_texts(sample("s", ["12*7", "=84"]), "lm_head") == ["12*7", "=84"]


def test_writes_whole_numbers_only():
    assert latent_text.writes(" 12 * 7 = 84,", "84") and latent_text.writes("84+5", "5")
    assert not latent_text.writes("184", "84") and not latent_text.writes("845", "84")
    assert not latent_text.writes("8.4", "4")


def test_counts_own_problem_against_the_next(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    overrides = ["model.name_or_path=x", "data.synthetic.multi_op=1", "data.synthetic.allow_zero=false",
                 "data.synthetic.min_steps=1", "data.synthetic.max_steps=1"]
    cfg = load_config("configs/tiny.yaml", overrides)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    problems = load_split(cfg.data, "test", 6)[0]
    rows = [sample(p.source, [block_chains(p.answer, 2)[0].replace(" ", "")]) for p in problems]
    path = run / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.json"
    assert main(["diagnose", str(run), "--only", "text,tokens", "--samples", str(path), "--json", str(out)]) == 0
    report = json.loads(out.read_text())["runs"][str(run)]
    result = report["text"]["test"]
    assert result == latent_text.block_counts(list(zip(problems, rows)))
    own = result["own"]
    assert own["first_operands_written"] == own["first_blocks"] == result["problems"] == len(problems)
    assert own["partial_results_written"] == [{"operation": 1, "written": len(problems), "blocks": len(problems)}]
    assert result["next_problem"]["first_operands_written"] < len(problems)
    tokens = report["tokens"]["test"]
    letters = "".join(block_chains(p.answer, 2)[0].replace(" ", "") for p in problems)
    assert tokens["latents"] == len(letters) and tokens["answers"] == len(problems)
    token, count = tokens["commonest"]["nearest_embeddings"][0]
    assert count == letters.count(token) == max(letters.count(c) for c in letters)
    assert tokens["commonest"]["lm_head"] == tokens["commonest"]["nearest_embeddings"]
    assert "operands of the first operation: 6 / " in capsys.readouterr().out
