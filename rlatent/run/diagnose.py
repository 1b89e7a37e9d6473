"""`rlatent diagnose RUN...`: what a trained run does with its latents, section by section.

Accuracy says whether a run answers; these say how. Each RUN is a run directory (its latest checkpoint) or
one of its checkpoints; its config.yaml regenerates the held-out problems (`key=value` overrides apply on
top, for a config a newer check refuses). The sections (`--only` picks some):

- `gains`: phase 1's latent-use diagnostics (`rlatent.sft.diagnostics`) on the checkpoint, as the run
  measured itself: the next-step loss and its rise when the latents are replaced by zeros, noise or another
  problem's latents (the shuffle gain: problem-specific content), start/stop F1, latent norms. A phase-2
  run logs them once for its final model; this measures any checkpoint, also on more batches (`--batches`).
  The shuffle gain takes its donors within a batch, so compare runs at one `--batch-size`.
- `tokens`: the latents of the evaluation samples read as their nearest tokens (`rlatent.run.latent_text`).
- `text`: whether the first block writes its step's operands and partial results (`rlatent.run.latent_text`).
- `steps`: how often each step's written result is right (`rlatent.run.step_accuracy`); with several runs,
  each pair tested step by step, pooled over seeds for runs named `<row>-seed<s>`.
- `slots`: what each aligned slot of a block reads as (`rlatent.run.slot_readout`).

`tokens`, `text` and `steps` read the run's final evaluation samples (`samples/eval_samples.jsonl` and
`_ood`, or `--samples` from `rlatent eval`), which hold `eval.num_samples` answers: evaluate with
`eval.num_samples >= eval.limit` to count every problem. The tables are printed; the JSON goes to each
run's `diagnose.json` (`diagnose-step_N.json` for a checkpoint), or, with `--json`, every run and the pairs
between them to one file.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlatent.config import RunConfig, load_config
from rlatent.data.gsm8k import Problem
from rlatent.data.marks import parse_marks
from rlatent.data.splits import has_ood_split, load_split
from rlatent.errors import ConfigError, DataError
from rlatent.io.atomic import atomic_write_json
from rlatent.io.run_dir import metrics_table
from rlatent.run import latent_text, slot_readout, step_accuracy
from rlatent.run.api import LatentPolicy, load, locate
from rlatent.run.stages import seed_everything
from rlatent.sft.diagnostics import held_out_examples, latent_diagnostics

SECTIONS = ("gains", "tokens", "text", "steps", "slots")
MODEL_SECTIONS = {"gains", "slots"}  # the rest read samples files
GAIN_COLUMNS = ["run", "checkpoint", "examples", "lm_loss", "next_step_loss", "latent_gain_zeros",
                "latent_gain_noise", "latent_gain_shuffle", "start_f1", "stop_f1", "latent_norm"]


def sections_of(only: str | None) -> list[str]:
    """The sections `--only a,b` names, in `SECTIONS` order (all without it)."""
    if only is None:
        return list(SECTIONS)
    named = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in named if name not in SECTIONS]
    if unknown or not named:
        raise ConfigError(f"--only {only}: sections are {', '.join(SECTIONS)} (comma-separated)")
    return [name for name in SECTIONS if name in named]


def latent_use(policy: LatentPolicy, batches: int | None = None) -> dict:
    """The `gains` section: phase 1's diagnostics of the policy's model on the first `batches` (default
    `eval.gain_batches`) batches of `sft.batch_size` all-latent examples of the eval split (`eval.split`)."""
    model, tokenizer, cfg = policy.model, policy.tokenizer, policy.cfg
    problems = load_split(cfg.data, cfg.eval.split, cfg.eval.limit)[0]
    examples = held_out_examples(problems, tokenizer, cfg)[-1]
    batches = batches or cfg.eval.gain_batches
    metrics = latent_diagnostics(model, examples, tokenizer.pad_token_id, cfg, "diagnose", batches)
    return {"examples": min(len(examples), batches * cfg.sft.batch_size), **metrics}


def read_samples(path: Path, cfg: RunConfig, split: str) -> list[tuple[Problem, dict]]:
    """The samples of `path`, each with its problem of `split` (regenerated from `cfg`)."""
    problems = {p.source: p for p in load_split(cfg.data, split)[0]}
    answered = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not a JSON line ({error.msg})") from None
        if not isinstance(sample, dict) or not {"source", "completion"} <= sample.keys():
            raise DataError(f"{path}:{number}: a sample needs 'source' and 'completion'")
        if sample["source"] not in problems:
            raise DataError(f"{path}: problem {sample['source']!r} is not in the {split} split that its config "
                            "generates (samples from another configuration?)")
        answered.append((problems[sample["source"]], sample))
    return answered


def samples_files(run_dir: Path, cfg: RunConfig, samples: str | None, split: str | None) -> dict[str, Path]:
    """Split -> the samples file to read: `samples` (of `split`, default `eval.split`), else the run's final
    evaluation of `split`, or of each split it has one of (`eval.split` and `ood`)."""
    if split == "ood" and not has_ood_split(cfg.data):
        raise ConfigError(f"data.source {cfg.data.source} has no out-of-distribution split")
    if samples is not None:
        if not Path(samples).is_file():
            raise DataError(f"--samples {samples}: no such file")
        return {split or cfg.eval.split: Path(samples)}
    files = {cfg.eval.split: run_dir / "samples" / "eval_samples.jsonl",
             "ood": run_dir / "samples" / "eval_samples_ood.jsonl"}
    if split is not None:
        if split not in files or not files[split].is_file():
            raise DataError(f"{run_dir}: the run holds no samples of the {split} split (evaluate it with "
                            f"`rlatent eval {run_dir} --split {split}`, then give its samples.jsonl as --samples)")
        return {split: files[split]}
    return {name: path for name, path in files.items() if path.is_file()}


def diagnose(target: str, overrides: list[str], sections: list[str], samples: str | None = None,
             split: str | None = None, batches: int | None = None) -> tuple[dict, dict[str, dict]]:
    """One run's report, section by section, and its per-problem step outcomes per split (for the pairs)."""
    checkpoint, config = locate(target)
    if config is None:
        raise ConfigError(f"{target}: no config.yaml of its run (../../config.yaml) to regenerate the problems")
    cfg = load_config(config, overrides)
    report: dict = {"run": target, "checkpoint": str(checkpoint) if checkpoint else None}
    if MODEL_SECTIONS & set(sections):
        policy = load(target, overrides=overrides)
        seed_everything(cfg.seed)
        if "gains" in sections:
            report["gains"] = latent_use(policy, batches)
        if "slots" in sections:
            problems = load_split(cfg.data, cfg.eval.split, cfg.eval.limit)[0]
            report["slots"] = None if not policy.model.latent_mode.has_slots else slot_readout.readout(
                policy.model, policy.tokenizer, cfg, problems, cfg.eval.batch_size)
    outcomes = {}
    if {"tokens", "text", "steps"} & set(sections):
        files = samples_files(config.parent, cfg, samples, split)
        report["samples"] = {name: str(path) for name, path in files.items()}
        for name, path in files.items():
            answered = read_samples(path, cfg, name)
            if "tokens" in sections:
                report.setdefault("tokens", {})[name] = latent_text.latent_tokens([s for _, s in answered])
            if "text" in sections:
                report.setdefault("text", {})[name] = latent_text.block_counts(answered)
            if "steps" in sections:
                rows = [(p.source, parse_marks(p.answer), s["completion"]) for p, s in answered]
                report.setdefault("steps", {})[name], outcomes[name] = step_accuracy.step_report(rows)
    return report, outcomes


