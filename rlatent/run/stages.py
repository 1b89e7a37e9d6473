"""The stages a user runs, top to bottom: `sft`, `grpo`, `train` (both phases) and `eval`.

Each stage builds its pieces from the config, runs, and leaves a run directory:
resolved config, metrics.jsonl, TensorBoard events, checkpoints, plots,
evaluation samples and report.md.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rewards.registry import RewardSet
from rlatent.io.atomic import atomic_write_json
from rlatent.config import RunConfig, load_config
from rlatent.errors import CheckpointError, ConfigError, DataError, RlatentError
from rlatent.run.eval_settings import ignored_edits, refuse_inapplicable
from rlatent.run.evaluate import evaluate_problems
from rlatent.model.latent_model import LatentModel
from rlatent.model.loading import model_dtype, resolve_device
from rlatent.io.run_dir import MetricsLogger, RunDir, metrics_table, read_metrics, writable_problem
from rlatent.run.report import GENERATION_COLUMNS, finish_run
from rlatent.run.resume import (RUN_FILE, check_config_drift, earlier_results, interrupt_checkpoint, is_finished,
                                mark_finished, open_run, read_run_record, records_to_keep, write_run_record)
from rlatent.latent.sampler import SamplingSettings
from rlatent.io.checkpoint import check_checkpoint_files, checkpoint_phase
from rlatent.distributed import make_backend
from rlatent.grpo.loop import GRPOTrainer
from rlatent.sft.curriculum import Curriculum, staged_examples
from rlatent.sft.diagnostics import held_out_examples, latent_diagnostics
from rlatent.sft.trainer import SFTTrainer
from rlatent.data.examples import encode_stop_sequences
from rlatent.data.splits import has_ood_split, load_split

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


PHASES = {"sft": ("sft",), "grpo": ("grpo",), "train": ("sft", "grpo")}


def run_path(cfg: RunConfig, config_path: str | None, suffix: str = "") -> Path:
    """Where a new run goes, refused when a run is already there or it cannot be written; nothing is made."""
    stem = Path(config_path).stem if config_path else "run"
    name = cfg.output.name or f"{stem}{suffix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.output.dir) / name
    if (path / "metrics.jsonl").exists():
        raise ConfigError(f"output.name: run directory {path} already holds a run; choose another name")
    problem = writable_problem(path)
    if problem:
        raise ConfigError(f"output.dir: cannot create the run directory {path} ({problem})")
    return path


def create_run_dir(path: Path, command: str, cfg: RunConfig) -> tuple[RunDir, dict]:
    """Make the run directory with its config.yaml and run.json; returns it and the record written."""
    try:
        run = RunDir(path)
        run.save_config(cfg.to_yaml())
        write_run_record(run, command, cfg)
    except OSError as exc:
        raise ConfigError(f"output.dir: cannot create the run directory {path} ({exc.strerror or exc})") from None
    return run, read_run_record(run)


def require_problems(data, split: str, problems: list, skipped: int) -> None:
    """An empty split stops the run before training, naming the file (not a crash in the last evaluation)."""
    if problems:
        return
    if data.source != "gsm8k":
        where = f"data.{data.source}"
    elif data.path is None:
        where = f"{data.hub_name}:{split}"
    else:
        where = str(Path(data.path) / f"{split}.jsonl" if Path(data.path).is_dir() else data.path)
    why = f" (all {skipped} malformed lines skipped)" if skipped else ""
    raise DataError(f"{where}: no problems in the {'eval' if split == 'test' else split} split{why}")


def run_phases(command: str, cfg: RunConfig | None, config_path: str | None, resume: str | None = None) -> RunDir:
    """Run `sft`, `grpo` or `train` (both) in one run directory; `resume` continues a killed run.

    Resuming reads the run's own config.yaml and its latest checkpoint: a phase-1
    checkpoint before its last step resumes phase 1; one at its last step starts
    phase 2 from it; a phase-2 checkpoint resumes phase 2. Optimizer, scheduler,
    RNG and step come from the checkpoint, and the data position follows from the
    step, so a resumed seeded run matches an uninterrupted one, metrics.jsonl
    included (`rlatent.run.resume`). A config.yaml edited since the start is
    refused (but for `RESUMABLE_KEYS`); a finished run is left as it is.
    Everything is checked (rewards, model, data) before a new run directory is
    made, and one that fails before training starts is removed again.
    """
    record: dict = {}
    latest, done = None, (None, 0)
    if resume is not None:
        run, cfg, record, command = open_resumed(resume, command)
    phases = PHASES[command]
    if "grpo" in phases:  # a misspelt reward fails now, not after phase 1
        RewardSet(cfg.grpo.rewards, cfg.grpo.reward_errors)
    if resume is not None:
        point = resume_point(run, cfg, record, phases)
        if point is None:
            return run
        latest, done = point
    else:
        path = run_path(cfg, config_path)
    seed_everything(cfg.seed)
    model, tokenizer = build_model(cfg, phases, latest)
    data = load_data(cfg)
    fresh = resume is None and not path.exists()
    if resume is None:
        run, record = create_run_dir(path, command, cfg)
    print(f"run directory: {run.path}" + (f" (resuming from {latest})" if latest else ""))
    training = Training(command, cfg, phases, run, model, tokenizer, data, latest, done)
    try:
        with MetricsLogger(run, records_to_keep(done, cfg) if resume is not None else None, cfg.output.report_to,
                           cfg.output.wandb_project, cfg.model_dump(mode="json")) as logger:
            training.open(logger)
            examples = training.phase1() if "sft" in phases else None
            if "grpo" in phases:
                training.phase2(examples)
    except BaseException:
        if fresh and not training.started:  # failed before training: leave no half-made run directory
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    finish_run(run, cfg, training.results)
    mark_finished(run, command, cfg, record)
    return run


def open_resumed(resume: str, command: str) -> tuple[RunDir, RunConfig, dict, str]:
    """The run directory `resume` names, its own config, its run record and the command it was started with."""
    run, cfg, record = open_run(resume)
    command = record.get("command", command)
    if command not in PHASES:
        raise CheckpointError(f"{run.path / RUN_FILE}: unknown command {command!r}")
    return run, cfg, record, command


def resume_point(run: RunDir, cfg: RunConfig, record: dict, phases: tuple[str, ...]
                 ) -> tuple[Path | None, tuple[str | None, int]] | None:
    """Where a resumed run goes on from: its latest checkpoint (tidied and checked) and the (phase, step) that
    holds, or None for a finished run (said so). Refuses a run directory it cannot write to or whose config
    drifted; says which resumable settings changed."""
    done = (None, 0)
    tidied = run.clean_interrupted_writes()
    if tidied:
        print(f"tidied what a kill left in {run.checkpoints_dir}: {'; '.join(tidied)}")
    latest = run.latest_checkpoint()
    if latest is not None:
        check_checkpoint_files(latest, training=True)
        done = checkpoint_phase(latest)
    if is_finished(record, phases, done, cfg):
        print(f"{run.path} is finished ({done[0]} step {done[1]}, {latest.name}); nothing to resume, "
              "nothing changed")
        return None
    problem = writable_problem(run.path)
    if problem:
        raise ConfigError(f"--resume {run.path}: cannot write to the run directory ({problem})")
    changed = check_config_drift(run, cfg, record, latest,
                                 built_from_config="sft" in phases or not cfg.grpo.init_checkpoint)
    if changed:
        print(f"resuming with changed settings: {', '.join(changed)}")
    return latest, done


def build_model(cfg: RunConfig, phases: tuple[str, ...], latest: Path | None):
    """The model and tokenizer: from the run's latest checkpoint, from `grpo.init_checkpoint` (a phase-2-only
    run), else from the config."""
    device = resolve_device(cfg.model.device)
    dtype = model_dtype(cfg.model.dtype, device)
    init = latest or (cfg.grpo.init_checkpoint if phases == ("grpo",) else None)
    if init is None:
        return LatentModel.from_config(cfg.model, cfg.latent, dtype, device)
    check_checkpoint_files(init)
    return LatentModel.load(init, dtype, device, trainable=True, cache_dir=cfg.model.cache_dir)


@dataclass
class RunData:
    """The problems a run trains and is tested on."""

    train: list
    skipped: int  # malformed lines of the train split
    evaluation: list  # the in-distribution held-out split (`eval.split`)
    held_out: dict[str, list]  # "test" (`evaluation`), and "ood" where the task has one


def load_data(cfg: RunConfig) -> RunData:
    """The train split and the held-out splits, each refused when empty. The in-distribution held-out split
    (`eval.split`: dev while choosing a recipe, test once it is fixed) is logged under the phase names "test"
    and "test_sft" whichever it is; config.yaml says which."""
    train, skipped = load_split(cfg.data, "train", cfg.data.train_limit)
    require_problems(cfg.data, "train", train, skipped)
    evaluation, eval_skipped = load_split(cfg.data, cfg.eval.split, cfg.eval.limit)
    require_problems(cfg.data, cfg.eval.split, evaluation, eval_skipped)
    held_out = {"test": evaluation}
    if has_ood_split(cfg.data):  # longer chains than trained: the out-of-distribution test
        held_out["ood"] = load_split(cfg.data, "ood", cfg.eval.limit)[0]
    return RunData(train, skipped, evaluation, held_out)


def phase1_examples(cfg: RunConfig, tokenizer, data: RunData):
    """Phase 1's examples: the curriculum's stages of the train split (with teachers or chains where
    `sft.distill` or `sft.compress` is on) and the eval split's; refused when every problem is too long."""
    compress = cfg.sft.compress
    staged = staged_examples(data.train, tokenizer, cfg.latent, cfg.data.max_length, Curriculum.from_config(cfg.sft),
                             teachers=cfg.sft.distill.weight > 0,
                             split_steps=cfg.sft.distill.split_steps or compress.split_steps,
                             chains=compress.weight > 0 or compress.decoder_weight > 0,
                             tokens_per_latent=compress.tokens_per_latent, random_factor=compress.random_factor)
    evaluation = held_out_examples(data.evaluation, tokenizer, cfg)
    for split, examples, problems in (("train", staged.stages, data.train), ("eval", evaluation, data.evaluation)):
        if not all(examples):
            raise DataError(f"{split} split: all {len(problems)} problems are longer than data.max_length "
                            f"{cfg.data.max_length} tokens (latents included)")
    return staged, evaluation


