"""The README's promises: its config reference is the code's, its commands exist."""

from pathlib import Path

from rlatent.run.cli import build_parser
from rlatent.config import config_reference

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_config_reference_lists_every_key_with_its_default():
    for key, default, _ in config_reference():
        assert f"| `{key}` | `{default}` |" in README, f"README config reference is stale for {key}: run `rlatent config`"


def test_readme_commands_are_cli_commands():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for command in ("sft", "eval", "config", "tiny-model"):
        assert command in commands and f"rlatent {command}" in README
