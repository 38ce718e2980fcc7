"""The token budgets the benchmark times: the main CTS budget S and the sweep's.

Every budget is validated by the project's one budget rule, `segm.model.reduction.rules.resolve_token_budget`.
"""
from __future__ import annotations

from segm.bench.settings import MAIN_SCORER, BenchConfig, BenchError
from segm.model.reduction.rules import TokenBudgetError, resolve_token_budget
from segm.model.spec import DEFAULT_TOKEN_REDUCTION, POLICY_PATCH_SIZE, reference_num_shared

def default_num_shared(grid: tuple[int, int]) -> int:
    """The default S for a token grid: the reference's ADE20K budget (103 at 512), else ~30 %."""
    if grid[0] == grid[1]:
        return reference_num_shared(grid[0] * POLICY_PATCH_SIZE)
    return round(DEFAULT_TOKEN_REDUCTION * grid[0] * grid[1] / 3)


def resolve_budgets(cfg: BenchConfig, grid: tuple[int, int], model_s: int | None = None) -> tuple[int, list]:
    """(S of the main CTS variant, S of the extra sweep points). `model_s`: a CTS checkpoint's S,
    the default when no budget is given."""
    n = grid[0] * grid[1]
    asked = cfg.num_shared
    if cfg.num_shared is None and cfg.token_reduction is None:
        asked = model_s or default_num_shared(grid)
    _, s_main = resolve_token_budget(grid, MAIN_SCORER, asked, None, cfg.token_reduction)
    if s_main == 0:
        raise BenchError("the CTS budget is S = 0, which is no_sharing itself; give --num-shared ≥ 1")
    sweep = []
    for rho in cfg.sweep:
        try:
            _, s = resolve_token_budget(grid, MAIN_SCORER, token_reduction=rho)
        except TokenBudgetError as e:
            raise BenchError(f"--sweep {rho}: {e}") from None
        if abs(3 * s / n - 3 * s_main / n) < 0.01:
            s = s_main  # e.g. 30 % at 512: the reference 103 rather than round(102.4)
        if s not in (0, s_main) and s not in sweep:
            sweep.append(s)
    return s_main, sweep
