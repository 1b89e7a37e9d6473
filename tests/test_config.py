"""The run config: defaults, YAML files, overrides, and one-line errors that name the key and file."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from rlatent.config import RunConfig, load_config
from rlatent.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.latent.mode == "latent" and cfg.sft.steps == 100 and cfg.data.path is None


def test_yaml_file_loads(tmp_path):
    path = write(tmp_path, "seed: 3\nmodel: {lora_r: 4}\nsft:\n  steps: 7\n  lr: 0.001\nlatent: {trunk: two}\n")
    cfg = load_config(path)
    assert cfg.seed == 3 and cfg.model.lora_r == 4 and cfg.sft.steps == 7 and cfg.sft.lr == 0.001
    assert cfg.latent.trunk == "two"
    assert cfg.sft.batch_size == RunConfig().sft.batch_size  # untouched fields keep their defaults


def test_repo_tiny_config_loads():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.name_or_path=/some/dir"])
    assert cfg.model.name_or_path == "/some/dir" and cfg.data.synthetic.num_train == 64


def test_overrides_apply_with_yaml_typing(tmp_path):
    path = write(tmp_path, "data: {path: /data/gsm8k}\nsft: {steps: 50}\n")
    cfg = load_config(path, ["sft.steps=3", "latent.mode=none", "data.path=null", "sft.lr=1e-3",
                             "data.synthetic.operators=+-", "model.lora_target_modules=[q_proj, v_proj]"])
    assert cfg.sft.steps == 3 and isinstance(cfg.sft.steps, int)
    assert cfg.latent.mode == "none"
    assert cfg.data.path is None
    assert cfg.sft.lr == pytest.approx(1e-3)
    assert cfg.data.synthetic.operators == "+-"
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]


def test_overrides_apply_without_a_file():
    assert load_config(None, ["sft.steps=3"]).sft.steps == 3


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "sedd: 1\n")
    message = config_error(path)
    assert "sedd" in message and "run.yaml" in message and "unknown key" in message


def test_unknown_nested_key(tmp_path):
    path = write(tmp_path, "sft: {lrr: 0.1}\n")
    message = config_error(path)
    assert "sft.lrr" in message and "run.yaml" in message


def test_unknown_deeply_nested_key(tmp_path):
    path = write(tmp_path, "data: {synthetic: {num_trian: 3}}\n")
    message = config_error(path)
    assert "data.synthetic.num_trian" in message and "run.yaml" in message


def test_unknown_key_via_override(tmp_path):
    path = write(tmp_path, "seed: 0\n")
    message = config_error(path, ["sft.lrr=0.1"])
    assert "sft.lrr" in message and "run.yaml" in message


def test_unknown_section_via_override(tmp_path):
    message = config_error(write(tmp_path, "seed: 0\n"), ["sftt.steps=3"])
    assert "sftt" in message and "run.yaml" in message


def test_wrong_type_names_the_key(tmp_path):
    message = config_error(write(tmp_path, "seed: 0\n"), ["sft.steps=abc"])
    assert "sft.steps" in message and "run.yaml" in message


def test_wrong_type_in_file_names_the_key(tmp_path):
    message = config_error(write(tmp_path, "latent: {mode: latents}\n"))
    assert "latent.mode" in message and "run.yaml" in message


def test_out_of_range_value_names_the_key(tmp_path):
    message = config_error(write(tmp_path, "sft: {lr: -1}\n"))
    assert "sft.lr" in message


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "seed: 0\nsft:\n  steps: 3\n  lr: [1, 2\nlatent: {mode: none}\n")
    message = config_error(path)
    assert f"{path}:" in message
    line = int(message.split(f"{path}:", 1)[1].split(":", 1)[0])
    assert 4 <= line <= 5  # the unclosed list opens on line 4; the parser notices on line 5


def test_malformed_yaml_tab_indent(tmp_path):
    path = write(tmp_path, "seed: 0\nsft:\n\tsteps: 3\n")
    message = config_error(path)
    assert message.startswith(f"{path}:3:"), message


def test_top_level_not_a_mapping(tmp_path):
    message = config_error(write(tmp_path, "- a\n- b\n"))
    assert "run.yaml" in message


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert "nope.yaml" in message and "not found" in message


def test_override_without_equals(tmp_path):
    message = config_error(write(tmp_path, "seed: 0\n"), ["sft.steps"])
    assert "sft.steps" in message and "key.sub=value" in message


def test_override_into_a_scalar(tmp_path):
    message = config_error(write(tmp_path, "seed: 0\n"), ["seed.value=3"])
    assert "seed" in message


def test_override_with_invalid_yaml_value(tmp_path):
    message = config_error(write(tmp_path, "seed: 0\n"), ["sft.steps=[1, 2"])
    assert "sft.steps" in message


def test_two_trunks_need_lora(tmp_path):
    message = config_error(write(tmp_path, "seed: 0\n"), ["latent.trunk=two", "model.lora_r=0"])
    assert "lora_r" in message and "two" in message
    assert load_config(None, ["latent.trunk=shared", "model.lora_r=0"]).model.lora_r == 0


def test_sampling_cap_holds_a_trained_block(tmp_path):
    """A fed-back block of k latents must fit under the sampling cap; pause blocks are always k long."""
    message = config_error(write(tmp_path, "seed: 0\n"), ["latent.mode=latent", "latent.k=16"])
    assert "latent.max_latents_per_block 8 is below latent.k 16" in message
    assert load_config(None, ["latent.mode=latent", "latent.k=16", "latent.max_latents_per_block=16"]).latent.k == 16
    assert load_config(None, ["latent.mode=pause", "latent.k=16"]).latent.k == 16


def test_synthetic_steps_ordered(tmp_path):
    path = write(tmp_path, "data: {synthetic: {min_steps: 4, max_steps: 2}}\n")
    message = config_error(path)
    assert "data.synthetic" in message and "min_steps" in message


def test_several_errors_are_summarised_on_one_line(tmp_path):
    message = config_error(write(tmp_path, "sft: {lrr: 1, stepz: 2}\n"))
    assert "more" in message


def test_assignment_is_validated():
    cfg = RunConfig()
    with pytest.raises(ValidationError):
        cfg.sft.steps = "abc"


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["sft.steps=3", "latent.mode=pause", "latent.trunk=two", "data.path=/x",
                             "model.lora_target_modules=[q_proj]", "sft.start_pos_weight=2.5",
                             "data.synthetic.max_steps=5", "output.name=abc"])
    path = write(tmp_path, cfg.to_yaml(), "resolved.yaml")
    again = load_config(path)
    assert again == cfg
    assert load_config(write(tmp_path, RunConfig().to_yaml(), "defaults.yaml")) == RunConfig()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_is_valid(name):
    cfg = load_config(REPO / "configs" / name, ["model.name_or_path=/some/dir"])
    assert cfg.grpo.steps >= 0
