"""The seam every token-reduction method plugs into (docs/DESIGN.md, "Token reduction").

A `Reducer` decides which tokens the ViT sees. `Segmenter.forward` calls it at fixed points:

    tokens, tmap = reducer.embed(vit, im, labels)        # (B, T, D) patch tokens, position added
    for i, block in enumerate(vit.blocks):                # prefix tokens prepended before
        x = block(x, attn_mask=reducer.attn_bias(tmap))   # plain block(x) when the bias is None;
                                                          # when merges_inside(i): after_attention
                                                          # between the block's attention and MLP
        x, tmap = reducer.after_block(i, x, tmap)
    ... final norm; unmerge at "features" (before the decoder) or "scores" (after it)

The `TokenMap` says, for every base cell of the patch grid, which token covers it: one
gather (`unmerge`) turns per-token features or class scores back into per-cell ones. This
base class is the identity reducer (`none`): every patch is a token.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from segm.model.vit import resize_pos_embed


class TokenMap(NamedTuple):
    """Where the tokens of one batch come from.

    token_of_cell (B, N) int64: the token (0..T−1) that covers each base cell, raster order.
    grid: (Gh, Gw), N = Gh·Gw. num_tokens: T, a Python int (static shapes).
    sizes (B, T) or None: how many cells each token covers, for methods that weight by it.
    identity: token i is cell i (no reduction); unmerging is then free.
    record: the method's own description of the batch (CTS: scores, layout, policy logits).
    """

    token_of_cell: torch.Tensor
    grid: tuple[int, int]
    num_tokens: int
    sizes: torch.Tensor | None = None
    identity: bool = False
    record: Any = None


def identity_map(batch: int, grid: tuple[int, int], device) -> TokenMap:
    n = grid[0] * grid[1]
    return TokenMap(torch.arange(n, device=device).expand(batch, n), grid, n, identity=True)


def unmerge(x: torch.Tensor, tmap: TokenMap) -> torch.Tensor:
    """Per-token values (B, T, C) → per-cell values (B, N, C): every cell takes its token's."""
    if tmap.identity:
        return x
    return torch.gather(x, 1, tmap.token_of_cell.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def cells_to_grid(cells: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) per cell → (B, C, Gh, Gw), a channels-last view (no copy)."""
    b, _, c = cells.shape
    return cells.view(b, grid[0], grid[1], c).permute(0, 3, 1, 2)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) → (B, h·w, D), raster order."""
    return x.flatten(2).transpose(1, 2)


def attention_residual(block, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The first half of a timm ViT block: x + DropPath(LS(Attn(LN1(x))))."""
    return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=bias)))


def mlp_residual(block, x: torch.Tensor) -> torch.Tensor:
    """The second half of a timm ViT block: x + DropPath(LS(MLP(LN2(x))))."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def grid_pos_embed(vit, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix part (1, npt, D), grid part (1, N, D)) of the position embedding, the grid part
    resized bilinearly when the input's grid is not the encoder's (plain Segmenter does)."""
    npt = vit.num_prefix_tokens
    pos = vit.pos_embed
    if pos.shape[1] - npt != grid[0] * grid[1]:
        pos = resize_pos_embed(pos, grid, npt)
    return pos[:, :npt], pos[:, npt:]


class Reducer:
    """The identity reducer; subclasses override what their method changes.

    unmerge_at: "scores" (the decoder runs on the T tokens, its class scores are unmerged;
    CTS) or "features" (tokens are unmerged to the N cells before the decoder).
    needs_labels: `embed` reads the ground truth (an oracle).
    """

    name = "none"
    unmerge_at = "scores"
    needs_labels = False

    def __init__(self, grid: tuple[int, int], patch_size: int):
        self.grid = tuple(grid)
        self.patch_size = patch_size

    @classmethod
    def from_description(cls, reduction, grid: tuple[int, int], patch_size: int, net: dict) -> Reducer:
        """The reducer a validated `Reduction` (and the model description `net`) describes."""
        return cls(grid, patch_size)

    def modules(self) -> dict[str, nn.Module]:
        """Frozen modules the method owns (e.g. a policy network). The Segmenter registers each
        under its name, so its weights travel in checkpoints, and keeps it in eval mode."""
        return {}

    def embed(self, vit, im: torch.Tensor, labels: torch.Tensor | None = None,
              given: torch.Tensor | None = None) -> tuple[torch.Tensor, TokenMap]:
        """Patch tokens (B, T, D) with position embeddings added, and their map. `given`: a
        method's precomputed selection input (CTS: superpatch scores), e.g. fixed at export."""
        grid = (im.shape[2] // self.patch_size, im.shape[3] // self.patch_size)
        _, pos = grid_pos_embed(vit, grid)
        x = vit.patch_embed.norm(grid_to_tokens(vit.patch_embed.proj(im))) + pos
        return x, identity_map(im.shape[0], grid, im.device)

    def after_block(self, i: int, x: torch.Tensor, tmap: TokenMap) -> tuple[torch.Tensor, TokenMap]:
        """After encoder block i: x (B, prefix + T, D) → (possibly fewer tokens, new map)."""
        return x, tmap

    def acts_after_blocks(self) -> bool:
        return type(self).after_block is not Reducer.after_block

    def merges_inside(self, i: int) -> bool:
        """Whether `after_attention` acts in block i: that block then runs in two halves."""
        return False

    def after_attention(self, i: int, x: torch.Tensor, tmap: TokenMap) -> tuple[torch.Tensor, TokenMap]:
        """Inside block i (when `merges_inside(i)`), after the attention residual and before
        the MLP: x (B, prefix + T, D) → (possibly fewer tokens, new map)."""
        return x, tmap

    def attn_bias(self, tmap: TokenMap) -> torch.Tensor | None:
        """An additive attention mask for the blocks (e.g. log token sizes), or None."""
        return None

    def static_tokens(self, grid: tuple[int, int]) -> int | None:
        """The patch-token count T at this grid when it does not depend on the input, else None.
        For a reducer that changes T between blocks: the count the encoder ends with."""
        return grid[0] * grid[1]

    def describe(self) -> dict:
        """What every output records of the reduction: `reducer`, `tokens` T and `reduction`
        1 − T/N at the crop, then the method's settings."""
        n = self.grid[0] * self.grid[1]
        t = self.static_tokens(self.grid)
        return {"reducer": self.name, "tokens": t, "reduction": None if t is None else 1 - t / n, **self.settings()}

    def settings(self) -> dict:
        return {}

    def policy_record(self) -> dict:
        """The reference's record of token sharing: policy `method`, S and U (no sharing here)."""
        n = self.grid[0] * self.grid[1]
        return {"method": "no_sharing", "num_shared": 0, "num_notshared": n}

    def generators(self) -> dict:
        """The random generators (per device) the method draws from; saved with training
        checkpoints so a resumed run draws the same."""
        return {}

    def reset(self, seed: int | None = None) -> None:
        """Restart the method's random draws (from `seed` when given)."""

    def label_dataset(self, name: str) -> None:
        """Told the dataset's name before a reducer that reads labels (`needs_labels`) runs."""

    def tag(self) -> str:
        """A short name for file names (e.g. `content_s103`)."""
        return self.name

    def summary(self) -> str:
        """One line for logs."""
        d = self.describe()
        n = self.grid[0] * self.grid[1]
        return f"reducer {self.name}: {d['tokens'] if d['tokens'] is not None else 'dynamic'} of {n} tokens"

    # ---------------------------------------------------------------- export (segm.export)
    def export_given(self, batch_size: int | None) -> torch.Tensor | None:
        """What an exported graph holds as `embed`'s `given` for batches of `batch_size`, or None
        (default): the graph computes its selection from the image. A method that must fix it at
        export (CTS's random scores) needs a fixed batch: for `batch_size` None (any batch) it
        raises ValueError saying why."""
        return None

    def export_outputs(self, tmap: TokenMap) -> dict[str, torch.Tensor]:
        """The graph outputs beside the logits that record a batch's reduction, in order, each
        (B, ...). Default none: a deployment then knows the token map only when T = N."""
        return {}

    def given_from_outputs(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The `given` under which eager makes the selection that `export_outputs` recorded (CTS:
        the graph's scores), for the export's parity check; None (default): the image alone."""
        return None
