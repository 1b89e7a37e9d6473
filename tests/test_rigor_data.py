"""Data for results a reviewer can trust: each run seed its own draw (`data.synthetic.seed: run`), a `dev`
split for choosing apart from the `test` split evaluated once, GSM8K's equation-only answers, blocks sized
by their chains (`sft.compress.tokens_per_latent`), and the pause control with the chain loss."""

from __future__ import annotations

import json

import pytest
import torch

from rlatent.config import load_config
from rlatent.config.run import RunConfig
from rlatent.data.examples import block_chains, block_sizes, build_example, render_example
from rlatent.data.gsm8k import Problem
from rlatent.data.splits import equation_chain, load_split
from rlatent.errors import ConfigError
from rlatent.io.run_dir import read_metrics
from rlatent.run.cli import main

CONFIG = "configs/tiny.yaml"
NATURAL = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def _questions(data, split):
    return [p.question for p in load_split(data, split)[0]]


def test_a_run_seed_draws_its_own_problems():
    configs = [RunConfig.model_validate({"seed": s, "data": {"synthetic": {"seed": "run", "num_train": 40}}})
               for s in (3, 4)]
    assert [c.data.synthetic.seed for c in configs] == [3, 4]  # resolved: config.yaml names the draw
    assert configs[0].model_dump(mode="json")["data"]["synthetic"]["seed"] == 3
    for split in ("train", "test"):
        assert not set(_questions(configs[0].data, split)) & set(_questions(configs[1].data, split))
    fixed = RunConfig.model_validate({"seed": 4, "data": {"synthetic": {"seed": 3, "num_train": 40}}})
    assert _questions(fixed.data, "train") == _questions(configs[0].data, "train")


def test_overrides_resolve_the_run_seed_too(repo_root, tiny_model_dir):
    cfg = load_config(CONFIG, [f"model.name_or_path={tiny_model_dir}", "data.synthetic.seed=run", "seed=7"])
    assert cfg.data.synthetic.seed == 7


def test_the_seeded_dev_split_is_apart_from_test_and_train():
    data = RunConfig.model_validate({"data": {"synthetic": {"num_train": 200, "num_eval": 30, "num_dev": 20}}}).data
    dev, test, train = (_questions(data, split) for split in ("dev", "test", "train"))
    assert len(dev) == 20 and len(test) == 30
    assert dev != test[:20]  # its own seed stream, not the test problems again
    assert len(set(dev) & set(test)) < 5  # a few short questions may coincide by chance, as with train
    graph = RunConfig.model_validate({"data": {"source": "graph", "graph": {"num_eval": 7}}}).data
    assert len(load_split(graph, "dev")[0]) == 7  # num_dev defaults to num_eval


def _gsm8k_dir(tmp_path, rows: int):
    (tmp_path / "train.jsonl").write_text("".join(
        json.dumps({"question": f"q{i}?", "answer": f"It is {i}+1 = <<{i}+1={i + 1}>>{i + 1}.\n#### {i + 1}"}) + "\n"
        for i in range(rows)))
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "t?", "answer": NATURAL}) + "\n")
    return tmp_path


def test_gsm8k_dev_is_the_end_of_train_and_is_not_trained_on(tmp_path):
    path = _gsm8k_dir(tmp_path, 10)
    data = RunConfig.model_validate({"data": {"source": "gsm8k", "path": str(path), "dev_size": 3}}).data
    assert _questions(data, "train") == [f"q{i}?" for i in range(7)]
    assert _questions(data, "dev") == ["q7?", "q8?", "q9?"]
    assert _questions(data, "test") == ["t?"]
    assert [p.source for p in load_split(data, "dev", limit=2)[0]] == [f"{path / 'train.jsonl'}:{n}" for n in (8, 9)]
    without = data.model_copy(update={"dev_size": 0})
    with pytest.raises(ConfigError, match="dev split only with data.dev_size > 0"):
        load_split(without, "dev")
    assert len(load_split(without, "train")[0]) == 10
    with pytest.raises(ConfigError, match="data.dev_size 10 leaves no GSM8K training problems"):
        load_split(data.model_copy(update={"dev_size": 10}), "train")


def test_equation_answers_keep_the_marks_and_drop_the_words(tmp_path, tiny_tokenizer):
    assert equation_chain(NATURAL) == "48/2=<<48/2=24>>24\n48+24=<<48+24=72>>72\n#### 72"
    data = RunConfig.model_validate({"data": {"source": "gsm8k", "path": str(_gsm8k_dir(tmp_path, 2)),
                                              "answer_format": "equations"}}).data
    problem = load_split(data, "test")[0][0]
    assert problem.answer == equation_chain(NATURAL) and problem.final_answer == "72"
    cot = build_example(problem, tiny_tokenizer, 0, "insert")  # written CoT: GSM8K-Aug's chain without brackets
    answer = render_example(cot.input_ids[cot.prompt_length:], cot.latent_mask[cot.prompt_length:], tiny_tokenizer)
    assert answer.lstrip().startswith("48/2=24\n48+24=72\n#### 72")
    latent = build_example(problem, tiny_tokenizer, 3, "replace")  # each block replaces its expression
    answer = render_example(latent.input_ids[latent.prompt_length:], latent.latent_mask[latent.prompt_length:],
                            tiny_tokenizer)
    assert answer.lstrip().startswith("[z][z][z]24\n[z][z][z]72\n#### 72")
    assert block_chains(problem.answer, 1) == ["48/2=", "48+24="]  # at a line start: no space before


