"""CTS core: token budgets, selection, token order, pooling, position embeddings, unsharing."""
import pytest
import torch
import torch.nn.functional as F

from segm.model.reduction import cts
from tests.helpers.reference_cts import ref_images_to_patches, ref_masks, ref_unshare


@pytest.mark.parametrize(
    "crop,u,s,tokens",
    [(512, 612, 103, 715), (480, 540, 90, 630), (640, 960, 160, 1120), (768, 960, 336, 1296)],
)
def test_reference_token_counts(crop, u, s, tokens):
    grid = (crop // 16, crop // 16)
    assert cts.resolve_token_budget(grid, "policy_net", num_shared=s, num_notshared=u) == (u, s)
    layout = cts.layout_from_scores(torch.rand(2, (crop // 32) ** 2), s, grid)
    assert layout.num_tokens == tokens
    assert layout.base_idx.shape == (2, u) and layout.shared_idx.shape == (2, s)
    mask1, mask2 = layout.masks()
    assert mask1.sum(dim=(1, 2)).tolist() == [u, u] and mask2.sum(dim=(1, 2)).tolist() == [s, s]


def test_token_reduction_derives_s():
    assert cts.resolve_token_budget((30, 30), "policy_net", token_reduction=0.3) == (540, 90)
    assert cts.resolve_token_budget((40, 40), "random", token_reduction=0.3) == (960, 160)
    assert cts.resolve_token_budget((48, 48), "policy_net", token_reduction=0.4375) == (960, 336)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_shared=103, num_notshared=600), "U must be N − 4S = 612"),
        (dict(num_shared=257), "out of range"),
        (dict(num_shared=-1), "out of range"),
        (dict(), "needs a token budget"),
        (dict(num_shared=100, token_reduction=0.3), "give only one"),
    ],
)
def test_bad_budgets_raise_clear_errors(kwargs, match):
    with pytest.raises(cts.TokenBudgetError, match=match):
        cts.resolve_token_budget((32, 32), "policy_net", **kwargs)


def test_odd_grid_and_no_sharing_budget_errors():
    with pytest.raises(cts.TokenBudgetError, match="even patch grid"):
        cts.resolve_token_budget((31, 32), "policy_net", num_shared=10)
    with pytest.raises(cts.TokenBudgetError, match="no_sharing"):
        cts.resolve_token_budget((32, 32), "no_sharing", num_shared=10)
    assert cts.resolve_token_budget((31, 31), "no_sharing") == (961, 0)


def test_selection_and_order_match_reference():
    torch.manual_seed(0)
    grid = (8, 12)
    scores = torch.rand(3, 4 * 6)
    layout = cts.layout_from_scores(scores, 7, grid)
    mask1, mask2 = layout.masks()
    ref1, ref2 = ref_masks(scores, 7, grid)
    assert torch.equal(mask1, ref1) and torch.equal(mask2, ref2)
    # the S best-scored superpatches are shared
    top = scores.topk(7, dim=1).indices.sort(dim=1).values
    assert torch.equal(layout.shared_idx, top)
    # order: non-shared raster over the base grid, then shared raster over the superpatch grid
    x = torch.arange(8 * 12).float().view(1, 1, 8, 12).expand(3, 1, 8, 12)
    _, code = ref_images_to_patches(x, 1, ref1, ref2)
    assert torch.equal(layout.policy_code(), code)
    assert (layout.base_idx.diff(dim=1) > 0).all() and (layout.shared_idx.diff(dim=1) > 0).all()


