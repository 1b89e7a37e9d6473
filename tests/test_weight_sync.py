"""Weight sync moves exactly the trainable tensors: the LoRA adapter, heads and projection, never the base."""

from __future__ import annotations

import pytest
import torch

from rlatent.config import LatentConfig, ModelConfig
from rlatent.errors import TrainingError
from rlatent.model.latent_model import LatentModel
from rlatent.workers.weight_sync import load_trainable_state, model_bytes, state_bytes, trainable_state


def build(model_dir, lora_r=4, proj="mlp", seed=0):
    torch.manual_seed(seed)
    model, _ = LatentModel.from_config(ModelConfig(name_or_path=str(model_dir), lora_r=lora_r),
                                       LatentConfig(proj=proj), torch.float32, torch.device("cpu"))
    return model


def test_lora_sync_holds_adapter_heads_and_projection_only(tiny_model_dir):
    model = build(tiny_model_dir)
    state = trainable_state(model)
    lora = {name for name in state if ".lora_A." in name or ".lora_B." in name}
    heads = {name for name in state if name.startswith(("start_head.", "stop_head.", "proj."))}
    assert lora and heads and set(state) == lora | heads
    assert not any("base_layer" in name or "embed" in name for name in state)
    # Byte count from the shapes of the adapted layers, independently of `state_bytes`.
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    lora_bytes = sum(4 * 4 * (m.base_layer.in_features + m.base_layer.out_features) for m in adapted)  # r=4, fp32
    head_bytes = sum(4 * p.numel() for name, p in model.named_parameters() if name in heads)
    assert len(lora) == 2 * len(adapted)
    assert state_bytes(state) == lora_bytes + head_bytes
    assert state_bytes(state) < model_bytes(model) / 5


def test_full_fine_tuning_syncs_every_weight(tiny_model_dir):
    model = build(tiny_model_dir, lora_r=0)
    assert state_bytes(trainable_state(model)) == model_bytes(model)


def test_a_synced_worker_holds_the_learner_weights(tiny_model_dir):
    learner, worker = build(tiny_model_dir, seed=0), build(tiny_model_dir, seed=1)
    with torch.no_grad():
        for name, p in learner.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    load_trainable_state(worker, trainable_state(learner))
    for (name, a), (_, b) in zip(learner.state_dict().items(), worker.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_state_from_other_settings_is_refused(tiny_model_dir):
    state = trainable_state(build(tiny_model_dir, proj="norm_match"))  # no projection MLP weights
    with pytest.raises(TrainingError, match="do not match the worker's trainable parameters"):
        load_trainable_state(build(tiny_model_dir, proj="mlp"), state)
