"""Does a checkpoint still use its latents for each problem? Phase 1's diagnostics on any checkpoints.

    python scripts/latent_use.py NAME=PATH [NAME=PATH ...] [--batches N] [--batch-size B] [--json OUT]

PATH is a run directory (its latest checkpoint) or a checkpoint directory (its run's config.yaml two levels
up). Each is measured as phase 1 measures itself (`rlatent.sft.diagnostics`): teacher-forced all-latent
examples of the run's eval split, the next-step loss with the real latents and its rise when they are
replaced by zeros, by noise of their norm, or by another problem's latents (the shuffle gain: the test of
problem-specific content), and the start/stop heads' F1 at the marks. A phase-2 run logs this once for its
final model (`eval_grpo`); the script puts a phase-2 run's start and end side by side, also for runs made
before that record existed, and with `--batches` on more examples than a run's `eval.gain_batches`.
The shuffle gain takes its donors within a batch, so compare runs at one `--batch-size`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlatent.config import load_config
from rlatent.data.splits import load_split, sft_examples
from rlatent.io.run_dir import RunDir, metrics_table
from rlatent.model.latent_model import LatentModel
from rlatent.model.loading import model_dtype, resolve_device
from rlatent.run.stages import seed_everything
from rlatent.sft.diagnostics import latent_diagnostics

COLUMNS = ["name", "checkpoint", "examples", "lm_loss", "next_step_loss", "latent_gain_zeros", "latent_gain_noise",
           "latent_gain_shuffle", "start_f1", "stop_f1"]


def locate(path: Path) -> tuple[Path, Path]:
    """(config.yaml, checkpoint) of a run directory or of one of its checkpoints."""
    if (path / "config.yaml").is_file():
        checkpoint = RunDir(path, create=False).latest_checkpoint()
        if checkpoint is None:
            raise SystemExit(f"{path}: run directory has no checkpoint")
        return path / "config.yaml", checkpoint
    config = path.parent.parent / "config.yaml"
    if not (path / "latent.json").is_file() or not config.is_file():
        raise SystemExit(f"{path}: neither a run directory (config.yaml) nor a checkpoint of one (latent.json, "
                         "../../config.yaml)")
    return config, path


def measure(path: Path, batches: int | None = None, batch_size: int | None = None) -> dict:
    """The diagnostics of `path`'s checkpoint on the first `batches` (default `eval.gain_batches`) batches of
    `batch_size` (default the run's `sft.batch_size`)."""
    config, checkpoint = locate(path)
    cfg = load_config(str(config), [f"sft.batch_size={batch_size}"] if batch_size else [])
    seed_everything(cfg.seed)
    device = resolve_device(cfg.model.device)
    model, tokenizer = LatentModel.load(checkpoint, model_dtype(cfg.model.dtype, device), device,
                                        cache_dir=cfg.model.cache_dir)
    problems = load_split(cfg.data, "test", cfg.eval.limit)[0]
    examples = sft_examples(problems, tokenizer, cfg.latent, cfg.data.max_length)[0]
    batches = batches or cfg.eval.gain_batches
    metrics = latent_diagnostics(model, examples, tokenizer.pad_token_id, cfg, str(checkpoint), batches)
    return {"checkpoint": str(checkpoint), "examples": min(len(examples), batches * cfg.sft.batch_size), **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("named", nargs="+", help="NAME=PATH: a run directory or a checkpoint")
    parser.add_argument("--batches", type=int, help="batches to measure (default: eval.gain_batches)")
    parser.add_argument("--batch-size", type=int,
                        help="examples a batch (default: the run's sft.batch_size); set it to compare runs whose "
                             "sft.batch_size differs, e.g. a phase-2 run given only grpo settings and its start")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = {}
    for item in args.named:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{item!r}: expected NAME=PATH")
        results[name] = measure(Path(path), args.batches, args.batch_size)
        print(f"{name}: shuffle gain {results[name].get('latent_gain_shuffle', float('nan')):+.4f} nats")
    rows = [{"name": name, **r, "checkpoint": Path(r["checkpoint"]).name} for name, r in results.items()]
    print(metrics_table(rows, COLUMNS))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
