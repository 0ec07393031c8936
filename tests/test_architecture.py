"""The layout docs/architecture.md describes, checked on the import graph (grimp, the library under import-linter):
no module imports itself round a cycle, apps code lives under `difflab.apps`, and one module
writes files by rename. The layer contracts themselves are import-linter's (pyproject.toml)."""
from __future__ import annotations

import ast
from pathlib import Path

import grimp

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_a_cycle():
    graph = grimp.build_graph("difflab")
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle():
    class Ring:   # a → b → c → a, and d outside it
        modules = {"a", "b", "c", "d"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, module):
            return self.edges[module]

    assert _cycles(Ring()) == [["a", "b", "c"]]


def test_demo_and_report_code_lives_only_under_apps():
    outside = [path.relative_to(SRC).as_posix() for path in SRC.rglob("*.py")
               if "apps" not in path.relative_to(SRC).parts
               and any(word in path.stem for word in ("demo", "report", "cli"))]
    assert outside == []


def test_files_are_renamed_into_place_in_one_module_only():
    """os.replace / os.rename / Path.replace are the atomic-write primitive: one module owns it."""
    writers = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                writers.add(path.relative_to(SRC).as_posix())
    assert writers == {"core/io.py"}
