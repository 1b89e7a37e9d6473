"""The Python API: the README's snippet runs as written on a tiny trained run, and its answers are the
sampler's (same counts, same seeded results) under the run's own evaluation settings: `rlatent eval`'s."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import rlatent
from rlatent.errors import CheckpointError
from rlatent.latent.sampler import SamplingSettings
from rlatent.run.cli import main

README = (Path(__file__).parents[1] / "README.md").read_text()
CONFIG = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("api")
    config = str(Path(request.config.rootpath) / CONFIG)
    assert main(["sft", config, f"model.name_or_path={tiny_model_dir}", "sft.steps=2", "sft.eval_every=2",
                 "eval.limit=2", "latent.start_threshold=0.01", f"output.dir={out}", "output.name=run"]) == 0
    return out / "run", config


def readme_snippet() -> str:
    section = README.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs(tiny_run, tiny_model_dir, capsys, one_torch_thread):
    run, config = tiny_run
    own = run.parent / "tiny.yaml"  # the tiny config with the model filled in, as a user's config would be
    own.write_text(Path(config).read_text().replace("name_or_path: null", f"name_or_path: {tiny_model_dir}"))
    namespace = {"RUN_DIR": str(run), "CONFIG": str(own)}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert len(namespace["answers"]) == 1
    model, tokenizer = namespace["model"], namespace["tokenizer"]
    assert model.settings.trunk == "two" and tokenizer.eos_token is not None
    assert capsys.readouterr().out  # it printed the answers


def test_answers_are_consistent_and_seeded(tiny_run, one_torch_thread):
    run, _ = tiny_run
    policy = rlatent.load(run)
    questions = ["Tom has 3 apples and buys 4 more. How many?", "A box holds 6 pens. How many in 2 boxes?"]
    kwargs = dict(max_new_tokens=12, decisions="sample", temperature=1.0, start_threshold=0.3)
    first, again = policy.generate(questions, **kwargs), policy.generate(questions, **kwargs)
    assert [a.text for a in first] == [a.text for a in again]
    for answer in first:
        assert answer.with_latents.count("[z]") == answer.latents == len(answer.latent_tokens)
        assert answer.tokens <= 12 and answer.blocks <= answer.latents
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert [a.text for a in rlatent.load(checkpoint).generate(questions, **kwargs)] == [a.text for a in first]


def test_generate_answers_as_rlatent_eval_does(tiny_run, one_torch_thread):
    """Left to its defaults, `generate` gives `rlatent eval`'s answers on the same problems, latents and all: it
    samples with the run's `eval.*` and `latent.*` settings, not the library's; an argument still overrides."""
    run, _ = tiny_run
    assert main(["eval", str(run)]) == 0
    [samples] = (run / "evals").glob("*/samples.jsonl")
    evaluated = [json.loads(line) for line in samples.read_text().splitlines()]
    policy = rlatent.load(run)
    answers = policy.generate([s["question"] for s in evaluated])
    assert [(a.text, a.final_answer, a.with_latents, a.latent_tokens, a.truncated) for a in answers] == \
        [(s["completion"], s["predicted"], s["with_latents"], s["latents"], s["truncated"]) for s in evaluated]
    assert len(answers) == 2 and any(a.latents for a in answers)
    library = policy.generate([s["question"] for s in evaluated], **{
        name: getattr(SamplingSettings(), name) for name in ("max_new_tokens", "max_latents_per_block",
                                                             "max_total_latents", "start_threshold")})
    assert [a.text for a in library] != [a.text for a in answers]  # the library's defaults answer otherwise


def test_a_directory_without_a_checkpoint_is_one_error(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        rlatent.load(tmp_path)
    with pytest.raises(CheckpointError, match="neither a run directory"):
        rlatent.load(tmp_path / "checkpoints")
