"""The stages a user runs, top to bottom: `sft`, `grpo`, `train` (both phases) and `eval`.

Each stage builds its pieces from the config, runs, and leaves a run directory:
resolved config, metrics.jsonl, TensorBoard events, checkpoints, plots,
evaluation samples and report.md.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from rlatent.io.atomic import atomic_write_json
from rlatent.config import RunConfig, load_config
from rlatent.errors import ConfigError
from rlatent.run.evaluate import evaluate_problems
from rlatent.model.latent_model import LatentModel
from rlatent.model.loading import model_dtype, resolve_device
from rlatent.io.run_dir import MetricsLogger, RunDir, metrics_table
from rlatent.run.report import GENERATION_COLUMNS, finish_run
from rlatent.latent.sampler import SamplingSettings
from rlatent.io.checkpoint import checkpoint_phase
from rlatent.distributed import make_backend
from rlatent.grpo.loop import GRPOTrainer
from rlatent.sft.curriculum import Curriculum, staged_examples
from rlatent.sft.trainer import SFTTrainer
from rlatent.data.examples import encode_stop_sequences
from rlatent.data.splits import has_ood_split, load_split

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(cfg: RunConfig, config_path: str | None, suffix: str = "") -> RunDir:
    stem = Path(config_path).stem if config_path else "run"
    name = cfg.output.name or f"{stem}{suffix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.output.dir) / name
    if (path / "metrics.jsonl").exists():
        raise ConfigError(f"output.name: run directory {path} already holds a run; choose another name")
    return RunDir(path)


PHASES = {"sft": ("sft",), "grpo": ("grpo",), "train": ("sft", "grpo")}
RUN_FILE = "run.json"


def run_phases(command: str, cfg: RunConfig | None, config_path: str | None, resume: str | None = None) -> RunDir:
    """Run `sft`, `grpo` or `train` (both) in one run directory; `resume` continues a killed run.

    Resuming reads the run's own config.yaml and its latest checkpoint: a phase-1
    checkpoint before its last step resumes phase 1; one at its last step starts
    phase 2 from it; a phase-2 checkpoint resumes phase 2. Optimizer, scheduler,
    RNG and step come from the checkpoint, and the data position follows from the
    step, so a resumed seeded run matches an uninterrupted one.
    """
    if resume is not None:
        run = RunDir(resume)
        if not run.config_path.is_file():
            raise ConfigError(f"{resume}: not a run directory (config.yaml missing)")
        cfg = load_config(run.config_path)
        command = json.loads((run.path / RUN_FILE).read_text())["command"] if (run.path / RUN_FILE).is_file() else command
    else:
        run = new_run_dir(cfg, config_path)
        run.save_config(cfg.to_yaml())
        atomic_write_json(run.path / RUN_FILE, {"command": command})
    phases = PHASES[command]
    seed_everything(cfg.seed)
    device = resolve_device(cfg.model.device)
    dtype = model_dtype(cfg.model.dtype, device)
    latest = run.latest_checkpoint() if resume is not None else None
    done_phase, done_step = checkpoint_phase(latest) if latest is not None else (None, 0)
    init = latest or (cfg.grpo.init_checkpoint if phases == ("grpo",) else None)
    if init is not None:
        model, tokenizer = LatentModel.load(init, dtype, device, trainable=True, cache_dir=cfg.model.cache_dir)
    else:
        model, tokenizer = LatentModel.from_config(cfg.model, cfg.latent, dtype, device)
    train_problems, skipped = load_split(cfg.data, "train", cfg.data.train_limit)
    eval_problems, _ = load_split(cfg.data, "test", cfg.eval.limit)
    held_out = {"test": eval_problems}
    if has_ood_split(cfg.data):  # longer chains than trained: the out-of-distribution test
        held_out["ood"] = load_split(cfg.data, "ood", cfg.eval.limit)[0]
    print(f"run directory: {run.path}" + (f" (resuming from {latest})" if latest else ""))
    results: dict[str, dict[str, float]] = {}
    with MetricsLogger(run) as logger:
        offset = 0
        if "sft" in phases:
            curriculum = Curriculum.from_config(cfg.sft)
            train, dropped = staged_examples(train_problems, tokenizer, cfg.latent, cfg.data.max_length, curriculum)
            evaluation, _ = staged_examples(eval_problems, tokenizer, cfg.latent, cfg.data.max_length, curriculum)
            if latest is None:
                logger.log(0, {"train_examples": len(train[-1]), "dropped_too_long": dropped, "skipped_rows": skipped,
                               "eval_problems": len(eval_problems),
                               "trainable_parameters": sum(p.numel() for p in model.trainable_parameters())},
                           phase="data")
            trainer = SFTTrainer(cfg, model, tokenizer, train[-1], evaluation[-1], run, logger,
                                 list(zip(train[:-1], evaluation[:-1])))
            if done_phase == "sft":
                trainer.resume(latest)
            if done_phase != "grpo":
                print(f"phase 1 checkpoint: {trainer.train()}")
                two_phases = "grpo" in phases
                results.update(test_after("sft", cfg, model, tokenizer, held_out, run, logger, trainer.step,
                                          "test_sft" if two_phases else "test",
                                          "eval_samples_sft" if two_phases else "eval_samples"))
            offset = cfg.sft.steps
        if "grpo" in phases:
            trainer = GRPOTrainer(cfg, model, tokenizer, train_problems, run, logger,
                                  make_backend(cfg, model, tokenizer), checkpoint_offset=offset)
            if done_phase == "grpo":
                trainer.resume(latest)
            print(f"phase 2 checkpoint: {trainer.train()}")
            results.update(test_after("grpo", cfg, model, tokenizer, held_out, run, logger, trainer.step, "test",
                                      "eval_samples"))
    finish_run(run, cfg, results)
    return run


def test_after(name: str, cfg: RunConfig, model, tokenizer, held_out: dict[str, list], run: RunDir,
               logger: MetricsLogger, step: int, phase: str, samples_stem: str) -> dict[str, dict[str, float]]:
    """Evaluate after phase `name` on every held-out split (`test`, and `ood` where the task has one),
    logged as `phase` and `phase`_ood; returns the results keyed for the report ("sft", "sft (ood)")."""
    results = {}
    for split, problems in held_out.items():
        suffix = "" if split == "test" else "_ood"
        samples = run.samples_dir / f"{samples_stem}{suffix}.jsonl"
        metrics = evaluate_with_engine(cfg, model, tokenizer, problems, samples)
        logger.log(step, metrics, phase=phase + suffix)
        results[name if split == "test" else f"{name} ({split})"] = metrics
    return results


def evaluate_with_engine(cfg: RunConfig, model, tokenizer, problems, samples_path: Path) -> dict[str, float]:
    """Evaluate with `eval.engine`: rlatent's sampler, or vLLM holding the model's current weights."""
    settings = SamplingSettings.from_config(cfg.latent, cfg.eval,
                                            stop_sequences=encode_stop_sequences(cfg.eval.stop, tokenizer))
    engine = None
    if cfg.eval.engine == "vllm":
        from rlatent.workers.rollout import make_engine
        from rlatent.workers.weight_sync import trainable_state

        engine = make_engine("vllm", model, tokenizer, settings, cfg.model.cache_dir)
        engine.load_trainable(trainable_state(model), version=0)
    try:
        return evaluate_problems(model, tokenizer, problems, settings, cfg.eval.batch_size, samples_path,
                                 cfg.eval.num_samples, engine)
    finally:
        if engine is not None:
            engine.close()


def run_eval(target: str, overrides: list[str], limit: int | None) -> Path:
    """Evaluate a run directory's latest checkpoint (or `eval.checkpoint`) on its eval split."""
    target_path = Path(target)
    is_run = target_path.is_dir()
    if limit is not None:
        overrides = [*overrides, f"eval.limit={limit}"]
    cfg = load_config(target_path / "config.yaml" if is_run else target_path, overrides)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.model.device)
    dtype = model_dtype(cfg.model.dtype, device)
    checkpoint = cfg.eval.checkpoint or (RunDir(target_path).latest_checkpoint() if is_run else None)
    if is_run and checkpoint is None:
        raise ConfigError(f"{target_path}: run directory has no checkpoint to evaluate")
    if checkpoint is not None:
        # A vLLM engine is handed the weights that train (`trainable_state`), so keep them marked trainable.
        model, tokenizer = LatentModel.load(checkpoint, dtype, device, trainable=cfg.eval.engine == "vllm",
                                            cache_dir=cfg.model.cache_dir)
    else:
        model, tokenizer = LatentModel.from_config(cfg.model, cfg.latent, dtype, device)
    problems, _ = load_split(cfg.data, "test", cfg.eval.limit)
    out_dir = (target_path if is_run else Path(cfg.output.dir)) / "evals" / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"evaluating {checkpoint or cfg.model.name_or_path} on {len(problems)} problems")
    results = evaluate_with_engine(cfg, model, tokenizer, problems, out_dir / "samples.jsonl")
    results["checkpoint"] = str(checkpoint)
    atomic_write_json(out_dir / "metrics.json", results)
    print(metrics_table([results], GENERATION_COLUMNS))
    print(f"results: {out_dir}")
    return out_dir
