"""The packages' layering, read from the source: no import circle among the modules of `segm`
and `policynet` — every import counts, at module level, under `TYPE_CHECKING` or deferred into
a function — and the model layer imports no command-line module. A module importing its own
parent package is not an edge: Python imports the parents of every module first anyway."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("segm", "policynet")
# Modules that define a command line (click) or run one: the model layer must not need them.
CLI_MODULES = {"segm.policy_choice", "segm.inference", "segm.share", "segm.eval.miou", "segm.train.cli",
               "segm.bench.cli", "segm.export.cli", "policynet.train", "policynet.eval"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(tree: ast.Module):
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                candidates = [base] + [f"{base}.{a.name}" for a in node.names]
            targets |= {c for c in candidates if c in modules and c != name and not name.startswith(c + ".")}
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    graph = _edges(_modules())
    assert len(graph) > 100 and graph["segm.model.segmenter"]  # the walk sees the packages
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_walk_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_model_layer_imports_no_command_line_module():
    modules = _modules()
    graph = _edges(modules)
    reached, todo = set(), [m for m in modules if m.startswith("segm.model")]
    while todo:  # everything the model layer may load
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo += graph[m]
    assert not reached & CLI_MODULES, sorted(reached & CLI_MODULES)
