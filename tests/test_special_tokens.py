"""The token a model ends its answers with is the one it was trained with, on every machine.

The embedded GGUF's tokenizer, read by transformers 5.17, had `<|im_start|>` as its EOS, by 5.24 `<|im_end|>`: a
model trained on one never stopped on the other. The conversion now takes the special tokens from the GGUF's
metadata, and a checkpoint records its EOS, which wins over the tokenizer's at load.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlatent.config import LatentConfig, ModelConfig
from rlatent.errors import CheckpointError
from rlatent.model.latent_model import SETTINGS_FILE, LatentModel
from rlatent.model.loading import gguf_special_token_ids, pin_special_tokens

CPU = torch.device("cpu")


def write_gguf(path, token_ids: dict[str, int]) -> None:
    """A GGUF holding only special-token metadata (as `tokenizer.ggml.<role>_token_id`)."""
    from gguf import GGUFWriter

    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    writer = GGUFWriter(str(path), arch="llama")
    for role, token_id in token_ids.items():
        writer.add_uint32(f"tokenizer.ggml.{keys[role]}", token_id)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_special_tokens_become_the_tokenizers(tiny_tokenizer, tmp_path):
    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer,
                                         eos_token=tiny_tokenizer.eos_token, pad_token=tiny_tokenizer.pad_token)
    user, assistant = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    declared = {"bos": user, "eos": assistant, "unk": tokenizer.eos_token_id}  # no padding id: left as it was
    write_gguf(tmp_path / "m.gguf", declared)
    assert gguf_special_token_ids(tmp_path / "m.gguf") == declared
    pad_before = tokenizer.pad_token_id
    pin_special_tokens(tokenizer, declared)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.eos_token_id) == ("<|user|>", "<|assistant|>", assistant)
    assert tokenizer.unk_token_id == declared["unk"] and tokenizer.pad_token_id == pad_before


def build(tiny_model_dir):
    return LatentModel.from_config(ModelConfig(name_or_path=str(tiny_model_dir), lora_r=4), LatentConfig(k=2),
                                   dtype=torch.float64, device=CPU)


def rewrite_settings(directory, **changes) -> None:
    path = directory / SETTINGS_FILE
    settings = json.loads(path.read_text())
    settings.update(changes)
    settings = {key: value for key, value in settings.items() if value is not None}
    path.write_text(json.dumps(settings))


def test_a_checkpoint_records_its_eos_and_is_loaded_stopping_on_it(tiny_model_dir, tmp_path):
    model, tokenizer = build(tiny_model_dir)
    assert model.settings.eos_token_id == tokenizer.eos_token_id
    model.save(tmp_path)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["eos_token_id"] == tokenizer.eos_token_id

    trained_with = tokenizer.convert_tokens_to_ids("<|assistant|>")  # what another machine's tokenizer called EOS
    assert trained_with != tokenizer.eos_token_id
    rewrite_settings(tmp_path, eos_token_id=trained_with)
    loaded, loaded_tokenizer = LatentModel.load(tmp_path, torch.float64, CPU)
    assert loaded_tokenizer.eos_token_id == trained_with and loaded_tokenizer.eos_token == "<|assistant|>"
    assert loaded.settings.eos_token_id == trained_with
    loaded.save(tmp_path / "again")  # and it stays recorded through phase 2's checkpoints
    assert json.loads((tmp_path / "again" / SETTINGS_FILE).read_text())["eos_token_id"] == trained_with


def test_a_checkpoint_from_before_the_record_keeps_the_tokenizers_eos(tiny_model_dir, tmp_path):
    model, tokenizer = build(tiny_model_dir)
    model.save(tmp_path)
    rewrite_settings(tmp_path, eos_token_id=None)
    loaded, loaded_tokenizer = LatentModel.load(tmp_path, torch.float64, CPU)
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id == loaded.settings.eos_token_id


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_an_eos_outside_the_vocabulary_is_one_line_naming_the_file(tiny_model_dir, tmp_path, bad):
    model, _ = build(tiny_model_dir)
    model.save(tmp_path)
    rewrite_settings(tmp_path, eos_token_id=bad)
    with pytest.raises(CheckpointError) as info:
        LatentModel.load(tmp_path, torch.float64, CPU)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / SETTINGS_FILE) in message and f"eos_token_id {bad}" in message
