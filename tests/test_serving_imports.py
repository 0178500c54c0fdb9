"""The module-level import order of serving/, rollout/ and teachers/ (docs/architecture.md).

    rollout.config, rollout.sampler, rollout.embedded      (no serving, teachers, stages)
      -> serving.*                                         (no teachers, stages, rollout.sglang/engine)
      -> rollout.sglang, rollout.engine, teachers.*        (no stages)
      -> stages

Read with `ast` from the files (imports inside functions are lazy by design and not counted), so
this holds without importing torch or megatron. The whole package's module graph is acyclic.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_opd"


def module_imports() -> dict[str, set[str]]:
    """{module: megatron_opd modules it imports at module level}."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.module in files:
                # `from pkg import sub` imports the submodule; `from mod import name` the module.
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(files)
                deps |= subs if len(subs) == len(node.names) else subs | {node.module}
        graph[name] = deps - {name}
    return graph


def reaches(graph, start: str, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(d for d in graph[start] if d.startswith(prefixes))


def test_serving_rollout_teachers_import_in_the_documented_order():
    graph = module_imports()
    low = ["megatron_opd.rollout.config", "megatron_opd.rollout.sampler", "megatron_opd.rollout.embedded"]
    for m in low:
        assert not reaches(graph, m, ("megatron_opd.serving", "megatron_opd.teachers", "megatron_opd.stages")), m
    for m in (m for m in graph if m.startswith("megatron_opd.serving")):
        bad = reaches(graph, m, ("megatron_opd.teachers", "megatron_opd.stages", "megatron_opd.rollout.sglang", "megatron_opd.rollout.engine"))
        assert not bad, (m, bad)
    for m in (m for m in graph if m.startswith(("megatron_opd.teachers", "megatron_opd.rollout"))):
        assert not reaches(graph, m, ("megatron_opd.stages",)), m
    assert "megatron_opd.serving.client" in graph["megatron_opd.rollout.sglang"]
    assert "megatron_opd.serving.client" in graph["megatron_opd.teachers.pool"]
    assert "megatron_opd.rollout.sampler" in graph["megatron_opd.serving.backend"]
    assert "megatron_opd.rollout.sampler" in graph["megatron_opd.rollout.embedded"]


def test_the_package_import_graph_is_acyclic():
    graph = module_imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, "import cycle: " + " -> ".join(path + [m])
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