def test_mixed_patches_embedded_equal_conv_then_select():
    """The segmenter embeds only the selected patches (a matrix product with the conv weight);
    this equals the reference route: embed the image and its 2×2 pool, then select tokens."""
    torch.manual_seed(0)
    p, grid = 4, (6, 8)
    im = torch.randn(2, 3, grid[0] * p, grid[1] * p)
    layout = cts.layout_from_scores(torch.rand(2, 12), 5, grid)
    pixels = cts.mixed_patches(im, layout, p)
    mask1, mask2 = layout.masks()
    ref_patches, _ = ref_images_to_patches(im, p, mask1, mask2)
    torch.testing.assert_close(pixels, ref_patches.flatten(2), rtol=0, atol=1e-6)
    conv = torch.nn.Conv2d(3, 7, p, p)
    with torch.no_grad():
        want = cts.mix_tokens(cts.grid_to_tokens(conv(im)), cts.grid_to_tokens(conv(F.avg_pool2d(im, 2))), layout)
        got = F.linear(pixels, conv.weight.flatten(1), conv.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_shared_token_is_avg_pool_of_block_and_pos_is_mean_of_four():
    torch.manual_seed(0)
    p, grid = 4, (6, 8)
    im = torch.randn(2, 3, grid[0] * p, grid[1] * p)
    layout = cts.layout_from_scores(torch.rand(2, 12), 5, grid)
    # patches through the real pipeline: pixel "embedding" = identity conv of the flattened patch
    conv = torch.nn.Conv2d(3, 3 * p * p, p, p, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3 * p * p).view(3 * p * p, 3, p, p))
    base = cts.grid_to_tokens(conv(im))
    pooled = cts.grid_to_tokens(conv(F.avg_pool2d(im, 2)))
    tokens = cts.mix_tokens(base, pooled, layout).detach()
    mask1, mask2 = layout.masks()
    ref_patches, _ = ref_images_to_patches(im, p, mask1, mask2)
    torch.testing.assert_close(tokens, ref_patches.flatten(2), rtol=0, atol=1e-5)
    # a shared token is exactly the 2×2 average pool of its 2p×2p block
    b, j = 1, 0
    sp = layout.shared_idx[b, j].item()
    r, c = 2 * (sp // (grid[1] // 2)), 2 * (sp % (grid[1] // 2))
    block = im[b, :, r * p : (r + 2) * p, c * p : (c + 2) * p]
    u = layout.base_idx.shape[1]
    torch.testing.assert_close(tokens[b, u + j], F.avg_pool2d(block, 2).flatten(), rtol=0, atol=1e-6)
    # position embedding: own cell or the mean of the four cells
    pos = torch.randn(1, grid[0] * grid[1], 7)
    mixed = cts.mix_tokens(pos, cts.pool_grid(pos, grid), layout)
    cells = pos[0].view(*grid, 7)
    torch.testing.assert_close(mixed[b, u + j], cells[r : r + 2, c : c + 2].mean(dim=(0, 1)))
    i = layout.base_idx[b, 3].item()
    assert torch.equal(mixed[b, 3], cells[i // grid[1], i % grid[1]])


def test_unshare_writes_each_score_to_its_cells():
    torch.manual_seed(0)
    grid = (6, 10)
    layout = cts.layout_from_scores(torch.rand(2, 15), 4, grid)
    scores = torch.randn(2, layout.num_tokens, 5)
    out = cts.unshare(scores, layout)
    assert out.shape == (2, 5, 6, 10)
    assert torch.equal(out, ref_unshare(scores, layout.policy_code(), grid))
    u = layout.base_idx.shape[1]
    for j in range(4):
        sp = layout.shared_idx[0, j].item()
        r, c = 2 * (sp // 5), 2 * (sp % 5)
        assert torch.equal(out[0, :, r : r + 2, c : c + 2], scores[0, u + j][:, None, None].expand(5, 2, 2))


def test_layout_is_on_device_and_batch_vectorised():
    scores = torch.rand(4, 64)
    layout = cts.layout_from_scores(scores, 10, (16, 16))
    for i in range(4):
        single = cts.layout_from_scores(scores[i : i + 1], 10, (16, 16))
        assert torch.equal(single.token_of_cell[0], layout.token_of_cell[i])
