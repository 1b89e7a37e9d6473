"""`rlatent` command line: `sft`, `grpo`, `train`, `eval`, `config`, `tiny-model`.

Every user error ends as one line on stderr and exit status 2; what a run
already wrote (checkpoints, metrics) stays on disk.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

            run_eval(args.target, args.overrides, args.limit)
        elif args.command == "config":
            from rlatent.config import config_reference

            print("| key | default | meaning |\n|---|---|---|")
            for key, default, meaning in config_reference():
                print(f"| `{key}` | `{default}` | {meaning} |")
        else:
            from rlatent.model.tiny import build_tiny_model

            print(build_tiny_model(args.path, architecture=args.architecture))
    except RlatentError as error:
        print(f"rlatent: error: {error}", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, MemoryError) as error:
        print(f"rlatent: error: out of memory on the device ({str(error).splitlines()[0][:120]}); lower "
              "sft.batch_size, eval.batch_size or data.max_length; checkpoints written so far are kept",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlatent: interrupted; checkpoints and metrics written so far are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
