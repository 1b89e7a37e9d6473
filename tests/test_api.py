"""The Python API: the README's snippet runs as written on a tiny trained run, and its answers are the
sampler's (same counts, same seeded results)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import rlatent
from rlatent.errors import CheckpointError
from rlatent.run.cli import main

README = (Path(__file__).parents[1] / "README.md").read_text()
CONFIG = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("api")
    config = str(Path(request.config.rootpath) / CONFIG)
    assert main(["sft", config, f"model.name_or_path={tiny_model_dir}", "sft.steps=2", "sft.eval_every=2",
                 "eval.limit=2", f"output.dir={out}", "output.name=run"]) == 0
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


def test_a_directory_without_a_checkpoint_is_one_error(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        rlatent.load(tmp_path)
