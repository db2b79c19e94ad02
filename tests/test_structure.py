"""The package's shape: no import cycle among spirs_tf modules (imports inside functions count too),
no module of spirs_tf/ or experiments/ over 600 lines, and spirs_tf importable without TensorFlow."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 600


def _python_files(folder: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        out.extend(os.path.join(dirpath, f) for f in files if f.endswith(".py"))
    return sorted(out)


def _module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def import_graph() -> dict[str, set[str]]:
    """{spirs_tf module: the spirs_tf modules it imports anywhere in its file (any depth, any scope)}."""
    paths = {_module_name(p): p for p in _python_files("spirs_tf")}
    graph = {}
    for module, path in paths.items():
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:  # `from spirs_tf import networks` imports a module
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base)
        graph[module] = {d for d in deps if d in paths and d != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "spirs_tf.refine" in graph["spirs_tf.refinement"]  # imported inside make_refine's closure
    assert "spirs_tf.networks" in graph["spirs_tf.predictor"]  # inside Run.build_model


def test_no_import_cycle_among_spirs_tf_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_module_over_600_lines():
    long = {os.path.relpath(p, ROOT): n for p in _python_files("spirs_tf") + _python_files("experiments")
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert not long, long


def test_spirs_tf_imports_without_tensorflow_or_keras():
    """The modules that need no model import neither TensorFlow nor Keras (a fast command line, and
    statistics that never import TF)."""
    code = ("import sys, spirs_tf, spirs_tf.checkpoints, spirs_tf.predictor, spirs_tf.inference, "
            "spirs_tf.evaluation, spirs_tf.cohort_predict, spirs_tf.config, spirs_tf.cli; "
            "bad = [m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)
