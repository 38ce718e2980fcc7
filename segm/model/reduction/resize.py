"""The simplest competitor of every token reduction: fewer tokens from a lower input resolution
(docs/DESIGN.md, "Token reduction"). `--reducer resize:size=432` runs a model on its input
resized (bilinear, antialiased) to 432×432: 27×27 = 729 tokens instead of 32×32 = 1024 at 512,
about CTS's 30 %. Each base cell of the input's grid takes the class scores of the token whose
area holds its centre; the logits are upsampled to the input as usual.

This is a lower-resolution model without retraining, for evaluation and timing; a model
trained at the lower resolution is trained with `--im-size`/`--crop-size`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segm.model.reduction.base import Reducer, TokenMap, grid_pos_embed, grid_to_tokens
from segm.model.reduction.rules import ReductionError


def nearest_token(grid: tuple[int, int], coarse: tuple[int, int], device) -> torch.Tensor:
    """(N,) for each cell of `grid`, raster order, the cell of the `coarse` grid holding its centre."""
    rows = ((torch.arange(grid[0], device=device) + 0.5) * coarse[0] / grid[0]).long()
    cols = ((torch.arange(grid[1], device=device) + 0.5) * coarse[1] / grid[1]).long()
    return (rows.unsqueeze(1) * coarse[1] + cols.unsqueeze(0)).flatten()


class ResizeReducer(Reducer):
    name = "resize"
    unmerge_at = "scores"

    def __init__(self, grid, patch_size, size):
        super().__init__(grid, patch_size)
        self.size = tuple(size)
        if self.size[0] % patch_size or self.size[1] % patch_size:
            raise ReductionError(f"resize size {self.size[0]}×{self.size[1]} is not a multiple of the patch size "
                                 f"{patch_size}")
        crop = (self.grid[0] * patch_size, self.grid[1] * patch_size)
        if self.size[0] > crop[0] or self.size[1] > crop[1]:  # a reduction: never more tokens than the crop
            raise ReductionError(f"resize size {self.size[0]}×{self.size[1]} is larger than the model's crop "
                                 f"{crop[0]}×{crop[1]}: give a lower resolution")
        self.coarse = (self.size[0] // patch_size, self.size[1] // patch_size)

    @classmethod
    def from_description(cls, reduction, grid, patch_size, net):
        return cls(grid, patch_size, reduction.option("size"))

    def embed(self, vit, im, labels=None, given=None):
        grid = (im.shape[2] // self.patch_size, im.shape[3] // self.patch_size)
        small = F.interpolate(im, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        _, pos = grid_pos_embed(vit, self.coarse)
        x = vit.patch_embed.norm(grid_to_tokens(vit.patch_embed.proj(small))) + pos
        cells = nearest_token(grid, self.coarse, im.device).expand(im.shape[0], -1)
        return x, TokenMap(cells, grid, self.coarse[0] * self.coarse[1])

    def static_tokens(self, grid):
        return self.coarse[0] * self.coarse[1]

    def settings(self) -> dict:
        return {"size": list(self.size)}

    def tag(self) -> str:
        return f"resize{self.size[0]}" if self.size[0] == self.size[1] else f"resize{self.size[0]}x{self.size[1]}"
