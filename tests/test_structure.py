"""The package's import graph (module-level and function-level imports alike): models own their
weight names, and the model objects and the command line import each other in one direction only."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blip_jax"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> the blip_jax modules it imports anywhere in its file (`from a import b` counts
    `a.b` when that is a module, else `a`)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("blip_jax")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("blip_jax"):
                for a in node.names:
                    edges.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
        graph[name] = {e for e in edges if e in modules} - {name}
    return graph


def _reaches(graph, start: str, goal: str, avoid: frozenset = frozenset()) -> bool:
    seen, todo = set(avoid), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return False


def test_models_import_nothing_from_convert():
    graph = _graph()
    bad = {m: sorted(e for e in edges if e.startswith("blip_jax.convert"))
           for m, edges in graph.items() if m.startswith("blip_jax.models")}
    assert {m: e for m, e in bad.items() if e} == {}


def test_no_cycle_between_the_model_objects_nor_cli_and_demo():
    """BLIP's and BLIP-2's model objects are siblings: neither reaches the other but through the
    loader that dispatches to both (`blip_jax.load`, `model_base.load`); the demo never imports the CLI."""
    graph = _graph()
    loader = frozenset({"blip_jax", "blip_jax.model_base"})
    assert not _reaches(graph, "blip_jax.api", "blip_jax.blip2_api", loader)
    assert not _reaches(graph, "blip_jax.blip2_api", "blip_jax.api", loader)
    assert not _reaches(graph, "blip_jax.demo", "blip_jax.cli")


def test_training_names_no_stage():
    """The trainer, state builder, inputs, dry run, report and export hold no stage names: stages
    are records in blip_jax/train/objectives/."""
    for name in ("trainer", "state", "inputs", "plan", "report", "export"):
        text = (PACKAGE / "train" / f"{name}.py").read_text()
        assert "objective ==" not in text and "objective in" not in text, name
