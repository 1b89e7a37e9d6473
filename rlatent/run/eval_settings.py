"""Which settings `rlatent eval` applies, so that none it cannot apply passes in silence.

A trained checkpoint holds its model as trained (base, LoRA, heads, projection, latent mode and `k`: its
latent.json), and the evaluation reads only how to sample and on which problems. An override it cannot
apply (`latent.k=5`, `model.lora_r=8`, any `sft.*` or `grpo.*`) is refused, naming the keys: exit status 0
would say the evaluation ran with it. A run's config.yaml edited since the run started cannot be refused
(it is the run's, and may have been edited to evaluate otherwise), so each edit eval ignores is said, one
line each, and the evaluation goes on with the checkpoint's model.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from rlatent.config import RunConfig
from rlatent.config.loading import apply_override
from rlatent.errors import CheckpointError, ConfigError
from rlatent.io.run_dir import RunDir
from rlatent.run.resume import flatten, read_run_record, resumable

APPLIED = ("seed", "eval.*", "data.*", "model.device", "model.dtype", "model.cache_dir", "latent.start_threshold",
           "latent.stop_threshold", "latent.max_latents_per_block", "latent.max_blocks", "latent.max_total_latents")
"""What an evaluation of a trained checkpoint reads: the seed, the `eval` section, the held-out split's data
keys, where and in which dtype the model runs, and the sampler's latent budget (`SamplingSettings.from_config`)."""
NOT_READ = ("data.train_limit", "data.max_length")
"""Data keys of training alone: the evaluation reads neither."""
BUILT_FROM_CONFIG = ("model.*", "latent.*")
"""Without a checkpoint (`rlatent eval CONFIG`, no `eval.checkpoint`) the model is built from these sections."""


def applies(key: str, checkpoint: bool, run_dir: bool) -> bool:
    """Whether the evaluation reads `key`: of a trained `checkpoint` or of a model built from the config; the
    evaluation of a run directory writes under it, of a config under `output.dir`."""
    patterns = APPLIED + (() if checkpoint else BUILT_FROM_CONFIG) + (() if run_dir else ("output.dir",))
    return key not in NOT_READ and any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def refuse_inapplicable(overrides: list[str], checkpoint: Path | None, run_dir: bool) -> None:
    """Refuse the overrides the evaluation cannot apply, naming their keys (a section override by each key it
    sets)."""
    given: dict = {}
    for override in overrides:
        apply_override(given, override)
    refused = [key for key in flatten(given) if not applies(key, checkpoint is not None, run_dir)]
    if not refused:
        return
    reads = ", ".join(APPLIED + (() if run_dir else ("output.dir",)))
    what = (f"evaluating the trained checkpoint {checkpoint}: its model is the one trained, and eval reads only "
            f"{reads} (not {', '.join(NOT_READ)})") if checkpoint is not None else (
            "an evaluation: it reads no training settings")
    raise ConfigError(f"override{'s' if len(refused) > 1 else ''} {', '.join(refused)} cannot apply to {what}")


def ignored_edits(run: RunDir, cfg: RunConfig, checkpoint: Path) -> list[str]:
    """One line per key of the run's config.yaml edited since the run started (run.json records how it
    started) that the evaluation of `checkpoint` does not apply; keys that may change on resume are the
    run's own. A run without a readable record has nothing to compare with."""
    try:
        record = read_run_record(run)
    except CheckpointError:
        return []
    if not isinstance(record.get("config"), dict):
        return []
    before, now = flatten(record["config"]), flatten(cfg.model_dump(mode="json"))
    return [f"{run.config_path}: {key} ({before[key]!r} -> {now[key]!r}) ignored: eval evaluates {checkpoint} "
            "as trained" for key in sorted(before.keys() & now.keys())
            if before[key] != now[key] and not resumable(key) and not applies(key, True, True)]
