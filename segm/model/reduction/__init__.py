"""Token reduction: the seam (`base`: `Reducer`, `TokenMap`, `unmerge`), the rules commands
check without torch (`rules`: budgets, crops, the reducer registry), and the methods: `none`
(the base `Reducer`) and CTS (`cts`: pure functions; `cts_reducer`; `scorers`).
See docs/DESIGN.md, "Token reduction"."""
from segm.model.reduction.rules import (  # noqa: F401
    CTS, NONE, ModelConfigError, Reduction, ReductionError, TokenBudgetError, check_window, reducer_entry,
    reducer_names, register_reducer, resolve,
)


def build_reducer(reduction, grid: tuple[int, int], patch_size: int, net: dict | None = None):
    """The `Reducer` a validated `Reduction` describes, for a model of this grid."""
    return resolve(reducer_entry(reduction.method).build)(reduction, tuple(grid), patch_size, net or {})