@dataclass
class Training:
    """The phases of one run, each trained then evaluated, once model, data and run directory are there.
    `started`: whether training has begun (a new run that fails before is removed); `results`: the
    evaluations for the report, keyed by phase."""

    command: str
    cfg: RunConfig
    phases: tuple[str, ...]
    run: RunDir
    model: LatentModel
    tokenizer: object
    data: RunData
    latest: Path | None  # the checkpoint a resumed run goes on from
    done: tuple[str | None, int]  # its (phase, step)
    logger: MetricsLogger | None = None
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    started: bool = False

    def open(self, logger: MetricsLogger) -> None:
        """Log to `logger`; a run resumed in phase 2 takes up phase 1's results from metrics.jsonl."""
        self.logger = logger
        if logger.dropped:
            print(f"metrics.jsonl: dropped {logger.dropped} records logged after "
                  f"{self.latest.name if self.latest else 'the start'}; the resumed run logs them again")
        if self.done[0] == "grpo":
            self.results.update(earlier_results(read_metrics(self.run.metrics_path)))

    def phase1(self) -> list:
        """Phase 1 and the held-out tests after it; a run resumed in phase 2 only builds its trainer again.
        Returns phase 1's eval examples (the latent diagnostics after phase 2 take the same)."""
        cfg, logger, data = self.cfg, self.logger, self.data
        staged, evaluation = phase1_examples(cfg, self.tokenizer, data)
        train = staged.stages
        if self.latest is None:
            logger.log(0, {"train_examples": len(train[-1]), "dropped_too_long": staged.dropped,
                           "skipped_rows": data.skipped, "eval_problems": len(data.evaluation),
                           "trainable_parameters": sum(p.numel() for p in self.model.trainable_parameters())},
                       phase="data")
        trainer = SFTTrainer(cfg, self.model, self.tokenizer, train[-1], evaluation[-1], self.run, logger,
                             list(zip(train[:-1], evaluation[:-1])), staged.teachers)
        if self.done[0] == "sft":
            trainer.resume(self.latest)
        if self.done[0] != "grpo":
            self.started = True
            checkpoint = train_phase(trainer, "sft", cfg, logger, self.command)
            print(f"phase 1 checkpoint: {checkpoint}")
            two = "grpo" in self.phases
            self.results.update(evaluate_trained(checkpoint, self.run, self.command, lambda: test_after(
                "sft", cfg, self.model, self.tokenizer, data.held_out, self.run, logger, trainer.step,
                "test_sft" if two else "test", "eval_samples_sft" if two else "eval_samples")))
        return evaluation[-1]

    def phase2(self, examples: list | None) -> None:
        """Phase 2, then phase 1's latent diagnostics (on `examples`, phase 1's eval examples in a `train` run)
        and the held-out tests on its final model."""
        cfg, model, tokenizer, logger = self.cfg, self.model, self.tokenizer, self.logger
        offset = cfg.sft.steps if "sft" in self.phases else 0  # phase 2's checkpoints go on from phase 1's
        trainer = GRPOTrainer(cfg, model, tokenizer, self.data.train, self.run, logger,
                              make_backend(cfg, model, tokenizer), checkpoint_offset=offset)
        if self.done[0] == "grpo":
            trainer.resume(self.latest)
        self.started = True
        checkpoint = train_phase(trainer, "grpo", cfg, logger, self.command)
        print(f"phase 2 checkpoint: {checkpoint}")
        self.results.update(evaluate_trained(checkpoint, self.run, self.command, lambda: diagnose_and_test_after_grpo(
            cfg, model, tokenizer, self.data.held_out, self.run, logger, trainer.step, examples)))


