"""Import a file of `scripts/`, `experiments/tools/` or `benchmarks/` as a module, for the tests of the
analysis and benchmark scripts (they are scripts, not a package)."""

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_script(name: str, folder: str = "scripts") -> ModuleType:
    """`<folder>/<name>.py` (folder relative to the repository root), executed as a fresh module named `name`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
