"""The rules of token reduction that a command checks before it builds anything: which
reducers exist, the CTS token budget, the crops and input sizes a reducer allows
(docs/DESIGN.md, "Token reduction"). Imports neither torch nor timm, so command-line tools
validate cheaply.

A model's reduction is a `Reduction`: the reducer's name and its settings. For CTS they are
the superpatch scorer (`policy_net`, `content`, `random`, `oracle`) and the budget S; the
model description (`net_kwargs`) spells CTS as the reference does (`policy_method`,
`policy_schedule`), and any other reducer as one `reducer` entry. A reducer registered with
`on_cts` (ALGM) may stack on CTS: its `Reduction` then also carries CTS's scorer and S.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

NONE = "none"
CTS = "cts"
NO_SHARING = "no_sharing"  # the reference's policy name for "no token sharing"
SCORERS = ("policy_net", "random", "oracle", "content")
# --policy-method's choices, in the order the reference lists them
POLICY_METHODS = ("policy_net", NO_SHARING, "random", "oracle", "content")
# The policy network the reference builds; also what a policy checkpoint without a record is.
DEFAULT_POLICY_BACKBONE = "efficientnet_lite0"


class ModelConfigError(ValueError):
    """A model description (or the options it came from) that cannot be built."""


class TokenBudgetError(ValueError):
    """An invalid (U, S) token budget or crop size."""


class ReductionError(ModelConfigError):
    """A reducer or reducer setting that does not exist or does not fit the model."""


@dataclass(frozen=True)
class Reduction:
    """What a model's token reduction is: the reducer's name and its settings (a sorted tuple
    of (key, value), so the description is hashable and compares by value)."""

    method: str = NONE
    scorer: str | None = None  # CTS (alone, or under a reducer stacked on it): how superpatches are scored
    num_shared: int = 0  # CTS: S
    options: tuple = field(default=())

    @property
    def policy_method(self) -> str:
        """The reference's spelling: the scorer when tokens are shared, `no_sharing` otherwise."""
        return self.scorer if self.shares else NO_SHARING

    @property
    def shares(self) -> bool:
        """CTS's embedding makes the tokens (CTS alone, or a reducer stacked on it)."""
        return self.scorer is not None

    @property
    def reduces(self) -> bool:
        return self.method != NONE

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


def policy_reduction(policy_method: str, num_shared: int) -> Reduction:
    """The reduction a reference `policy_method` and budget S mean."""
    check_policy_method(policy_method)
    if policy_method == NO_SHARING:
        return Reduction()
    return Reduction(CTS, policy_method, int(num_shared))


def policy_settings(policy_method: str, *, seed: int, dataset: str) -> dict:
    """The `net_kwargs` keys a training run records for its policy: the random policy's seed,
    the oracle's dataset (its label rules)."""
    if policy_method == "random":
        return {"random_seed": seed}
    if policy_method == "oracle":
        return {"oracle_dataset": dataset}
    return {}


def check_policy_method(policy_method: str) -> None:
    if policy_method not in POLICY_METHODS:
        raise ReductionError(f"unknown policy method {policy_method!r}; choose one of: {', '.join(POLICY_METHODS)}")