def test_blocks_sized_by_their_chains(tiny_tokenizer):
    answer = equation_chain(NATURAL)
    lengths = [len(tiny_tokenizer.encode(chain, add_special_tokens=False)) for chain in block_chains(answer, 1)]
    assert block_sizes(answer, tiny_tokenizer, 1, 99, 1) == lengths
    assert block_sizes(answer, tiny_tokenizer, 2, 99, 1) == [-(-n // 2) for n in lengths]
    assert block_sizes(answer, tiny_tokenizer, 1, 2, 1) == [min(2, n) for n in lengths]  # at most latent.k
    assert block_sizes(answer, tiny_tokenizer, 2, 99, 1, latent_marks=1) == [-(-lengths[0] // 2)]
    example = build_example(Problem("q", answer, "72", "x"), tiny_tokenizer, [2, 5], "replace")
    slots = [i for i, latent in enumerate(example.latent_mask) if latent]
    assert len(slots) == 7 and slots[1] == slots[0] + 1 and slots[2] > slots[1] + 1  # a block of 2, then of 5


@pytest.mark.parametrize("mode", ["pause", "latent"])
def test_chain_loss_with_blocks_sized_by_chains_trains(repo_root, tiny_model_dir, tmp_path, mode, monkeypatch):
    """The pause control with the chain loss: the same per-slot loss on the states before the slots, pause
    inputs fed (never the chain's embeddings); the latent row is fed them under teacher forcing."""
    import rlatent.sft.trainer as trainer

    fed = []
    original = trainer.chain_inputs
    monkeypatch.setattr(trainer, "chain_inputs", lambda model, batch: fed.append(1) or original(model, batch))
    assert main(["sft", CONFIG, f"model.name_or_path={tiny_model_dir}", "sft.steps=2", "sft.compress.weight=1",
                 "sft.compress.tokens_per_latent=2", f"latent.mode={mode}", "latent.placement=replace",
                 "latent.k=4", "latent.max_latents_per_block=4", "latent.proj=soft", "eval.limit=2",
                 f"output.dir={tmp_path}", "output.name=run"]) == 0
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["phase"] == "train"]
    assert len(train) == 2 and all(r["compress_loss"] > 0 and r["compress_loss"] == r["compress_loss"] for r in train)
    assert len(fed) == (0 if mode == "pause" else 2)


def test_a_run_evaluates_on_the_split_it_names(repo_root, tiny_model_dir, tmp_path):
    overrides = [f"model.name_or_path={tiny_model_dir}", "sft.steps=1", "eval.limit=3", "eval.num_samples=3",
                 f"output.dir={tmp_path}"]
    assert main(["sft", CONFIG, *overrides, "eval.split=dev", "output.name=dev"]) == 0
    cfg = load_config(CONFIG, overrides)
    rows = [json.loads(line) for line in (tmp_path / "dev" / "samples" / "eval_samples.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == _questions(cfg.data, "dev")[:3] != _questions(cfg.data, "test")[:3]


def test_filler_slots_carry_no_chain_loss():
    from rlatent.sft.compress import INPUT_ONLY, chain_pieces

    pieces = chain_pieces([5, 6], 3)
    assert pieces[2] == (INPUT_ONLY - 6,) and INPUT_ONLY - pieces[2][0] == 6
    assert sum(1 for piece in pieces for token in piece if token >= 0) == 2  # each chain token counts once
    assert torch.tensor(pieces[2]).lt(-1).all()  # never mistaken for the -1 padding


def test_the_random_compression_factor_is_the_problems_own(tiny_tokenizer):
    from rlatent.config import LatentConfig
    from rlatent.data.splits import compression_factor, sft_examples
    from rlatent.data.synthetic import generate_problems

    problems = generate_problems(40, 0, 2, 2)
    factors = [compression_factor(p, 4) for p in problems]
    assert set(factors) == {1, 2, 3, 4} and factors == [compression_factor(p, 4) for p in problems]
    latent = LatentConfig(mode="latent", placement="replace", proj="soft", k=16, max_latents_per_block=16)
    drawn = sft_examples(problems, tiny_tokenizer, latent, None, tokens_per_latent=4, random_factor=True)[0]
    for problem, factor, example in zip(problems, factors, drawn):
        expected = block_sizes(problem.answer, tiny_tokenizer, factor, 16, 1)
        assert sum(example.latent_mask) == sum(expected)
    with pytest.raises(ValueError, match="random_factor draws each problem's factor"):
        RunConfig.model_validate({"latent": {"mode": "latent", "placement": "replace", "proj": "soft"},
                                  "sft": {"compress": {"weight": 1, "random_factor": True}}})


@pytest.mark.parametrize("config, overrides", [
    ("configs/multiop_compress.yaml", ["latent.mode=pause"]),  # pause + chain loss: only what is fed back differs
    ("configs/multiop_compress.yaml", ["sft.compress.weight=0"]),  # latent without the chain loss
    ("configs/quickstart.yaml", ["latent.mode=pause"]),
    ("configs/gsm8k_compress.yaml", ["latent.mode=pause"]),
    ("configs/gsm8k_compress.yaml", ["sft.compress.weight=0"]),  # blocks keep their chain-sized slots
    ("configs/gsm8k_compress.yaml", ["sft.compress.tokens_per_latent=4", "sft.compress.random_factor=true"]),
    ("configs/gsm8k_compress.yaml", ["latent.mode=none", "latent.placement=insert", "sft.compress.weight=0",
                                     "sft.compress.tokens_per_latent=null", "sft.curriculum.stages=0"]),
    ("configs/gsm8k_compress.yaml", ["latent.trunk=two", "model.lora_r=16"]),
])
def test_every_control_is_the_overrides_its_header_names(repo_root, config, overrides):
    cfg = load_config(config, overrides)
    header = open(config).read().split("\nseed:")[0]
    assert all(override.split("=")[0] in header for override in overrides)
    assert cfg.sft.compress.split_steps or config != "configs/multiop_compress.yaml"
