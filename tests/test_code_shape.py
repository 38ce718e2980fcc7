"""The house rules a reader relies on: functions a reader takes in at once, files of one concern."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 400


def _sources():
    for package in ("segm", "policynet"):
        yield from sorted((REPO / package).rglob("*.py"))


def test_functions_and_files_stay_small():
    too_long = []
    for path in _sources():
        text = path.read_text()
        name = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "\n".join(too_long)


def test_no_comment_points_outside_the_repository():
    """Comments point into docs/DESIGN.md, never to a document a reader does not have."""
    offenders = [str(p.relative_to(REPO)) for p in _sources() if "SPEC §" in p.read_text()]
    assert not offenders, offenders
