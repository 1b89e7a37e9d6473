"""LatentModel: save/load round trips, the frozen language trunk, bad checkpoints, SFT losses and latent gain.

Every model here is the tiny random qwen2 of `tiny_model_dir` in float64 with a
non-trivial adapter and heads, so a weight that is lost or misplaced on the
way through disk changes what the model samples.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from rlatent.latent.batch import LatentBatch, collate
from rlatent.config import LatentConfig, ModelConfig, RunConfig
from rlatent.errors import CheckpointError
from rlatent.latent.forward import forward
from rlatent.model.latent_model import HEADS_FILE, SETTINGS_FILE, LatentModel
from rlatent.latent.sampler import SamplingSettings, sample
from rlatent.sft.trainer import SFTTrainer
from rlatent.sft.diagnostics import GAIN_REPLACEMENTS, latent_gain, replaced_latents
from rlatent.sft.losses import sft_loss
from rlatent.data.splits import sft_examples
from rlatent.data.synthetic import generate_problems

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Tom has 3 apples", "12 + 7 =", "She buys 4 pens and 5 more"]


def build_model(model_dir, trunk="shared", mode="latent", proj="norm_match", lora_r=4, head="linear"):
    torch.manual_seed(0)
    model, tokenizer = LatentModel.from_config(
        ModelConfig(name_or_path=str(model_dir), lora_r=lora_r, head=head),
        LatentConfig(mode=mode, trunk=trunk, proj=proj, k=2),
        dtype=torch.float64, device=CPU,
    )
    # Non-trivial adapter, heads, projection and pause embeddings (LoRA B and the MLP's `down` start at zero).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or name.startswith(("start_head.", "stop_head.", "proj.")):
                param.normal_(0, 0.05)
        if model.pause is not None:
            model.pause.add_(torch.randn_like(model.pause) * 0.1)
        last = model.start_head.net if head == "linear" else model.start_head.net[-1]
        last.bias.fill_(-0.3)  # eager enough to open blocks at the test's start threshold
    return model.eval(), tokenizer


def generate(model, tokenizer, **overrides):
    prompts = [tokenizer(text).input_ids for text in PROMPTS]
    settings = dict(max_new_tokens=10, decisions="greedy", start_threshold=0.4, stop_threshold=0.5,
                    max_latents_per_block=3, max_blocks=3, max_total_latents=6, record_hidden=True)
    settings.update(overrides)
    return sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, SamplingSettings(**settings))


def assert_same_behaviour(model, loaded, tokenizer):
    for overrides in ({}, {"decisions": "sample", "temperature": 1.0}):  # greedy, then seeded sampling
        torch.manual_seed(1)
        before = generate(model, tokenizer, **overrides)
        torch.manual_seed(1)
        after = generate(loaded, tokenizer, **overrides)
        assert torch.equal(before.batch.input_ids, after.batch.input_ids)
        assert torch.equal(before.batch.latent_mask, after.batch.latent_mask)
        assert torch.equal(before.batch.attention_mask, after.batch.attention_mask)
        for name in ("token_logprobs", "start_logprobs", "stop_logprobs", "slot_inputs", "hidden"):
            assert torch.allclose(getattr(before, name), getattr(after, name), atol=1e-10, rtol=0), name
        with torch.no_grad():
            out_before = forward(model, before.batch)
            out_after = forward(loaded, before.batch)
        assert torch.allclose(out_before.hidden, out_after.hidden, atol=1e-10, rtol=0)
    return before


@pytest.mark.parametrize("trunk", ["shared", "two"])
@pytest.mark.parametrize("mode", ["latent", "pause"])
@pytest.mark.parametrize("proj", ["identity", "norm_match", "mlp", "pause_plus"])
def test_save_load_round_trip(tiny_model_dir, tmp_path, proj, mode, trunk):
    model, tokenizer = build_model(tiny_model_dir, trunk=trunk, mode=mode, proj=proj)
    traj = generate(model, tokenizer)
    assert traj.batch.latent_mask.any(), "the test needs latents to be meaningful"
    model.save(tmp_path)
    loaded, loaded_tokenizer = LatentModel.load(tmp_path, torch.float64, CPU)
    loaded.eval()
    assert loaded.settings == model.settings
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    assert_same_behaviour(model, loaded, tokenizer)


def test_save_load_round_trip_mlp_heads(tiny_model_dir, tmp_path):
    model, tokenizer = build_model(tiny_model_dir, head="mlp", proj="mlp")
    model.save(tmp_path)
    loaded, _ = LatentModel.load(tmp_path, torch.float64, CPU)
    assert_same_behaviour(model, loaded.eval(), tokenizer)


def test_load_trainable_keeps_adapter_and_heads_trainable(tiny_model_dir, tmp_path):
    model, _ = build_model(tiny_model_dir, trunk="two")
    model.save(tmp_path)
    loaded, _ = LatentModel.load(tmp_path, torch.float64, CPU, trainable=True)
    names = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in names) and any(n.startswith("start_head.") for n in names)
    assert not any("lora_" not in n and n.startswith("base.") for n in names)  # the base stays frozen


def test_full_finetuning_round_trip(tiny_model_dir, tmp_path):
    model, tokenizer = build_model(tiny_model_dir, lora_r=0)
    with torch.no_grad():  # change the base weights, so a load that fell back to the original base would differ
        for name, param in model.base.named_parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save(tmp_path)
    loaded, loaded_tokenizer = LatentModel.load(tmp_path, torch.float64, CPU)
    # The checkpoint must come back with the tokenizer the model was trained with.
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert_same_behaviour(model, loaded.eval(), tokenizer)


# ---- two trunks: the language trunk is the frozen base ---------------------------------------


def synthetic_examples(tokenizer, mode="latent", count=8):
    problems = generate_problems(count, 0, 2, 2, 9, "+-*")
    examples, _ = sft_examples(problems, tokenizer, LatentConfig(mode=mode, k=2), 512)
    return examples


def is_base_weight(name):
    return "lora_" not in name and not name.startswith(("start_head.", "stop_head.", "proj.", "pause"))


def test_two_trunk_training_leaves_base_weights_untouched(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    model, tokenizer = LatentModel.from_config(
        ModelConfig(name_or_path=str(tiny_model_dir), lora_r=4),
        LatentConfig(mode="latent", trunk="two", proj="mlp", k=2), dtype=torch.float64, device=CPU,
    )
    cfg = RunConfig.model_validate({"latent": {"trunk": "two", "proj": "mlp"},
                                    "sft": {"batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "steps": 3}})
    examples = synthetic_examples(tokenizer)
    trainer = SFTTrainer(cfg, model, tokenizer, examples, examples, run=None, logger=None)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert any(is_base_weight(n) for n in before) and any("lora_B" in n for n in before)
    batch = trainer.batch(examples[:4])
    assert batch.latent_mask.any()
    for _ in range(3):
        metrics = trainer.train_step([batch])
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    after = dict(model.named_parameters())
    for name, old in before.items():
        if is_base_weight(name):
            assert torch.equal(after[name], old), f"base weight {name} changed"
        elif "lora_B" in name or name.startswith(("start_head.", "stop_head.", "proj.up.", "proj.down.")):
            assert not torch.equal(after[name], old), f"trainable {name} did not change"
    assert any(not torch.equal(after[n], old) for n, old in before.items() if "lora_A" in n)


def test_two_trunk_adapter_acts_only_at_latent_slots(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, trunk="two")
    plain = collate(synthetic_examples(tokenizer, mode="none", count=4), tokenizer.pad_token_id)
    assert not plain.latent_mask.any()
    with torch.no_grad():
        routed = forward(model, plain).hidden
        with model.adapters_disabled():
            reference = forward(model, plain).hidden
    assert torch.equal(routed, reference)  # language positions run the frozen base, exactly

    latent = collate(synthetic_examples(tokenizer, count=4), tokenizer.pad_token_id)
    assert latent.latent_mask.any(dim=1).all()
    with torch.no_grad():
        routed = forward(model, latent).hidden
        with model.adapters_disabled():
            reference = forward(model, latent).hidden
    first = latent.latent_mask.float().argmax(1)  # (B,) first latent slot of each row
    index = torch.arange(latent.input_ids.shape[1])
    before_first = (index[None, :] < first[:, None]) & latent.attention_mask
    from_first = (index[None, :] >= first[:, None]) & latent.attention_mask
    assert torch.equal(routed[before_first], reference[before_first])
    differs = (routed - reference).abs().amax(-1) > 1e-9  # (B, T)
    assert differs[latent.latent_mask].all()  # every latent slot runs the adapter
    assert differs[from_first & ~latent.latent_mask].all()  # and every later position sees its effect


def test_shared_trunk_adapter_acts_everywhere(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, trunk="shared")
    plain = collate(synthetic_examples(tokenizer, mode="none", count=2), tokenizer.pad_token_id)
    with torch.no_grad():
        routed = forward(model, plain).hidden
        with model.adapters_disabled():
            reference = forward(model, plain).hidden
    real = plain.attention_mask
    assert ((routed - reference).abs().amax(-1) > 1e-9)[real].all()


# ---- corrupt or incompatible checkpoints --------------------------------------------------------


@pytest.fixture(scope="module")
def saved_checkpoint(tiny_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    model, _ = build_model(tiny_model_dir)
    model.save(directory)
    return directory


def copy_checkpoint(saved, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(saved, target)
    return target


def checkpoint_error(directory) -> str:
    with pytest.raises(CheckpointError) as info:
        LatentModel.load(directory, torch.float64, CPU)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_missing_settings_names_the_directory(saved_checkpoint, tmp_path):
    directory = copy_checkpoint(saved_checkpoint, tmp_path)
    (directory / SETTINGS_FILE).unlink()
    message = checkpoint_error(directory)
    assert str(directory) in message and SETTINGS_FILE in message


def test_not_a_checkpoint_at_all(tmp_path):
    message = checkpoint_error(tmp_path)
    assert str(tmp_path) in message


def test_garbled_settings_names_the_file(saved_checkpoint, tmp_path):
    directory = copy_checkpoint(saved_checkpoint, tmp_path)
    (directory / SETTINGS_FILE).write_text("{not json")
    assert str(directory / SETTINGS_FILE) in checkpoint_error(directory)


def test_unknown_setting_names_the_file(saved_checkpoint, tmp_path):
    directory = copy_checkpoint(saved_checkpoint, tmp_path)
    settings = json.loads((directory / SETTINGS_FILE).read_text())
    settings["warp_factor"] = 9
    (directory / SETTINGS_FILE).write_text(json.dumps(settings))
    assert str(directory / SETTINGS_FILE) in checkpoint_error(directory)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_corrupt_heads_name_the_file(saved_checkpoint, tmp_path, damage):
    directory = copy_checkpoint(saved_checkpoint, tmp_path)
    heads = directory / HEADS_FILE
    data = heads.read_bytes()
    if damage == "truncated":
        heads.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        heads.write_bytes(b"\x00\xffnot a safetensors file at all" * 10)
    elif damage == "empty":
        heads.write_bytes(b"")
    else:
        heads.unlink()
    message = checkpoint_error(directory)
    assert str(heads) in message


@pytest.mark.parametrize("damage", ["config_missing", "weights_garbage"])
def test_corrupt_adapter_is_a_checkpoint_error(saved_checkpoint, tmp_path, damage):
    directory = copy_checkpoint(saved_checkpoint, tmp_path)
    adapter = directory / "adapter"
    if damage == "config_missing":
        (adapter / "adapter_config.json").unlink()
    else:
        (adapter / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    message = checkpoint_error(directory)
    assert str(adapter) in message


def test_heads_of_another_kind_are_rejected(tiny_model_dir, tmp_path):
    model, _ = build_model(tiny_model_dir, head="mlp")
    model.save(tmp_path)
    settings = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert settings["head"] == "mlp"
    settings["head"] = "linear"
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(settings))
    message = checkpoint_error(tmp_path)
    assert str(tmp_path / HEADS_FILE) in message


def test_heads_of_another_width_are_rejected(saved_checkpoint, tmp_path):
    from rlatent.io.atomic import load_tensors, save_tensors

    directory = copy_checkpoint(saved_checkpoint, tmp_path)
    state = load_tensors(directory / HEADS_FILE)
    state["start_head.net.weight"] = torch.zeros(1, 7, dtype=torch.float64)
    save_tensors(directory / HEADS_FILE, state)
    message = checkpoint_error(directory)
    assert str(directory / HEADS_FILE) in message and "start_head.net.weight" in message


# ---- latent gain ------------------------------------------------------------------------------------


def slot_batch():
    """(B=3, T=6, H=5) slot inputs with latents: row 0 two, row 1 three, row 2 one."""
    torch.manual_seed(0)
    inputs = torch.randn(3, 6, 5, dtype=torch.float64) * torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64)[:, None, None]
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, [1, 2]] = True
    mask[1, [2, 3, 4]] = True
    mask[2, [5]] = True
    return inputs, mask


def test_replaced_latents_zeros():
    inputs, mask = slot_batch()
    out = replaced_latents(inputs, mask, "zeros", torch.Generator().manual_seed(0))
    assert (out[mask] == 0).all()
    assert torch.equal(out[~mask], inputs[~mask])
    assert out.dtype == inputs.dtype and out.shape == inputs.shape


def test_replaced_latents_noise_keeps_each_norm():
    inputs, mask = slot_batch()
    out = replaced_latents(inputs, mask, "noise", torch.Generator().manual_seed(0))
    assert torch.allclose(out[mask].norm(dim=-1), inputs[mask].norm(dim=-1), rtol=1e-6)
    assert not torch.allclose(out[mask], inputs[mask])
    assert torch.equal(out[~mask], inputs[~mask])
    again = replaced_latents(inputs, mask, "noise", torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded


@pytest.mark.parametrize("seed", range(4))
def test_replaced_latents_shuffle_takes_another_rows_vectors(seed):
    inputs, mask = slot_batch()
    out = replaced_latents(inputs, mask, "shuffle", torch.Generator().manual_seed(seed))
    assert torch.equal(out[~mask], inputs[~mask])
    donors = []
    for row in range(3):
        mine = out[row][mask[row]]
        candidates = [d for d in range(3) if all(any(torch.equal(v, w) for w in inputs[d][mask[d]]) for v in mine)]
        assert candidates and row not in candidates, (row, candidates)
        donors.append(candidates[0])
    assert sorted(donors) == [0, 1, 2]  # a permutation of rows: every row's latents are used


def test_latent_gain_reports_every_replacement(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir)
    batch = collate(synthetic_examples(tokenizer, count=4), tokenizer.pad_token_id)
    with torch.no_grad():
        out = forward(model, batch)
    metrics = latent_gain(model, batch, out, seed=0)
    assert set(metrics) == {"next_step_loss"} | {f"latent_gain_{how}" for how in GAIN_REPLACEMENTS}
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["latent_gain_zeros"] != 0.0  # the tiny model's states do depend on its latents
    assert latent_gain(model, batch, out, seed=0) == metrics  # deterministic for a seed


def test_latent_gain_is_empty_without_latents(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir)
    batch = collate(synthetic_examples(tokenizer, mode="none", count=2), tokenizer.pad_token_id)
    with torch.no_grad():
        out = forward(model, batch)
    assert latent_gain(model, batch, out, seed=0) == {}


# ---- the SFT loss on a hand-built batch -----------------------------------------------------------


def hand_batch(pad_id):
    """prompt p0 p1 p2 | tokens t3 t4 | latents 5 6 | tokens t7 t8 | EOS at 9 | two padding columns."""
    ids = torch.tensor([[11, 12, 13, 21, 22, pad_id, pad_id, 23, 24, 0, pad_id, pad_id]])
    latent = torch.zeros(1, 12, dtype=torch.bool)
    latent[0, [5, 6]] = True
    attention = torch.zeros(1, 12, dtype=torch.bool)
    attention[0, :10] = True
    return LatentBatch(ids, latent, attention, torch.tensor([3]))


def test_decision_labels_on_a_hand_built_batch():
    batch = hand_batch(pad_id=1)
    start_mask, start_labels, stop_mask, stop_labels = batch.decision_labels()
    assert start_mask[0].nonzero().flatten().tolist() == [2, 3, 4, 7, 8]
    assert start_labels[0][start_mask[0]].tolist() == [0, 0, 1, 0, 0]
    assert stop_mask[0].nonzero().flatten().tolist() == [5, 6]
    assert stop_labels[0][stop_mask[0]].tolist() == [0, 1]
    assert batch.target_mask()[0].nonzero().flatten().tolist() == [3, 4, 7, 8, 9]


def test_sft_loss_by_hand(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir)
    batch = hand_batch(tokenizer.pad_token_id)
    batch.input_ids[0, 9] = tokenizer.eos_token_id
    with torch.no_grad():
        out = forward(model, batch)
        loss = sft_loss(model, batch, out, lambda_start=0.7, lambda_stop=0.3, start_pos_weight="auto")
    hidden = out.hidden[0]
    start_positions, stop_positions = [2, 3, 4, 7, 8], [5, 6]
    start_logits = model.start_logits(hidden[start_positions]).float()
    start_labels = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    weight = torch.tensor(4.0)  # negatives / positives = 4 / 1
    expected_start = F.binary_cross_entropy_with_logits(start_logits, start_labels, pos_weight=weight)
    stop_logits = model.stop_logits(hidden[stop_positions]).float()
    expected_stop = F.binary_cross_entropy_with_logits(stop_logits, torch.tensor([0.0, 1.0]))
    targets = [3, 4, 7, 8, 9]
    logits = model.token_logits(hidden[[t - 1 for t in targets]]).float()
    expected_lm = F.cross_entropy(logits, batch.input_ids[0, targets])
    assert torch.allclose(loss.start, expected_start, atol=1e-6)
    assert torch.allclose(loss.stop, expected_stop, atol=1e-6)
    assert torch.allclose(loss.lm, expected_lm, atol=1e-6)
    assert torch.allclose(loss.total, expected_lm + 0.7 * expected_start + 0.3 * expected_stop, atol=1e-6)
    # The auto weight is negatives/positives: by hand, positive terms count 4x.
    p = torch.sigmoid(start_logits)
    by_hand = -(4.0 * start_labels * p.log() + (1 - start_labels) * (1 - p).log()).mean()
    assert torch.allclose(loss.start, by_hand, atol=1e-6)
    assert loss.start_labels.tolist() == start_labels.tolist() and loss.stop_labels.tolist() == [0.0, 1.0]

    fixed = sft_loss(model, batch, out, 1.0, 1.0, start_pos_weight=2.0)
    assert torch.allclose(fixed.start, F.binary_cross_entropy_with_logits(start_logits, start_labels,
                                                                          pos_weight=torch.tensor(2.0)), atol=1e-6)


def test_sft_loss_text_mode_has_no_decision_losses(tiny_model_dir):
    model, tokenizer = build_model(tiny_model_dir, mode="none")
    batch = collate(synthetic_examples(tokenizer, mode="none", count=2), tokenizer.pad_token_id)
    with torch.no_grad():
        out = forward(model, batch)
        loss = sft_loss(model, batch, out, 1.0, 1.0, "auto")
    assert loss.start.item() == 0.0 and loss.stop.item() == 0.0
    assert loss.total.item() == pytest.approx(loss.lm.item())