def train_phase(trainer, phase: str, cfg: RunConfig, logger: MetricsLogger, command: str) -> Path:
    """`trainer.train()`; on Ctrl-C (or a reward's KeyboardInterrupt) first a checkpoint of the last completed
    step where the state is exactly that step's (`interrupt_checkpoint`), then the interrupt, with a line
    saying where training stands and how to continue."""
    optimizer = trainer.optimizer if phase == "sft" else getattr(getattr(trainer.backend, "learner", None),
                                                                 "optimizer", None)
    start = (trainer.step, getattr(optimizer, "updates", 0))
    try:
        return trainer.train()
    except KeyboardInterrupt:
        step, run = trainer.step, trainer.run
        if phase == "sft":
            expected = [("train", step)] if step % cfg.sft.log_every == 0 else []
            if step % cfg.sft.eval_every == 0 and step < cfg.sft.steps:
                expected.append(("eval", step))
            path, per_step = run.checkpoint_path(step), 1
        else:
            expected = [("grpo", step)] if step % cfg.grpo.log_every == 0 else []
            path, per_step = run.checkpoint_path(trainer.checkpoint_offset + step), cfg.grpo.num_iterations
        saved = interrupt_checkpoint(trainer, optimizer, start, per_step, expected, logger.last_step, path)
        latest = saved or run.latest_checkpoint()
        where = f"checkpoint {latest}" if latest else "no checkpoint yet"
        raise KeyboardInterrupt(f"interrupted in {phase} after step {step}; {where}; continue with "
                                f"`rlatent {command} --resume {run.path}`") from None


