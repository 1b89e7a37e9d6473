"""`rlatent` command line: `sft`, `eval`, `config`, `tiny-model`.

Every user error ends as one line on stderr and exit status 2; what a run
already wrote (checkpoints, metrics) stays on disk.
"""

from __future__ import annotations

import argparse
import sys

import torch

from rlatent.errors import RlatentError

EPILOG = """examples:
  rlatent sft configs/quickstart.yaml
  rlatent sft configs/gsm8k_smollm2.yaml data.path=../shared/data/gsm8k sft.steps=50
  rlatent sft configs/quickstart.yaml latent.mode=none          # text-only baseline
  rlatent eval runs/quickstart-20261122-120000 --limit 50
  rlatent eval runs/quickstart-20261122-120000 latent.start_threshold=0.8   # fewer latents
overrides are key.sub=value (value parsed as YAML); unknown keys are errors."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlatent", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune language models that reason with interleaved latent thoughts.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sft = commands.add_parser("sft", help="phase 1: supervised warm start at calculator marks, then evaluate")
    sft.add_argument("config", help="YAML config (see configs/)")
    sft.add_argument("overrides", nargs="*", help="key.sub=value overrides")
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
        if args.command == "sft":
            from rlatent.config import load_config
            from rlatent.runs import run_sft

            run_sft(load_config(args.config, args.overrides), args.config)
        elif args.command == "eval":
            from rlatent.runs import run_eval

            run_eval(args.target, args.overrides, args.limit)
        elif args.command == "config":
            from rlatent.config import config_reference

            print("| key | default | meaning |\n|---|---|---|")
            for key, default, meaning in config_reference():
                print(f"| `{key}` | `{default}` | {meaning} |")
        else:
            from rlatent.tiny import build_tiny_model

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
