"""vLLM as the text-only rollout engine: the same trajectories, log-probs and weights as rlatent's sampler.

Runs only where vLLM is installed (`bash scripts/vllm_env.sh DIR`; `.ci/run` does). One engine serves
the module: starting one takes ~15-30 s on 2 CPU cores. Run with VLLM_CPU_KVCACHE_SPACE=1 (GiB of KV cache).
"""

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("vllm", reason="vLLM is not installed (bash scripts/vllm_env.sh DIR builds an env with it)")

from rlatent.latent.policy import recompute_actions  # noqa: E402
from rlatent.config import LatentConfig, ModelConfig  # noqa: E402
from rlatent.errors import ConfigError  # noqa: E402
from rlatent.model.latent_model import LatentModel  # noqa: E402
from rlatent.latent.sampler import SamplingSettings, sample  # noqa: E402
from rlatent.model.tiny import build_tiny_model  # noqa: E402
from rlatent.workers.vllm_engine import VLLMEngine, rollout_tokens_per_second  # noqa: E402

# vLLM's CPU kernels and the Hugging Face forward sum in different orders: float32 rounding leaves the
# log-probs apart by up to 2.3e-6 here (base, LoRA and full weights); the margin covers other CPUs' kernels.
TOLERANCE = 5e-5
MAX_NEW = 12
TEXTS = ["Tom has 3 apples", "12 + 7 =", "She buys 4 pens and 5 more"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model with 32-wide heads (vLLM's CPU attention has no 16) and a sharper LM head, so that
    sampled completions differ by seed yet greedy ones have no near-ties that float32 noise could flip."""
    path = build_tiny_model(tmp_path_factory.mktemp("vllm_tiny"), hidden_size=64, num_heads=2)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"] *= 15
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def policy(model_dir):
    torch.manual_seed(0)
    model, tokenizer = LatentModel.from_config(ModelConfig(name_or_path=str(model_dir), lora_r=4),
                                               LatentConfig(mode="none"), dtype=torch.float32,
                                               device=torch.device("cpu"))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def prompts(policy):
    _, tokenizer = policy
    return [tokenizer(t).input_ids for t in TEXTS]


@pytest.fixture(scope="module")
def eos(policy, prompts):
    """A stop token the tiny model actually emits: the 4th greedy token of the first prompt (a random
    model rarely draws its real EOS within a few tokens, and stopping is what is under test)."""
    model, tokenizer = policy
    traj = sample(model, prompts[:1], tokenizer.eos_token_id, tokenizer.pad_token_id,
                  SamplingSettings(max_new_tokens=4))
    return traj.completion_ids(0)[3]


@pytest.fixture(scope="module")
def engine(policy, model_dir, eos):
    model, tokenizer = policy
    engine = VLLMEngine(str(model_dir), model.settings, tokenizer, SamplingSettings(max_new_tokens=MAX_NEW,
                        temperature=1.0), eos, tokenizer.pad_token_id, model.hidden_size, max_model_len=128)
    yield engine
    engine.close()


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def recomputed(model, traj):
    stored = traj.actions(noisy_latents=False)
    with torch.no_grad():
        actions = recompute_actions(model, traj.batch, traj.slot_inputs, stored.mask, 1.0, 0.0, "recurrent").actions
    return stored.logprobs[..., 0], actions.logprobs[..., 0]


def check_structure(traj, rows, eos, pad_id, hidden_size):
    """What `rlatent.latent.sampler.sample` returns for mode none."""
    batch, lengths = traj.batch, traj.batch.lengths
    B, T = batch.input_ids.shape
    assert (B, T) == (len(rows), int(lengths.max())) and traj.slot_inputs.shape == (B, T, hidden_size)
    assert batch.prompt_lengths.tolist() == [len(p) for p in rows]
    for b, prompt in enumerate(rows):
        completion = traj.completion_ids(b)
        assert batch.input_ids[b, : len(prompt)].tolist() == prompt
        assert (batch.input_ids[b, lengths[b]:] == pad_id).all()
        assert traj.finished[b] == (completion[-1] == eos) and eos not in completion[:-1]
        assert traj.finished[b] or len(completion) == MAX_NEW
    assert (batch.attention_mask == (torch.arange(T)[None] < lengths[:, None])).all()
    assert ((traj.token_logprobs < 0) == batch.target_mask()).all()  # one log-prob per answer token, nowhere else
    assert not batch.latent_mask.any() and not traj.start_decided.any() and not traj.stop_decided.any()
    for empty in (traj.start_logprobs, traj.stop_logprobs, traj.latent_logprobs, traj.slot_inputs):
        assert not empty.any()
    assert traj.hidden is None and traj.forward_passes == int((lengths - batch.prompt_lengths).max())


def test_sampled_trajectories_have_the_samplers_structure(engine, prompts, eos, policy):
    rows = [p for p in prompts for _ in range(4)]  # GRPO groups: consecutive duplicates
    traj = engine.sample(rows, seed=0)
    check_structure(traj, rows, eos, engine.pad_id, policy[0].hidden_size)
    assert len({tuple(traj.completion_ids(b)) for b in range(len(rows))}) > 3  # duplicates draw apart
    again = engine.sample(rows, seed=0)
    assert torch.equal(again.batch.input_ids, traj.batch.input_ids)  # reproducible from the seed
    assert not torch.equal(engine.sample(rows, seed=1).batch.input_ids, traj.batch.input_ids)
    assert rollout_tokens_per_second(engine, rows, seed=0) > 0


def test_logprobs_equal_rlatents_recompute(engine, prompts, policy):
    stored, ours = recomputed(policy[0], engine.sample(prompts * 2, seed=3))
    assert (stored - ours).abs().max() < TOLERANCE


def test_loaded_lora_weights_drive_the_samples(engine, prompts, policy):
    model, _ = policy
    original = trainable(model)
    before = engine.sample(prompts, seed=5)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    try:
        engine.load_trainable(trainable(model), version=1)
        after = engine.sample(prompts, seed=5)
        stored, ours = recomputed(model, after)
        assert (stored - ours).abs().max() < TOLERANCE
        _, stale = recomputed(model, before)  # the old samples under the new weights
        assert (stale - before.token_logprobs).abs().max() > 0.1
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in original:
                    param.copy_(original[name])
        engine.load_trainable(original, version=1)  # the same version again must not hit a cached adapter
    restored = engine.sample(prompts, seed=5)
    assert torch.equal(restored.batch.input_ids, before.batch.input_ids)


def test_greedy_completions_equal_rlatents_sampler(engine, prompts, policy, eos):
    model, tokenizer = policy
    greedy = SamplingSettings(max_new_tokens=MAX_NEW, temperature=0.0)
    ours = sample(model, prompts, eos, tokenizer.pad_token_id, greedy)
    theirs = engine.sample(prompts, seed=0, sampling=greedy)
    check_structure(theirs, prompts, eos, tokenizer.pad_token_id, model.hidden_size)
    assert theirs.finished.tolist() == [True, False, False]  # the first stops at its 4th token
    assert torch.equal(theirs.batch.input_ids, ours.batch.input_ids)
    assert torch.equal(theirs.batch.attention_mask, ours.batch.attention_mask)
    assert torch.equal(theirs.finished, ours.finished) and theirs.forward_passes == ours.forward_passes
    assert (theirs.token_logprobs - ours.token_logprobs).abs().max() < TOLERANCE  # at temperature 1


def test_full_fine_tuning_weights_are_reloaded(model_dir, prompts, eos):
    """lora_r = 0: the learner's whole base goes into the engine (a second engine, ~15 s)."""
    model, tokenizer = LatentModel.from_config(ModelConfig(name_or_path=str(model_dir), lora_r=0),
                                               LatentConfig(mode="none"), dtype=torch.float32,
                                               device=torch.device("cpu"))
    engine = VLLMEngine(str(model_dir), model.settings, tokenizer, SamplingSettings(max_new_tokens=MAX_NEW,
                        temperature=1.0), eos, tokenizer.pad_token_id, model.hidden_size, max_model_len=128)
    try:
        before = engine.sample(prompts, seed=5)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".layers." in name:
                    param.add_(0.02 * torch.randn_like(param))
        engine.load_trainable(trainable(model), version=1)
        stored, ours = recomputed(model.eval(), engine.sample(prompts, seed=5))
        assert (stored - ours).abs().max() < TOLERANCE
        _, stale = recomputed(model, before)
        assert (stale - before.token_logprobs).abs().max() > 0.1
    finally:
        engine.close()


def test_errors_are_one_line(policy, model_dir, monkeypatch):
    model, tokenizer = policy
    args = (tokenizer, SamplingSettings(), 0, 1, model.hidden_size)
    latent = model.settings.__class__(base_model=str(model_dir), mode="latent")
    with pytest.raises(ConfigError, match="latent.mode must be none") as error:
        VLLMEngine(str(model_dir), latent, *args)
    assert "\n" not in str(error.value)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now fails
    with pytest.raises(ConfigError, match="vllm is not installed") as error:
        VLLMEngine(str(model_dir), model.settings, *args)
    assert "\n" not in str(error.value)


def test_grpo_and_eval_run_end_to_end_on_vllm(model_dir, tmp_path, monkeypatch, request):
    """`grpo.engine=vllm eval.engine=vllm` through the CLI: LoRA synced to vLLM after every update."""
    from rlatent.run.cli import main
    from rlatent.io.run_dir import read_metrics

    monkeypatch.chdir(request.config.rootpath)
    assert main(["grpo", "configs/tiny.yaml", f"model.name_or_path={model_dir}", "latent.mode=none",
                 "grpo.engine=vllm", "eval.engine=vllm", "grpo.steps=2", "eval.limit=2",
                 f"output.dir={tmp_path}", "output.name=run"]) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    grpo = [r for r in rows if r["phase"] == "grpo"]
    assert [r["step"] for r in grpo] == [1, 2]
    assert all(r["sync_bytes"] > 0 and r["actions_start"] == 0 for r in grpo)  # text only: no decisions
    assert [r["problems"] for r in rows if r["phase"] == "test"] == [2]


def test_ray_rollout_workers_can_host_vllm(model_dir, tmp_path, monkeypatch, request):
    """`distributed.backend=ray grpo.engine=vllm`: the engine lives in a Ray actor and gets LoRA by sync."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed in this environment")
    from rlatent.run.cli import main
    from rlatent.io.run_dir import read_metrics

    monkeypatch.chdir(request.config.rootpath)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert main(["grpo", "configs/tiny.yaml", f"model.name_or_path={model_dir}", "latent.mode=none",
                 "grpo.engine=vllm", "distributed.backend=ray", "distributed.rollout_workers=1",
                 "distributed.num_cpus=4", "distributed.timeout_s=300", "grpo.steps=2", "eval.limit=1",
                 f"output.dir={tmp_path}", "output.name=run"]) == 0
    assert not ray.is_initialized()  # the run started its own Ray and shut it down
    grpo = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["phase"] == "grpo"]
    assert [r["rollout_samples"] for r in grpo] == [4.0, 4.0] and all(r["sync_bytes"] > 0 for r in grpo)