def resolve_token_budget(
    grid: tuple[int, int],
    policy_method: str,
    num_shared: int | None = None,
    num_notshared: int | None = None,
    token_reduction: float | None = None,
) -> tuple[int, int]:
    """Validates a CTS token budget before any work and returns (U, S).

    `token_reduction` ρ derives S = round(ρ·N/3). With `no_sharing`, S must be 0 (or unset).
    """
    gh, gw = grid
    n = gh * gw
    if token_reduction is not None:
        if not 0.0 <= token_reduction <= 0.75:
            raise TokenBudgetError(f"token reduction {token_reduction} must lie in [0, 0.75]")
        derived = round(token_reduction * n / 3)
        if num_shared is not None and num_shared != derived:
            raise TokenBudgetError(
                f"--token-reduction {token_reduction} gives S={derived} at N={n}, "
                f"but --num-tokens-shared is {num_shared}; give only one of them"
            )
        num_shared = derived
    if policy_method == NO_SHARING:
        if num_shared not in (None, 0):
            raise TokenBudgetError(
                f"policy 'no_sharing' shares no tokens, but S={num_shared} was asked; "
                "use --policy-method policy_net (or content, random, oracle) to share tokens"
            )
        num_shared = 0
    elif num_shared is None:
        raise TokenBudgetError(
            f"policy {policy_method!r} needs a token budget: give --num-tokens-shared S "
            f"(0 ≤ S ≤ {n // 4} for N={n}) or --token-reduction"
        )
    s = int(num_shared)
    max_s = (gh // 2) * (gw // 2)
    if s < 0 or s > max_s:
        raise TokenBudgetError(
            f"--num-tokens-shared {s} is out of range: 0 ≤ S ≤ {max_s} for a {gh}×{gw} patch grid"
        )
    if s > 0 and (gh % 2 or gw % 2):
        raise TokenBudgetError(
            f"token sharing needs an even patch grid: the crop must be a multiple of twice the "
            f"patch size (32 for /16 backbones); got {gh}×{gw} patches"
        )
    u = n - 4 * s
    if num_notshared is not None and int(num_notshared) != u:
        raise TokenBudgetError(
            f"--num-tokens-notshared {num_notshared} does not fit: with S={s} shared tokens and "
            f"N={n} patches, U must be N − 4S = {u}"
        )
    return u, s


def check_crop(reduction: Reduction, crop: tuple[int, int], patch_size: int) -> None:
    """A crop is a multiple of the patch size; CTS groups 2×2 patches, so it needs twice that."""
    h, w = crop
    p = patch_size
    if h % p or w % p:
        raise TokenBudgetError(f"crop {h}×{w} is not a multiple of the patch size {p}")
    if reduction.shares and (h % (2 * p) or w % (2 * p)):
        raise TokenBudgetError(f"token sharing needs a crop that is a multiple of {2 * p} (2× the patch size); got {h}×{w}")


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ReducerEntry:
    """A registered reducer. `build(reduction, grid, patch_size, net)` returns the `Reducer`;
    it is a callable, or the `module:attribute` name of one, imported only when a model is
    built (this module imports no torch). `check(options, grid)` validates the `reducer`
    entry's settings without torch and returns them normalised. `fixed_input`: the reducer's
    token count is fixed for one token grid, so the model runs only at its crop. `on_cts`: the
    reducer may act on CTS's tokens (a `reducer` entry beside a sharing `policy_method`)."""

    build: Callable | str
    check: Callable[[dict, tuple[int, int]], dict] | str
    fixed_input: bool = True
    on_cts: bool = False


def _no_options(options: dict, grid) -> dict:
    if options:
        raise ReductionError(f"this reducer takes no settings, got {', '.join(options)}")
    return options


def check_resize(options: dict, grid: tuple[int, int]) -> dict:
    """The `reducer: {name: resize, size: S}` setting: a positive int (square) or [H, W]."""
    unknown = set(options) - {"size"}
    if unknown or "size" not in options:
        raise ReductionError("resize takes one setting, size (pixels, e.g. resize:size=432)")
    size = options["size"]
    size = [size, size] if isinstance(size, int) else size
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ReductionError(f"resize size is a positive number of pixels (or [H, W]), got {options['size']!r}")
    return {"size": list(size)}


_REDUCERS: dict[str, ReducerEntry] = {
    NONE: ReducerEntry("segm.model.reduction.base:Reducer.from_description", _no_options, fixed_input=False),
    CTS: ReducerEntry("segm.model.reduction.cts_reducer:CtsReducer.from_description", _no_options),
    "algm": ReducerEntry("segm.model.reduction.algm:AlgmReducer.from_description",
                         "segm.model.reduction.algm_rules:check_algm", on_cts=True),
    "resize": ReducerEntry("segm.model.reduction.resize:ResizeReducer.from_description", check_resize),
}


def resolve(ref: Callable | str) -> Callable:
    """A registry entry's function: itself, or the one a `module:attr.attr` name points to."""
    if not isinstance(ref, str):
        return ref
    import importlib

    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def parse_reducer(text: str) -> dict:
    """`NAME[:KEY=VALUE,...]` (the `--reducer` option) → the `reducer` entry {name, settings};
    values are read as YAML scalars (`2` an int, `0.3` a float, `true` a bool)."""
    import yaml

    name, _, rest = text.partition(":")
    entry: dict = {"name": name.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ReductionError(f"--reducer {text!r}: settings are KEY=VALUE pairs separated by commas, got {item!r}")
        entry[key.strip()] = yaml.safe_load(value)
    reducer_entry(entry["name"])
    return entry


def registered_reduction(entry: dict, grid: tuple[int, int], under: Reduction | None = None) -> Reduction:
    """The `Reduction` a `reducer` entry ({name, settings}) describes, its settings checked and
    normalised by the reducer's own `check` for this token grid; `under`: the CTS reduction it
    stacks on (only for a reducer registered `on_cts`)."""
    name = entry["name"]
    if name == CTS:
        raise ReductionError("CTS is described by `policy_method` and `policy_schedule`, not a `reducer` entry")
    registered = reducer_entry(name)
    if under is not None and under.shares and not registered.on_cts:
        raise ReductionError(f"reducer {name!r} does not combine with token sharing (policy {under.scorer!r}); "
                             "use --policy-method no_sharing")
    options = {k: v for k, v in entry.items() if k != "name"}
    options = resolve(registered.check)(options, grid)
    scorer, s = (under.scorer, under.num_shared) if under is not None and under.shares else (None, 0)
    return Reduction(name, scorer, s, options=tuple(sorted(options.items())))


def reducer_record(reduction: Reduction) -> dict | None:
    """The `reducer` entry of `net_kwargs` that records `reduction` (its settings complete), or
    None when CTS's own keys (or nothing) describe it."""
    if reduction.method in (NONE, CTS):
        return None
    return {"name": reduction.method, **dict(reduction.options)}


def register_reducer(name: str, build: Callable, *, check: Callable | None = None, fixed_input: bool = True,
                     on_cts: bool = False) -> None:
    """Makes a reducer available to every command by name (a `reducer: {name: ...}` entry of
    `net_kwargs`, `--reducer NAME`)."""
    _REDUCERS[name] = ReducerEntry(build, check or _no_options, fixed_input, on_cts)


def reducer_names() -> list[str]:
    return list(_REDUCERS)


def reducer_entry(name: str) -> ReducerEntry:
    if name not in _REDUCERS:
        raise ReductionError(f"unknown reducer {name!r}; choose one of: {', '.join(_REDUCERS)}")
    return _REDUCERS[name]


def check_window(method: str, crop: tuple[int, int], window: tuple[int, int]) -> None:
    """A model whose reducer (`method`) fixes its token count for one grid runs only on inputs
    of its training crop. Plain Segmenter models take any size."""
    if method == NONE or not reducer_entry(method).fixed_input or tuple(window) == tuple(crop):
        return
    ch, cw = crop
    if ch != cw:
        raise ReductionError(
            f"this token-reducing model runs only on {ch}×{cw} inputs (its training crop), got "
            f"{window[0]}×{window[1]}; its crop is not square, so it cannot slide square windows"
        )
    raise ReductionError(
        f"this token-reducing model runs only on {ch}×{cw} inputs (its training crop), got "
        f"{window[0]}×{window[1]}: use windows of the crop (--window-size {ch}, window_size={ch})"
    )
