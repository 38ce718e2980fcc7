"""Token reduction: the seam (`base`: `Reducer`, `TokenMap`, `unmerge`), the rules commands
check without torch (`rules`: budgets, crops, the reducer registry), and the methods: `none`
(the base `Reducer`) and CTS (`cts`: pure functions; `cts_reducer`; `scorers`).
See docs/DESIGN.md, "Token reduction"."""
from segm.model.reduction.rules import (  # noqa: F401
    CTS, NONE, ModelConfigError, Reduction, ReductionError, TokenBudgetError, check_window, reducer_entry,
    reducer_names, register_reducer,
)


def build_reducer(reduction, grid: tuple[int, int], patch_size: int, net: dict | None = None):
    """The `Reducer` a validated `Reduction` describes, for a model of this grid."""
    build = reducer_entry(reduction.method).build
    if isinstance(build, str):  # "module:Class.method"
        import importlib

        module, _, attr = build.partition(":")
        build = importlib.import_module(module)
        for part in attr.split("."):
            build = getattr(build, part)
    return build(reduction, tuple(grid), patch_size, net or {})
