"""DeepSpeed ZeRO as the learner's optimizer: the same training as plain AdamW, and state that moves between them.

One CPU process (gloo), tiny float32 models. Every pair of runs starts from the
same weights and takes the real SFT loss over the latent forward through the
same micro-batches, 2, 3 and 1 of them per optimizer step, with clipping active
(gradient norms ~7 against `max_grad_norm` 1).
"""

import os

import pytest
import torch
from transformers import get_scheduler

pytest.importorskip("deepspeed")

from rlatent.optim import deepspeed_optimizer as deepspeed_optim  # noqa: E402
from rlatent.latent.batch import collate  # noqa: E402
from rlatent.io.checkpoint import restore_training_state, save_checkpoint  # noqa: E402
from rlatent.config import load_config  # noqa: E402
from rlatent.optim.deepspeed_optimizer import DeepSpeedOptimizer  # noqa: E402
from rlatent.errors import ConfigError  # noqa: E402
from rlatent.latent.forward import forward  # noqa: E402
from rlatent.model.latent_model import LatentModel  # noqa: E402
from rlatent.optim import TorchOptimizer, build_optimizer  # noqa: E402
from rlatent.optim.state import trainable_named_parameters  # noqa: E402
from rlatent.sft.losses import sft_loss  # noqa: E402
from rlatent.data.splits import sft_examples  # noqa: E402
from rlatent.data.synthetic import generate_problems  # noqa: E402
from rlatent.workers.weight_sync import load_trainable_state, trainable_state  # noqa: E402

CPU = torch.device("cpu")
CONFIG = "configs/tiny.yaml"
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-2, 0.01, 1.0
STEPS = [[0, 1], [2, 3, 4], [5]]  # micro-batch indices of each optimizer step
# ZeRO adds the micro-batch gradients into flat float32 buffers and takes the norm over those: the same sums in
# another order, ~1e-7 relative apart. Through three Adam steps at lr 1e-2 that leaves weights up to 6e-7 apart
# (measured, all stages); 1e-5 is 20 times that and a thousandth of what one step moves a weight (~1e-2).
WEIGHT_ATOL, RTOL = 1e-5, 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread", "repo_root")  # config paths are relative to the repository
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(scope="module", autouse=True)
def rendezvous_env():
    """The process group lives on, but later tests (and the processes they start) get the environment back."""
    saved = {name: os.environ.get(name) for name in RENDEZVOUS}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
    cfg = run_config(tiny_model_dir)
    _, tokenizer = LatentModel.from_config(cfg.model, cfg.latent, torch.float32, CPU)
    examples, _ = sft_examples(generate_problems(12, 0, 2, 2, 9, "+-*"), tokenizer, cfg.latent, 512)
    return [collate(examples[i : i + 2], tokenizer.pad_token_id) for i in range(0, 12, 2)]


def run_config(model_dir, *overrides):
    return load_config(CONFIG, [f"model.name_or_path={model_dir}", "deepspeed.enabled=true", *overrides])


def build_model(cfg, dtype=torch.float32) -> LatentModel:
    torch.manual_seed(0)
    model, _ = LatentModel.from_config(cfg.model, cfg.latent, dtype, CPU)
    return model


def schedule(optimizer):
    return get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=len(STEPS) + 1)


def zero_optimizer(cfg, model) -> DeepSpeedOptimizer:
    optimizer = build_optimizer(cfg.deepspeed, model, LR, WEIGHT_DECAY, MAX_GRAD_NORM, schedule)
    assert isinstance(optimizer, DeepSpeedOptimizer)
    return optimizer


def plain_optimizer(model) -> TorchOptimizer:
    return TorchOptimizer(model, LR, WEIGHT_DECAY, MAX_GRAD_NORM, schedule)