def render(report: dict) -> str:
    """The printed tables of one run's report, but its gains (one table over every run)."""
    run, parts = report["run"], []
    if report.get("samples") == {}:
        parts.append(f"## {run}: no evaluation samples (samples/eval_samples.jsonl) for tokens, text and steps")
    for split, path in report.get("samples", {}).items():
        parts.append(f"## {run}: samples of {split}: {path}")
        if "tokens" in report:
            parts.append("### nearest tokens of the latents\n" + latent_text.render_tokens(report["tokens"][split]))
        if "text" in report:
            parts.append("### what the first blocks write\n" + latent_text.render_counts(report["text"][split]))
        if "steps" in report:
            steps = report["steps"][split]
            parts.append("### accuracy per step\n" + "\n".join(
                step_accuracy.render(Path(run), split, steps["steps"])
                + [""] + step_accuracy.render(Path(run), split, steps["by_operation"])))
            if any(row["written"] for row in steps["expressions"]):
                parts.append("\n".join(step_accuracy.render_expressions(Path(run), split, steps["expressions"])))
    if "slots" in report:
        parts.append(f"## {run}: slot readout\n" + ("no latent slots (latent.mode none)" if report["slots"] is None
                                                    else slot_readout.render(report["slots"])))
    return "\n\n".join(parts)


def report_path(report: dict) -> Path:
    """Where a run's own report goes: `RUN/diagnose.json`, or `RUN/diagnose-step_N.json` for a checkpoint."""
    target = Path(report["run"])
    if (target / "config.yaml").is_file():
        return target / "diagnose.json"
    return target.parent.parent / f"diagnose-{target.name}.json"


def diagnose_command(targets: list[str], overrides: list[str], only: str | None = None,
                     samples: str | None = None, split: str | None = None, batches: int | None = None,
                     batch_size: int | None = None, json_path: str | None = None) -> int:
    """Diagnose every target, print the tables, write the JSON (see the module's docstring). The words of
    `targets` that hold a `=` are overrides: argparse cannot tell them from the runs before it."""
    overrides = [word for word in targets if "=" in word] + overrides
    targets = [word for word in targets if "=" not in word]
    if not targets:
        raise ConfigError("rlatent diagnose: give a RUN (a run directory or a checkpoint)")
    sections = sections_of(only)
    if samples is not None and len(targets) > 1:
        raise ConfigError("--samples names one run's samples file; give one RUN")
    if batch_size is not None:  # the gains' batches (the shuffle gain's donors are a batch's other rows)
        overrides = [*overrides, f"sft.batch_size={batch_size}"]
    reports, outcomes = {}, {}
    for target in targets:
        reports[target], found = diagnose(target, overrides, sections, samples, split, batches)
        for name, per_problem in found.items():
            outcomes.setdefault(name, {})[target] = per_problem
    gains = [{"run": run, "checkpoint": Path(report["checkpoint"]).name, **report["gains"]}
             for run, report in reports.items() if "gains" in report]
    if gains:
        print("## latent use (gains in nats)\n" + metrics_table(gains, GAIN_COLUMNS))
    for report in reports.values():
        print(render(report) + "\n")
    paired = step_accuracy.paired_runs(outcomes)
    pooled = step_accuracy.pooled_pairs(paired)
    if paired:
        print("## steps, runs paired\n" + step_accuracy.render_pairs(paired))
    if pooled:
        print("\n## steps, pooled over seeds (rows `<row>-seed<s>`, the seeds both rows have)\n"
              + step_accuracy.render_pairs(pooled, True))
    if json_path is not None:
        atomic_write_json(json_path, {"runs": reports, "paired_steps": paired, "pooled_steps": pooled})
        print(f"diagnostics: {json_path}")
    else:
        for report in reports.values():
            atomic_write_json(report_path(report), report)
            print(f"diagnostics: {report_path(report)}")
    return 0
