"""`rlatent` command line: `sft`, `grpo`, `train`, `eval`, `ablate`, `compare`, `diagnose`, `config`,
`tiny-model`.

Every user error ends as one line on stderr, `rlatent: error: <what> (<where>)`, and
exit status 2 (`user_error` is the one place that decides what counts as one);
what a run already wrote (checkpoints, metrics) stays on disk. A bug keeps its
traceback. Ctrl-C exits with 130 after a checkpoint where one can be written.
"""

from __future__ import annotations

import argparse
import errno
import sys

import torch

from rlatent.errors import ConfigError, RlatentError

EPILOG = """examples:
  rlatent sft configs/quickstart.yaml
  rlatent sft configs/gsm8k_smollm2.yaml data.path=../shared/data/gsm8k sft.steps=50
  rlatent sft configs/quickstart.yaml latent.mode=none          # text-only baseline
  rlatent train configs/quickstart.yaml                          # phase 1 then phase 2 (GRPO)
  rlatent grpo configs/gsm8k_smollm2.yaml grpo.init_checkpoint=runs/x/checkpoints/step_000200
  rlatent train --resume runs/quickstart-20261122-120000        # continue a killed run
  rlatent eval runs/quickstart-20261122-120000 --limit 50
  rlatent eval runs/quickstart-20261122-120000 latent.start_threshold=0.8   # fewer latents
  rlatent ablate configs/quickstart.yaml --grid latent.mode=latent,pause --seeds 3 --command sft
  rlatent compare --a runs/pause-seed0 runs/pause-seed1 --b runs/latent-seed0 runs/latent-seed1
  rlatent diagnose runs/quickstart-20261122-120000 --only gains,steps   # how the latents are used
overrides are key.sub=value (value parsed as YAML); unknown keys are errors."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlatent", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune language models that reason with interleaved latent thoughts.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("sft", "phase 1: supervised warm start at calculator marks, then evaluate"),
                       ("grpo", "phase 2: GRPO with verifiable rewards (from grpo.init_checkpoint or the base)"),
                       ("train", "phase 1 then phase 2 in one run directory, evaluating after each")):
        stage = commands.add_parser(name, help=text)
        stage.add_argument("config", nargs="?", help="YAML config (see configs/)")
        stage.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        stage.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    ev = commands.add_parser("eval", help="sample answers and report accuracy, latents and tokens per answer")
    ev.add_argument("target", help="a run directory (evaluates its latest checkpoint) or a YAML config")
    ev.add_argument("overrides", nargs="*", help="key.sub=value overrides (e.g. latent.start_threshold=0.8)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N problems of the eval split")
    ev.add_argument("--split", choices=("dev", "test", "ood"), default="test",
                    help="dev (for choosing a recipe), test (once per final recipe) or, for the seeded tasks, "
                         "the out-of-distribution split (ood)")
    ab = commands.add_parser("ablate", help="run a grid of overrides x seeds (one run per cell) and tabulate "
                             "accuracy with 95%% intervals and paired McNemar tests")  # %% : argparse formats help
    ab.add_argument("config", nargs="?", help="YAML config (see configs/)")
    ab.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every cell")
    ab.add_argument("--point", action="append", nargs="+", default=[], metavar=("NAME", "KEY=VALUE"),
                    help="a named row setting several keys at once (repeat for more; overrides for every cell go "
                         "before the options)")
    ab.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="one grid dimension (repeat for more); cells are the product of the points, the grid "
                         "dimensions and the seeds")
    ab.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds per grid point: seed, seed+1, ...")
    ab.add_argument("--command", dest="ablate_command", choices=("sft", "train"), default="train",
                    help="what each cell runs (default train: both phases)")
    ab.add_argument("--phase2", action="append", default=[], metavar="NAME",
                    help="with --command sft: the cells of this point (or grid KEY=VALUE) go on into phase 2")
    ab.add_argument("--jobs", type=int, default=1, metavar="N", help="cells at once, each in its own process")
    ab.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                    help="stop a cell after this long (its own process); the next run resumes it")
    ab.add_argument("--name", help="ablation directory under output.dir (default: CONFIG stem + -ablation)")
    ab.add_argument("--report", metavar="DIR", help="only rebuild DIR/ablation.md and .png from ablation.json")
    cp = commands.add_parser("compare", help="paired accuracy difference of evaluations on the same problems "
                             "(run directories or samples files), per seed and pooled with a 95%% interval")
    cp.add_argument("sources", nargs="*", metavar="[NAME=]RUN_OR_SAMPLES", help="evaluations; every pair is compared")
    cp.add_argument("--a", nargs="+", default=[], metavar="RUN", help="side A, one evaluation per seed")
    cp.add_argument("--b", nargs="+", default=[], metavar="RUN", help="side B, in the seed order of --a")
    cp.add_argument("--phase", choices=("final", "sft"), default="final",
                    help="a run's final evaluation, or its phase-1 one (sft) of `rlatent train`")
    cp.add_argument("--ood", action="store_true", help="a run's out-of-distribution evaluation")
    cp.add_argument("--json", metavar="PATH", help="also write every number here")
    dg = commands.add_parser("diagnose", help="how a trained run uses its latents: gains, nearest tokens, what "
                             "blocks write, accuracy per step, slot readout (tables and a JSON)")
    dg.add_argument("runs", nargs="+", metavar="RUN", help="run directories or checkpoints (several: steps paired)")
    dg.add_argument("overrides", nargs="*", help="key.sub=value overrides of the runs' configs")
    dg.add_argument("--only", metavar="SECTIONS", help="comma-separated: gains,tokens,text,steps,slots (default all)")
    dg.add_argument("--split", choices=("dev", "test", "ood"),
                    help="the samples of this split only (default: each the run evaluated, eval.split and ood)")
    dg.add_argument("--samples", metavar="PATH", help="read this samples file (of --split) instead of the run's")
    dg.add_argument("--batches", type=int, help="gains: batches to measure (default eval.gain_batches)")
    dg.add_argument("--batch-size", type=int, help="gains: examples a batch (default sft.batch_size); one size "
                    "for runs compared, the shuffle gain's donors are a batch's other rows")
    dg.add_argument("--json", metavar="PATH", help="every run and the pairs between them here, instead of each "
                    "run's own diagnose.json")
    commands.add_parser("config", help="print every config key with its default and meaning (markdown)")
    tiny = commands.add_parser("tiny-model", help="write a tiny random model + tokenizer directory (tests, demos)")
    tiny.add_argument("path")
    tiny.add_argument("--architecture", default="qwen2", choices=["qwen2", "llama"])
    return parser


def quiet_libraries() -> None:
    """Keep stderr for rlatent's own progress and errors: no per-load progress bars or library deprecations."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Overrides may stand anywhere on the line (`rlatent eval RUN --limit 2 eval.max_new_tokens=8`):
    argparse fills the positional `overrides` from the first run of positionals only, so `key=value`
    words after an option come back unrecognised; they are appended in the order given."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        unknown = [word for word in extras if word.startswith("-") or not hasattr(args, "overrides")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *extras]
    return args