def evaluate_trained(checkpoint: Path, run: RunDir, command: str, evaluate) -> dict[str, dict[str, float]]:
    """The evaluation after a phase, whose failure says the training is saved and how to evaluate it."""
    try:
        return evaluate()
    except RlatentError as exc:
        raise type(exc)(f"{exc}; the training is saved in {checkpoint} (resume with `rlatent {command} "
                        f"--resume {run.path}` to evaluate it again)") from None


def diagnose_and_test_after_grpo(cfg: RunConfig, model, tokenizer, held_out: dict[str, list], run: RunDir,
                                 logger: MetricsLogger, step: int, examples: list | None = None
                                 ) -> dict[str, dict[str, float]]:
    """Phase 1's latent diagnostics on phase 2's final model (logged as `eval_grpo`), so the run says whether
    the latents still carry each problem's computation, then the held-out tests. `examples`: phase 1's
    all-latent eval examples in a `train` run (the same ones its diagnostics used); a phase-2-only run
    builds them from the eval split as phase 1 does (`held_out_examples`). The batches are the run's
    `sft.batch_size` (the shuffle gain draws its donors within a batch): a phase-2-only run compares with its
    start's phase 1 when it keeps that run's `sft.batch_size` (`rlatent diagnose --batch-size`)."""
    if examples is None:
        examples = held_out_examples(held_out["test"], tokenizer, cfg)[-1]
    if examples:
        logger.log(step, latent_diagnostics(model, examples, tokenizer.pad_token_id, cfg, "after phase 2"),
                   phase="eval_grpo")
    return test_after("grpo", cfg, model, tokenizer, held_out, run, logger, step, "test", "eval_samples")


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