def train(cfg, model, optimizer, batches, steps) -> tuple[list[float], list[float]]:
    """Optimizer steps the way `SFTTrainer.train_step` takes them; returns (micro-batch losses, gradient norms)."""
    model.train()
    sft = cfg.sft
    losses, norms = [], []
    for step in steps:
        for i in step:
            out = forward(model, batches[i], cfg.latent.gradient)
            loss = sft_loss(model, batches[i], out, sft.lambda_start, sft.lambda_stop, sft.start_pos_weight).total
            optimizer.backward(loss / len(step))
            losses.append(loss.item())
        norms.append(optimizer.step())
    return losses, norms


def weights(model, optimizer) -> dict[str, torch.Tensor]:
    with optimizer.full_parameters():
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=WEIGHT_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stage, lora_r, offload", [
    (0, 4, ""), (1, 4, "optimizer"), (2, 4, ""), (2, 0, ""), (2, 4, "optimizer"), (3, 4, ""), (3, 0, "optimizer+params"),
])
def test_zero_training_matches_plain_adamw(tiny_model_dir, batches, stage, lora_r, offload):
    """Also the ZeRO-3 forward: the trainers call the model's submodules, never the engine, and every micro-batch
    loss (the first one before any step) equals the plain one. Offload costs no compile here (torch's AdamW); on a
    CPU-only machine it moves nothing, so it checks the offload code paths, not memory."""
    cfg = run_config(tiny_model_dir, f"deepspeed.zero_stage={stage}", f"model.lora_r={lora_r}",
                     f"deepspeed.offload_optimizer={'optimizer' in offload}",
                     f"deepspeed.offload_params={'params' in offload}")
    plain_model = build_model(cfg)
    plain = plain_optimizer(plain_model)
    initial = weights(plain_model, plain)
    plain_losses, plain_norms = train(cfg, plain_model, plain, batches, STEPS)
    model = build_model(cfg)
    optimizer = zero_optimizer(cfg, model)
    losses, norms = train(cfg, model, optimizer, batches, STEPS)

    assert min(plain_norms) > MAX_GRAD_NORM  # clipping took part
    assert losses == pytest.approx(plain_losses, rel=RTOL)
    assert norms == pytest.approx(plain_norms, rel=RTOL)
    assert optimizer.lr == plain.lr
    expected = weights(plain_model, plain)
    assert max((expected[n] - initial[n]).abs().max() for n, _ in plain.named) > 1e-3
    assert_same_weights(weights(model, optimizer), expected)


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("source", ["zero", "plain"])
def test_optimizer_state_moves_between_plain_and_zero(tiny_model_dir, batches, stage, source):
    """Two steps with one optimizer, its weights and `state_dict()` into a fresh model under the other, one more
    step on each: the same gradient norm and weights."""
    cfg = run_config(tiny_model_dir, f"deepspeed.zero_stage={stage}")
    model = build_model(cfg)
    optimizer = zero_optimizer(cfg, model) if source == "zero" else plain_optimizer(model)
    train(cfg, model, optimizer, batches, STEPS[:2])
    state = optimizer.state_dict()
    other = build_model(cfg)
    assert state["adam_step"] == 2
    assert {name: m["exp_avg"].shape for name, m in state["moments"].items()} == {
        name: p.shape for name, p in trainable_named_parameters(other)}
    assert not other.load_state_dict(weights(model, optimizer), strict=False).unexpected_keys
    other_optimizer = plain_optimizer(other) if source == "zero" else zero_optimizer(cfg, other)
    other_optimizer.load_state_dict(state)
    assert other_optimizer.lr == optimizer.lr
    _, norms = train(cfg, model, optimizer, batches, STEPS[2:])
    _, other_norms = train(cfg, other, other_optimizer, batches, STEPS[2:])
    assert other_norms == pytest.approx(norms, rel=RTOL)
    assert_same_weights(weights(other, other_optimizer), weights(model, optimizer))


