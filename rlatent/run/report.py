"""What a finished run leaves for people: the plots and report.md, rebuilt from metrics.jsonl.

The report states the latent-use verdict as a sentence with the three latent
gains and what they mean, because that is the question every run answers.
"""

from __future__ import annotations

from rlatent.config import RunConfig
from rlatent.io.plots import plot_run
from rlatent.io.run_dir import RunDir, metrics_table, read_metrics, write_report

GENERATION_COLUMNS = ["accuracy", "latents_per_answer", "blocks_per_answer", "tokens_per_answer",
                      "forward_passes_per_answer", "truncated", "wall_seconds", "problems"]
GRPO_COLUMNS = ["step", "reward_mean", "accuracy", "answer_top_share", "latents_per_completion",
                "blocks_per_completion", "tokens_per_completion", "start_rate", "stop_rate", "clip_fraction", "kl",
                "entropy"]
DIAGNOSTIC_COLUMNS = ["step", "lm_loss", "start_f1", "stop_f1", "next_step_loss", "latent_gain_zeros",
                      "latent_gain_noise", "latent_gain_shuffle", "latent_norm", "embedding_norm"]


# The diagnostics records (`rlatent.sft.diagnostics`): phase 1's periodic ones and phase 2's final one.
DIAGNOSED_AFTER = {"eval": "phase 1", "eval_grpo": "phase 2"}

GAIN_MEANING = {
    "zeros": "latents replaced by zeros",
    "noise": "latents replaced by noise of the same norm",
    "shuffle": "each row given another row's latents",
}


def latent_use_verdict(diagnostic: dict, warn_below: float) -> str:
    """One sentence on whether the model uses its latents, from one diagnostics record."""
    gains = {how: diagnostic.get(f"latent_gain_{how}") for how in GAIN_MEANING}
    gains = {how: g for how, g in gains.items() if g is not None}
    if not gains:
        return "No latent gain was measured: this mode has no latents, or no evaluation ran."
    listed = "; ".join(f"{GAIN_MEANING[how]}: {g:+.4f} nats" for how, g in gains.items())
    if max(gains.values()) < warn_below:
        return (f"**The model ignores its latents.** Replacing them changes the next-step loss by less than "
                f"{warn_below} nats ({listed}), so they carry nothing the model relies on.")
    shuffle = gains.get("shuffle")
    if shuffle is not None and shuffle < warn_below:
        return (f"The model uses its latents, but not for this problem's information: the next-step loss rises "
                f"when they are removed, yet another row's latents serve as well ({listed}). They act as "
                "extra compute or a learned signal, not as problem-specific computation.")
    return (f"The model uses its latents for this problem's computation: the next-step loss rises when they are "
            f"replaced ({listed}); the shuffle gain is the sharpest test, since another problem's latents have "
            "the same statistics but the wrong content.")


def latent_use_section(diagnostics: list[dict], warn_below: float) -> str:
    """The verdict after each phase that logged diagnostics: phase 1's last, and phase 2's final model."""
    last = {DIAGNOSED_AFTER[r["phase"]]: r for r in diagnostics}
    if not last:
        return latent_use_verdict({}, warn_below)
    return "\n\n".join(f"After {phase}: {latent_use_verdict(record, warn_below)}" for phase, record in last.items())


def finish_run(run: RunDir, cfg: RunConfig, results: dict[str, dict[str, float]]) -> None:
    """Plots and report.md from what the run logged."""
    records = read_metrics(run.metrics_path)
    plot_run(records, run.plots_dir)
    diagnostics = [r for r in records if r["phase"] in DIAGNOSED_AFTER]
    rounds = cfg.grpo.dynamic_sampling_rounds
    dynamic_sampling = f" (dynamic sampling, up to {rounds} rounds)" if rounds > 1 else ""
    sections = {
        "Run": (f"- model: `{cfg.model.name_or_path}` (LoRA r={cfg.model.lora_r})\n"
                f"- latent: mode `{cfg.latent.mode}`, trunk `{cfg.latent.trunk}`, proj `{cfg.latent.proj}`, "
                f"k={cfg.latent.k}, placement `{cfg.latent.placement}`, gradient `{cfg.latent.gradient}`\n"
                f"- data: `{cfg.data.source}`; sft: {cfg.sft.steps} steps x {cfg.sft.batch_size} x {cfg.sft.grad_accum}; "
                f"grpo: {cfg.grpo.steps} steps x {cfg.grpo.prompts_per_step} prompts x {cfg.grpo.group_size}"
                f"{dynamic_sampling}, "
                f"loss `{cfg.grpo.loss_type}`, rewards {[r.function for r in cfg.grpo.rewards]}"),
        "Phase 2 (last logged step)": grpo_summary(run),
        "Diagnostics (held-out written chains, teacher-forced)": (
            metrics_table([{"after": DIAGNOSED_AFTER[r["phase"]], **r} for r in diagnostics],
                          ["after"] + DIAGNOSTIC_COLUMNS) if diagnostics else "none logged"),
        "Latent use": latent_use_section(diagnostics, cfg.eval.gain_warn_below),
        "Evaluation (sampled answers)": metrics_table([{"after": phase, **r} for phase, r in results.items()],
                                                      ["after"] + GENERATION_COLUMNS),
        "Files": ("`config.yaml`, `metrics.jsonl`, `tensorboard/`, `checkpoints/`, `plots/`, "
                  "`samples/eval_samples.jsonl` (after phase 1 of a two-phase run: `eval_samples_sft.jsonl`; latents shown as nearest tokens)"),
    }
    report = write_report(run, f"rlatent run {run.path.name}", sections)
    print(f"report: {report}")


def grpo_summary(run: RunDir) -> str:
    steps = [r for r in read_metrics(run.metrics_path) if r["phase"] == "grpo"]
    if not steps:
        return "no phase 2 in this run"
    return metrics_table([steps[0], steps[-1]], GRPO_COLUMNS)