def run_eval(target: str, overrides: list[str], limit: int | None, split: str = "test") -> Path:
    """Evaluate a run directory's latest checkpoint (or `eval.checkpoint`) on `split`: `dev` (for choosing a
    recipe), `test` (once per final recipe) or the out-of-distribution one (`ood`, the seeded tasks)."""
    target_path = Path(target)
    is_run = target_path.is_dir()
    if not target_path.exists() and target_path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{target}: no such run directory")
    if is_run and not (target_path / "config.yaml").is_file():
        raise ConfigError(f"{target}: not a run directory (config.yaml missing)")
    if limit is not None:
        overrides = [*overrides, f"eval.limit={limit}"]
    cfg = load_config(target_path / "config.yaml" if is_run else target_path, overrides)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.model.device)
    dtype = model_dtype(cfg.model.dtype, device)
    run = RunDir(target_path, create=False) if is_run else None
    checkpoint = cfg.eval.checkpoint or (run.latest_checkpoint() if is_run else None)
    if is_run and checkpoint is None:
        raise ConfigError(f"{target_path}: run directory has no checkpoint to evaluate")
    refuse_inapplicable(overrides, checkpoint, is_run)
    for line in ignored_edits(run, cfg, checkpoint) if is_run else ():
        print(line)
    out_dir = (target_path if is_run else Path(cfg.output.dir)) / "evals" / time.strftime("%Y%m%d-%H%M%S")
    problem = writable_problem(out_dir)
    if problem:
        raise ConfigError(f"{out_dir}: cannot write the evaluation ({problem})")
    if checkpoint is not None:
        check_checkpoint_files(checkpoint)  # a LoRA checkpoint without its adapter would load as the base model
        # A vLLM engine is handed the weights that train (`trainable_state`), so keep them marked trainable.
        model, tokenizer = LatentModel.load(checkpoint, dtype, device, trainable=cfg.eval.engine == "vllm",
                                            cache_dir=cfg.model.cache_dir)
    else:
        model, tokenizer = LatentModel.from_config(cfg.model, cfg.latent, dtype, device)
    if split == "ood" and not has_ood_split(cfg.data):
        raise ConfigError(f"data.source {cfg.data.source} has no out-of-distribution split")
    problems, skipped = load_split(cfg.data, split, cfg.eval.limit)
    require_problems(cfg.data, split, problems, skipped)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out_dir}: cannot write the evaluation ({exc.strerror or exc})") from None
    print(f"evaluating {checkpoint or cfg.model.name_or_path} on {len(problems)} {split} problems")
    results = evaluate_with_engine(cfg, model, tokenizer, problems, out_dir / "samples.jsonl")
    results.update(checkpoint=str(checkpoint), split=split)
    atomic_write_json(out_dir / "metrics.json", results)
    print(metrics_table([results], GENERATION_COLUMNS))
    print(f"results: {out_dir}")
    return out_dir