def user_error(error: BaseException) -> str | None:
    """The one line for an exception caused by the user's input or the machine (`<what> (<where>)`), or
    None for anything else: a bug keeps its traceback. Most such errors are caught where they happen and
    named precisely (file and line, config key); this is the net for what gets past."""
    from safetensors import SafetensorError

    from rlatent.errors import first_line

    if isinstance(error, RlatentError):
        return str(error)
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return (f"out of memory on the device ({first_line(error)[:120]}); lower sft.batch_size, eval.batch_size "
                "or data.max_length; checkpoints written so far are kept")
    if isinstance(error, OSError):  # permissions, a full disk, a read-only filesystem, a path that is a file
        paths = [str(name) for name in (error.filename, error.filename2) if name is not None]
        what = "no space left on device" if error.errno == errno.ENOSPC else (error.strerror or first_line(error))
        kept = "; checkpoints and metrics written so far are kept" if error.errno == errno.ENOSPC else ""
        return f"{what} ({' -> '.join(paths)}){kept}" if paths else f"{what}{kept}"
    if isinstance(error, UnicodeDecodeError):
        return f"input is not UTF-8 text ({error.reason}: byte 0x{error.object[error.start]:02x} at offset {error.start})"
    if isinstance(error, RecursionError):
        return "input nested too deeply to read (maximum recursion depth exceeded)"
    if isinstance(error, SafetensorError):
        return f"corrupt safetensors file ({first_line(error)})"
    return None


def close_progress_bars() -> None:
    """End every live tqdm bar with its newline, so a message that follows starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        if args.command in ("sft", "grpo", "train"):
            from rlatent.config import load_config
            from rlatent.run.stages import run_phases

            if args.resume is None and args.config is None:
                raise ConfigError(f"rlatent {args.command}: give a CONFIG, or --resume RUN_DIR")
            if args.resume is not None and (args.config or args.overrides):
                raise ConfigError("--resume continues a run with its own config.yaml; give no CONFIG or overrides")
            cfg = None if args.resume else load_config(args.config, args.overrides)
            run_phases(args.command, cfg, args.config, resume=args.resume)
        elif args.command == "eval":
            from rlatent.run.stages import run_eval

            run_eval(args.target, args.overrides, args.limit, args.split)
        elif args.command == "ablate":
            from rlatent.run.ablate import ablate_command

            return ablate_command(args.config, args.overrides, args.grid, args.seeds, args.ablate_command,
                                  args.name, args.report, args.point, args.phase2, args.jobs, args.timeout)
        elif args.command == "compare":
            from rlatent.run.compare import compare_command

            return compare_command(args.sources, args.a, args.b, args.phase, args.ood, args.json)
        elif args.command == "diagnose":
            from rlatent.run.diagnose import diagnose_command

            return diagnose_command(args.runs, args.overrides, args.only, args.samples, args.split, args.batches,
                                    args.batch_size, args.json)
        elif args.command == "config":
            from rlatent.config import config_reference

            print("| key | default | meaning |\n|---|---|---|")
            for key, default, meaning in config_reference():
                print(f"| `{key}` | `{default}` | {meaning} |")
        else:
            from rlatent.model.tiny import build_tiny_model

            print(build_tiny_model(args.path, architecture=args.architecture))
    except KeyboardInterrupt as interrupt:
        close_progress_bars()
        print(f"rlatent: {interrupt}" if str(interrupt) else
              "rlatent: interrupted; checkpoints and metrics written so far are kept", file=sys.stderr)
        return 130
    except Exception as error:
        close_progress_bars()
        line = user_error(error)
        if line is None:
            raise  # a bug: its traceback
        print(f"rlatent: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
