"""ALGM's settings and their rules, without torch (docs/DESIGN.md, "Token reduction").

ALGM (adaptive local-then-global token merging) merges similar tokens inside the encoder: a
local stage in one block merges 2×2 windows of similar tokens, a global stage in a later block
merges tokens bipartitely. `mode`: `static` (this project's default: a fixed number of merges
per image in each stage, set by `local_ratio` and `global_ratio`, chosen per image by the
scores — batch-independent, static shapes) or `reference` (the published behaviour: counts
from thresholds, then the minimum over the batch, so one image's output depends on the other
images of its batch).
"""
from __future__ import annotations

MODES = ("static", "reference")
# The published local thresholds τ per backbone (ADE20K models); others default to ViT-S's.
PUBLISHED_TAU = {"vit_tiny_patch16_384": 0.90, "vit_small_patch16_384": 0.88, "vit_base_patch16_384": 0.94,
                 "vit_large_patch16_384": 0.95}
DEFAULT_TAU = 0.88
DEFAULTS = {"mode": "static", "local_block": 1, "global_block": 5, "local_ratio": 0.25, "global_ratio": 0.15,
            "tau": None, "prop_attn": False}


def check_algm(options: dict, grid: tuple[int, int]) -> dict:
    """The `reducer: {name: algm, ...}` settings, completed with the defaults and checked."""
    from segm.model.reduction.rules import ReductionError

    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ReductionError(f"algm has no setting {', '.join(sorted(unknown))}; its settings: {', '.join(DEFAULTS)}")
    s = {**DEFAULTS, **options}
    if s["mode"] not in MODES:
        raise ReductionError(f"algm mode must be one of {', '.join(MODES)}, got {s['mode']!r}")
    if not (isinstance(s["local_block"], int) and isinstance(s["global_block"], int)
            and 1 <= s["local_block"] < s["global_block"]):
        raise ReductionError(f"algm needs 1 ≤ local_block < global_block (1-based block numbers), got "
                             f"{s['local_block']} and {s['global_block']}")
    for key in ("local_ratio", "global_ratio"):
        if not (isinstance(s[key], (int, float)) and 0 <= s[key] < 1):
            raise ReductionError(f"algm {key} must lie in [0, 1), got {s[key]!r}")
    if s["tau"] is not None and not (isinstance(s["tau"], (int, float)) and -1 <= s["tau"] <= 1):
        raise ReductionError(f"algm tau is a cosine similarity in [-1, 1], got {s['tau']!r}")
    if not isinstance(s["prop_attn"], bool):
        raise ReductionError(f"algm prop_attn is true or false, got {s['prop_attn']!r}")
    if grid[0] % 2 or grid[1] % 2:
        raise ReductionError(f"algm's local stage merges 2×2 windows: it needs an even patch grid, got {grid[0]}×{grid[1]}")
    return s


def static_counts(grid: tuple[int, int], local_ratio: float, global_ratio: float,
                  num_shared: int = 0) -> tuple[int, int]:
    """(r1 windows merged locally, r2 tokens merged globally) per image in static mode: r1 is
    `local_ratio` of the candidate windows (those CTS did not share: all but `num_shared`), r2
    `global_ratio` of the tokens after the local stage."""
    windows = (grid[0] // 2) * (grid[1] // 2) - num_shared
    r1 = round(local_ratio * windows)
    after_local = grid[0] * grid[1] - 3 * num_shared - 3 * r1
    # the global stage pairs 1 + T' tokens (class token included) into A (even) and B (odd)
    sources = (after_local + 2) // 2 - 1  # A tokens other than the class token
    return r1, min(round(global_ratio * after_local), sources)


def published_reducer(variant: dict) -> dict | None:
    """The `reducer` entry of a run of the published ALGM code (its `variant.yml` records ALGM in
    `dataset_kwargs`: `patch_type: algm`, `selected_layers` [local, global], `merging_window_size`
    [2, 2], `threshold` τ), or None for any other variant. Such a checkpoint runs in `reference`
    mode, as it was trained and published."""
    from segm.model.reduction.rules import ReductionError

    dkw = variant.get("dataset_kwargs") or {}
    if dkw.get("patch_type") != "algm" or (variant.get("net_kwargs") or {}).get("reducer") is not None:
        return None
    window, layers = dkw.get("merging_window_size"), dkw.get("selected_layers")
    if window is not None and [int(w) for w in window] != [2, 2]:
        raise ReductionError(f"this ALGM run merges {list(window)} windows; only 2×2 windows (the published "
                             "setting) are implemented")
    if layers is not None and len(layers) != 2:
        raise ReductionError(f"ALGM's selected_layers are [local block, global block], got {list(layers)}")
    entry = {"name": "algm", "mode": "reference"}
    if layers is not None:
        entry.update(local_block=int(layers[0]), global_block=int(layers[1]))
    if dkw.get("threshold") is not None:
        entry["tau"] = float(dkw["threshold"])
    return entry