def test_checkpoint_of_a_zero3_run_resumes_under_zero2(tiny_model_dir, batches, tmp_path):
    """ZeRO-3 writes whole weights and portable optimizer state; a ZeRO-2 run picks them up and continues alike."""
    cfg = run_config(tiny_model_dir, "deepspeed.zero_stage=3")
    model = build_model(cfg)
    optimizer = zero_optimizer(cfg, model)
    train(cfg, model, optimizer, batches, STEPS[:2])
    with optimizer.full_parameters():
        save_checkpoint(tmp_path / "ckpt", model, "sft", 2, optimizer.state_dict())

    resumed, _ = LatentModel.load(tmp_path / "ckpt", torch.float32, CPU, trainable=True)
    resumed_optimizer = zero_optimizer(run_config(tiny_model_dir, "deepspeed.zero_stage=2"), resumed)
    assert restore_training_state(tmp_path / "ckpt", "sft", resumed_optimizer) == 2
    assert_same_weights(weights(resumed, resumed_optimizer), weights(model, optimizer))
    _, norms = train(cfg, model, optimizer, batches, STEPS[2:])
    _, resumed_norms = train(cfg, resumed, resumed_optimizer, batches, STEPS[2:])
    assert resumed_norms == pytest.approx(norms, rel=RTOL)
    assert_same_weights(weights(resumed, resumed_optimizer), weights(model, optimizer))


@pytest.mark.parametrize("stage", [2, 3])
def test_weights_written_inside_full_parameters_are_the_ones_trained(tiny_model_dir, batches, stage):
    """What `GRPOLearner.load_trainable` does after building its optimizer: ZeRO's float32 master copies, taken at
    start-up, follow the written weights, so the next step updates those."""
    cfg = run_config(tiny_model_dir, f"deepspeed.zero_stage={stage}")
    donor = build_model(cfg)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    state = trainable_state(donor)
    model = build_model(cfg)
    optimizer = zero_optimizer(cfg, model)
    with optimizer.full_parameters():
        load_trainable_state(model, state)
    plain_model = build_model(cfg)
    load_trainable_state(plain_model, state)
    plain = plain_optimizer(plain_model)
    _, norms = train(cfg, model, optimizer, batches, STEPS[:1])
    _, plain_norms = train(cfg, plain_model, plain, batches, STEPS[:1])
    assert norms == pytest.approx(plain_norms, rel=RTOL)
    assert_same_weights(weights(model, optimizer), weights(plain_model, plain))


def test_process_group_setup_twice_keeps_the_group():
    deepspeed_optim.init_distributed(CPU)
    group = torch.distributed.group.WORLD
    deepspeed_optim.init_distributed(CPU)
    assert torch.distributed.get_world_size() == 1 and torch.distributed.group.WORLD is group


def test_a_lone_process_leaves_no_port_for_its_children():
    """Ray actors inherit the driver's environment; an inherited MASTER_PORT would be this process's."""
    deepspeed_optim.init_distributed(CPU)
    assert "MASTER_PORT" not in os.environ


@pytest.mark.parametrize("overrides, dtype, message", [
    (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"], torch.float32,
     "deepspeed.offload_optimizer: needs deepspeed.zero_stage 1, 2 or 3"),
    (["deepspeed.zero_stage=3", "latent.mode=pause"], torch.float32, "deepspeed.zero_stage: 3 cannot gather pause"),
    (["deepspeed.zero_stage=3", "model.lora_r=0"], torch.bfloat16,
     "deepspeed.zero_stage: 3 needs one dtype for all trainable weights, not bfloat16 and float32"),
])
def test_unsupported_settings_are_one_config_error(tiny_model_dir, overrides, dtype, message):
    cfg = run_config(tiny_model_dir, *overrides)
    with pytest.raises(ConfigError, match=message):
        zero_optimizer(cfg, build_model(cfg, dtype))


def test_missing_deepspeed_is_one_config_error(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(deepspeed_optim, "deepspeed", None)
    cfg = run_config(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"deepspeed.enabled: deepspeed is not installed \(pip install"):
        zero_optimizer(cfg, build_model(cfg))
