"""ALGM behind the seam: merge similar tokens inside the encoder, a local stage (2×2 windows)
in one block and a global stage (bipartite) in a later one, both after the block's attention
residual and before its MLP; the decoder's class scores are unmerged through the composed
token map (docs/DESIGN.md, "Token reduction"; settings and rules: `algm_rules`).

Written from the published description of the method, not from its code. Every function is
vectorised over the batch; in `static` mode the merge counts are Python ints, so shapes are
static and no value leaves the device. `reference` mode takes the minimum count over the
batch, which reads it on the host.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from segm.model.reduction.algm_rules import DEFAULT_TAU, DEFAULTS, PUBLISHED_TAU, static_counts
from segm.model.reduction.base import Reducer, TokenMap
from segm.model.reduction.ranking import descending_order, true_indices
from segm.model.reduction.rules import ReductionError

EPS = 1e-8


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _sizes(tmap: TokenMap, x: torch.Tensor) -> torch.Tensor:
    if tmap.sizes is not None:
        return tmap.sizes.to(x.dtype)
    return torch.ones(x.shape[0], tmap.num_tokens, dtype=x.dtype, device=x.device)


def cell_counts(tmap: TokenMap) -> torch.Tensor:
    """(B, T) how many base cells each token covers (CTS's shared tokens: 4)."""
    t = tmap.token_of_cell
    return torch.zeros(t.shape[0], tmap.num_tokens, device=t.device).scatter_add_(1, t, torch.ones(t.shape, device=t.device))


def window_scores(tokens: torch.Tensor, tmap: TokenMap) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B, W), window_tokens (B, W, 4)): per even-aligned 2×2 window, row-major over the
    window grid, the tokens of its 4 cells (row-major inside the window) and the mean of their 6
    pairwise cosine similarities. A window CTS already shares (one token) scores −inf: it is no
    candidate."""
    gh, gw = tmap.grid
    w2 = gw // 2
    win = torch.arange((gh // 2) * w2, device=tokens.device)
    top_left = 2 * (win // w2) * gw + 2 * (win % w2)
    k = torch.arange(4, device=tokens.device)
    cells = top_left.unsqueeze(1) + k % 2 + (k // 2) * gw  # (W, 4)
    tok = tmap.token_of_cell[:, cells]  # (B, W, 4)
    rows = torch.arange(tokens.shape[0], device=tokens.device).view(-1, 1, 1)
    u = _unit(tokens)[rows, tok]  # (B, W, 4, D)
    sim = u @ u.transpose(-1, -2)  # (B, W, 4, 4)
    pairs = torch.triu_indices(4, 4, 1, device=tokens.device)
    scores = sim[..., pairs[0], pairs[1]].mean(-1)
    if not tmap.identity:
        scores = scores.masked_fill(tok[..., 0] == tok[..., 1], float("-inf"))
    return scores, tok


def local_merge(x: torch.Tensor, tmap: TokenMap, r1: int, scores: torch.Tensor, window_tokens: torch.Tensor):
    """Each image merges its r1 best-scored windows into their size-weighted means. Output:
    [prefix, merged tokens in descending score, the other tokens by ascending index]."""
    b, n, d = x.shape[0], tmap.num_tokens, x.shape[-1]
    npt = x.shape[1] - n
    tokens, sizes = x[:, npt:], _sizes(tmap, x)
    chosen = descending_order(scores)[:, :r1]  # (B, r1)
    rows = torch.arange(b, device=x.device).view(b, 1, 1)
    members = window_tokens[rows.squeeze(-1), chosen].flatten(1)  # (B, 4·r1) the merged tokens
    w = torch.gather(sizes, 1, members).view(b, r1, 4, 1)
    merged = (torch.gather(tokens, 1, members.unsqueeze(-1).expand(-1, -1, d)).view(b, r1, 4, d) * w).sum(2) / w.sum(2)
    is_rest = torch.ones(b, n, dtype=torch.bool, device=x.device).scatter(1, members, False)
    rest = true_indices(is_rest, n - 4 * r1)  # ascending
    new_slot = torch.empty(b, n, dtype=torch.long, device=x.device)
    new_slot.scatter_(1, members, torch.arange(r1, device=x.device).repeat_interleave(4).expand(b, -1))
    new_slot.scatter_(1, rest, r1 + torch.arange(n - 4 * r1, device=x.device).expand(b, -1))
    out = torch.cat([x[:, :npt], merged, torch.gather(tokens, 1, rest.unsqueeze(-1).expand(-1, -1, d))], 1)
    new_sizes = torch.cat([w.sum(2).squeeze(-1), torch.gather(sizes, 1, rest)], 1)
    return out, _composed(tmap, new_slot, out.shape[1] - npt, new_sizes)


def _composed(tmap: TokenMap, new_slot: torch.Tensor, num_tokens: int, sizes: torch.Tensor) -> TokenMap:
    """The map after a merge that moves old token t to `new_slot[:, t]`."""
    return tmap._replace(token_of_cell=torch.gather(new_slot, 1, tmap.token_of_cell), num_tokens=num_tokens,
                         sizes=sizes, identity=False)  # the record (CTS's, when stacked) stays


def best_matches(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite matching over all tokens (prefix included): A = positions 0, 2, 4, ...,
    B = 1, 3, 5, ...; for each A token its best cosine similarity v and B index j. The class
    token (A[0]) never merges (v = −inf)."""
    u = _unit(x)
    sim = u[:, 0::2] @ u[:, 1::2].transpose(1, 2)
    sim[:, 0] = float("-inf")
    return sim.max(dim=-1)


