"""The package layout: folders import only downwards, no import cycle between modules or folders, the
model and sampler know nothing of trainers, the CLI or Ray, rewards nothing of model internals."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).parents[1]
# The layout, top to bottom: a folder may import the folders after it (and the foundation), never before.
ORDER = ["rlatent.run", "rlatent.sft", "rlatent.distributed", "rlatent.grpo", "rlatent.workers", "rlatent.latent",
         "rlatent.model", "rewards", "rlatent.data", "rlatent.optim", "rlatent.io"]
FOUNDATION = {"rlatent.config", "rlatent.modes", "rlatent.errors"}


def modules() -> dict[str, Path]:
    found = {}
    for path in [*ROOT.glob("rlatent/**/*.py"), *ROOT.glob("rewards/**/*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at any depth of the file (lazy imports count)."""
    known = modules()
    graph = defaultdict(set)
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in known and t != name}
    return graph


def folder(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "rewards":
        return "rewards"
    return module if module in FOUNDATION or len(parts) < 2 else ".".join(parts[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    assert find_cycle(import_graph()) is None


def test_folders_import_only_downwards():
    upward = []
    for module, targets in import_graph().items():
        source = folder(module)
        for target in targets:
            dest = folder(target)
            if dest == source or dest in FOUNDATION or source == "rlatent":
                continue
            if source in FOUNDATION:
                upward.append(f"{module} -> {target} (the foundation imports nothing above it)")
            elif ORDER.index(dest) < ORDER.index(source):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_model_and_sampler_know_nothing_of_trainers_cli_or_ray():
    graph = import_graph()
    for module in [m for m in graph if m.startswith(("rlatent.model", "rlatent.latent"))]:
        for target in graph[module]:
            assert not target.startswith(("rlatent.run", "rlatent.sft", "rlatent.grpo", "rlatent.distributed")), \
                f"{module} imports {target}"
    for module, path in modules().items():
        if module.startswith(("rlatent.model", "rlatent.latent")):
            assert "import ray" not in path.read_text(), module


def test_rewards_never_import_model_internals():
    for module, targets in import_graph().items():
        if module.startswith("rewards"):
            assert all(folder(t) in {"rlatent.data", "rewards"} | FOUNDATION for t in targets), (module, targets)


def test_modules_stay_small():
    too_long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 450}
    assert not too_long, too_long


def test_architecture_page_lists_these_layers():
    """docs/architecture.md shows the layering rule; it must be the one this file checks."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    block = page.split("<!-- layers -->")[1].split("<!-- /layers -->")[0]
    assert [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("```")] == ORDER
    for module in FOUNDATION:
        assert f"`{module}`" in page, module