def global_merge(x: torch.Tensor, tmap: TokenMap, r2: int, v: torch.Tensor, j: torch.Tensor):
    """The r2 A tokens with the best matches merge into their B tokens (size-weighted means).
    Output: [the other A tokens by ascending A index (class token first), all B tokens]."""
    b, d = x.shape[0], x.shape[-1]
    npt = x.shape[1] - tmap.num_tokens  # one prefix token (A[0])
    sizes = torch.cat([torch.ones(b, npt, dtype=x.dtype, device=x.device), _sizes(tmap, x)], 1)
    xa, xb, sa, sb = x[:, 0::2], x[:, 1::2], sizes[:, 0::2], sizes[:, 1::2]
    na, nb = xa.shape[1], xb.shape[1]
    src = descending_order(v)[:, :r2]  # the sources, best match first
    kept = na - r2
    keep = true_indices(torch.ones(b, na, dtype=torch.bool, device=x.device).scatter(1, src, False), kept)
    dst = torch.gather(j, 1, src)
    s_src = torch.gather(sa, 1, src)
    num = (xb * sb.unsqueeze(-1)).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, d),
                                              torch.gather(xa, 1, src.unsqueeze(-1).expand(-1, -1, d)) * s_src.unsqueeze(-1))
    den = sb.scatter_add(1, dst, s_src)
    out = torch.cat([torch.gather(xa, 1, keep.unsqueeze(-1).expand(-1, -1, d)), num / den.unsqueeze(-1)], 1)
    slot_a = torch.empty(b, na, dtype=torch.long, device=x.device)
    slot_a.scatter_(1, keep, torch.arange(kept, device=x.device).expand(b, -1))
    slot_a.scatter_(1, src, kept + dst)
    slot_b = kept + torch.arange(nb, device=x.device).expand(b, -1)
    new_pos = torch.stack([slot_a[:, : (na + nb) // 2], slot_b[:, : (na + nb) // 2]], 2).flatten(1)
    if na > nb:
        new_pos = torch.cat([new_pos, slot_a[:, -1:]], 1)  # an odd count: the last A token
    new_slot = new_pos[:, npt:] - npt  # patch tokens: old slot → new slot
    new_sizes = torch.cat([torch.gather(sa, 1, keep), den], 1)[:, npt:]
    return out, _composed(tmap, new_slot, out.shape[1] - npt, new_sizes)


def reference_threshold(v: torch.Tensor, global_block: int) -> torch.Tensor:
    """θ = batch mean of (mean of v) + batch mean of (unbiased std of v) / ℓ, over i ≥ 1."""
    rest = v[:, 1:]
    return rest.mean(1).mean() + rest.std(1).mean() / global_block


class AlgmRecord(NamedTuple):
    """What ALGM did to one batch: the token count after the embedding and after each stage
    (Python ints: in reference mode they vary from batch to batch), and CTS's record when
    stacked on it (its layout, scores and policy logits read through)."""

    stage_tokens: tuple[int, ...]
    base: Any = None

    @property
    def layout(self):
        return getattr(self.base, "layout", None)

    @property
    def scores(self):
        return getattr(self.base, "scores", None)

    @property
    def policy_logits(self):
        return getattr(self.base, "policy_logits", None)


def _counted(tmap: TokenMap) -> TokenMap:
    """`tmap` with its token count appended to the record's stage counts."""
    rec = tmap.record if isinstance(tmap.record, AlgmRecord) else AlgmRecord((), tmap.record)
    return tmap._replace(record=rec._replace(stage_tokens=(*rec.stage_tokens, tmap.num_tokens)))


class AlgmReducer(Reducer):
    """ALGM's two stages; with `base` (a CTS reducer), CTS's embedding comes first and ALGM acts
    on its tokens (docs/DESIGN.md, "CTS + ALGM")."""

    name = "algm"
    unmerge_at = "scores"  # the decoder runs on the merged tokens, as published

    def __init__(self, grid, patch_size, *, mode="static", local_block=1, global_block=5, local_ratio=0.25,
                 global_ratio=0.15, tau=None, prop_attn=False, base: Reducer | None = None):
        super().__init__(grid, patch_size)
        self.mode, self.tau, self.prop_attn = mode, tau, prop_attn
        self.local_block, self.global_block = local_block, global_block
        self.local_ratio, self.global_ratio = local_ratio, global_ratio
        self.base = base
        self.num_shared = base.num_shared if base is not None else 0
        self.r1, self.r2 = static_counts(self.grid, local_ratio, global_ratio, self.num_shared)

    @classmethod
    def from_description(cls, reduction, grid, patch_size, net):
        settings = dict(reduction.options)
        depth = int(net.get("n_layers", 0))
        if depth and settings.get("global_block", DEFAULTS["global_block"]) > depth:
            raise ReductionError(f"algm's global_block {settings.get('global_block', DEFAULTS['global_block'])} is "
                                 f"past the encoder's {depth} blocks: pass global_block=B with B ≤ {depth}")
        if settings.get("tau") is None:
            settings["tau"] = PUBLISHED_TAU.get(net.get("backbone"), DEFAULT_TAU)
        base = None
        if reduction.shares:
            from segm.model.reduction.cts_reducer import CtsReducer
            from segm.model.reduction.rules import policy_reduction

            base = CtsReducer.from_description(policy_reduction(reduction.scorer, reduction.num_shared), grid,
                                               patch_size, net)
        return cls(grid, patch_size, base=base, **settings)

    # ------------------------------------------------------------ CTS underneath, when stacked
    @property
    def needs_labels(self) -> bool:
        return self.base is not None and self.base.needs_labels

    def modules(self):
        return self.base.modules() if self.base is not None else {}

    def embed(self, vit, im, labels=None, given=None):
        if self.base is None:
            x, tmap = super().embed(vit, im, labels, given)
        else:
            x, tmap = self.base.embed(vit, im, labels, given)
            tmap = tmap._replace(sizes=cell_counts(tmap))  # a shared token starts with size 4
        return x, tmap._replace(record=AlgmRecord((tmap.num_tokens,), tmap.record))

    def generators(self) -> dict:
        return self.base.generators() if self.base is not None else {}

    def reset(self, seed=None) -> None:
        if self.base is not None:
            self.base.reset(seed)

    def label_dataset(self, name: str) -> None:
        if self.base is not None:
            self.base.label_dataset(name)

    def policy_record(self) -> dict:
        return self.base.policy_record() if self.base is not None else super().policy_record()

    def export_given(self, batch_size):
        return self.base.export_given(batch_size) if self.base is not None else None

    def export_outputs(self, tmap):
        """CTS's record when stacked on it, and the composed token map (B, N)."""
        first = self.base.export_outputs(tmap._replace(record=tmap.record.base)) if self.base is not None else {}
        return {**first, "token_of_cell": tmap.token_of_cell}

    def given_from_outputs(self, outputs):
        return self.base.given_from_outputs(outputs) if self.base is not None else None

    # ------------------------------------------------------------ the two stages
    def merges_inside(self, i: int) -> bool:
        return i + 1 in (self.local_block, self.global_block)

    def after_attention(self, i, x, tmap):
        if i + 1 == self.local_block:
            scores, window_tokens = window_scores(x[:, x.shape[1] - tmap.num_tokens:], tmap)
            r1 = self.r1 if self.mode == "static" else int((scores >= self.tau).sum(1).min())
            x, tmap = local_merge(x, tmap, r1, scores, window_tokens) if r1 else (x, tmap)
            return x, _counted(tmap)
        v, j = best_matches(x)
        r2 = self.r2 if self.mode == "static" else int((v >= reference_threshold(v, self.global_block)).sum(1).min())
        x, tmap = global_merge(x, tmap, r2, v, j) if r2 else (x, tmap)
        return x, _counted(tmap)

    def attn_bias(self, tmap):
        if not self.prop_attn or tmap.sizes is None:
            return None
        b = tmap.sizes.shape[0]
        sizes = torch.cat([torch.ones(b, 1, device=tmap.sizes.device), tmap.sizes.float()], 1)
        return sizes.log().view(b, 1, 1, -1)  # + log(size) of each key

    def stage_tokens(self) -> list[int] | None:
        """T after the embedding, the local stage and the global stage (static mode)."""
        if self.mode != "static":
            return None
        t = self.grid[0] * self.grid[1] - 3 * self.num_shared
        return [t, t - 3 * self.r1, t - 3 * self.r1 - self.r2]

    def static_tokens(self, grid):
        if self.mode != "static" or tuple(grid) != self.grid:
            return None
        return self.stage_tokens()[-1]

    def settings(self) -> dict:
        out = {"mode": self.mode, "local_block": self.local_block, "global_block": self.global_block,
               "prop_attn": self.prop_attn}
        if self.mode == "reference":
            out["tau"] = self.tau
        else:
            out.update(local_ratio=self.local_ratio, global_ratio=self.global_ratio, stage_tokens=self.stage_tokens())
        if self.base is not None:
            out["cts"] = self.base.settings()
        return out

    def tag(self) -> str:
        """`algm_<mode>`, then each setting that differs from the default (file names); after
        CTS's tag when stacked on it."""
        given = {"local_block": self.local_block, "global_block": self.global_block, "prop_attn": self.prop_attn}
        if self.mode == "static":
            given.update(local_ratio=self.local_ratio, global_ratio=self.global_ratio)
        changed = [f"{k}{v}" for k, v in given.items() if v != DEFAULTS[k]]
        own = "_".join([f"algm_{self.mode}", *changed])
        return f"{self.base.tag()}_{own}" if self.base is not None else own

    def summary(self) -> str:
        if self.mode == "static":
            own = f"ALGM static: tokens {' → '.join(map(str, self.stage_tokens()))} " \
                  f"(blocks {self.local_block}, {self.global_block})"
        else:
            own = (f"ALGM reference: batch-minimum counts (an image's output depends on the other images of its "
                   f"batch), τ = {self.tau} (blocks {self.local_block}, {self.global_block})")
        return f"{self.base.summary()}, then {own}" if self.base is not None else own
