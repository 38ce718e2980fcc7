"""A literal, slow re-implementation of the reference CTS code paths, used only to
pin the fast implementation: per-sample Python loops, boolean indexing, bilinear ×0.5 resize,
the strip through the patch-embedding conv, and unsharing from `policy_code`."""
import torch
import torch.nn.functional as F


def ref_masks(scores: torch.Tensor, num_shared: int, grid):
    """scores (B, n2) → mask1 (B, Gh, Gw), mask2 (B, Gh/2, Gw/2) as the reference builds them."""
    gh, gw = grid
    b = scores.shape[0]
    mask2 = torch.zeros(b, (gh // 2) * (gw // 2), dtype=torch.bool)
    for i in range(b):
        order = torch.sort(scores[i], descending=True, stable=True).indices
        mask2[i, order[:num_shared]] = True
    mask2 = mask2.view(b, gh // 2, gw // 2)
    mask1 = ~F.interpolate(mask2[:, None].float(), scale_factor=2, mode="nearest")[:, 0].bool()
    return mask1, mask2


def ref_images_to_patches(x: torch.Tensor, p: int, mask1, mask2):
    """x (B, C, H, W) → patches (B, T, C, p, p), policy_code (B, T, 3)."""
    b, c, h, w = x.shape
    s1 = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5)  # B, Gh, Gw, C, p, p
    x2 = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    s2 = x2.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5)
    gh, gw = h // p, w // p
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    patches, codes = [], []
    for i in range(b):
        m1, m2 = mask1[i], mask2[i]
        c1 = torch.stack([torch.ones_like(rows[m1]), rows[m1], cols[m1]], -1)
        r2, q2 = torch.meshgrid(torch.arange(gh // 2), torch.arange(gw // 2), indexing="ij")
        c2 = torch.stack([torch.full_like(r2[m2], 2), 2 * r2[m2], 2 * q2[m2]], -1)
        patches.append(torch.cat([s1[i][m1], s2[i][m2]]))
        codes.append(torch.cat([c1, c2]).float())
    return torch.stack(patches), torch.stack(codes)


def ref_embed(conv: torch.nn.Conv2d, patches: torch.Tensor):
    """patches (B, T, C, p, p) laid side by side as a strip (B, C, p, T·p) through the conv."""
    b, t, c, p, _ = patches.shape
    strip = patches.permute(0, 2, 3, 1, 4).reshape(b, c, p, t * p)
    return conv(strip).flatten(2).transpose(1, 2)


def ref_unshare(scores: torch.Tensor, code: torch.Tensor, grid):
    """scores (B, T, K), policy_code (B, T, 3) → (B, K, Gh, Gw)."""
    b, t, k = scores.shape
    gh, gw = grid
    out = torch.full((b, k, gh, gw), float("nan"))
    for i in range(b):
        for j in range(t):
            scale, r, c = (int(v) for v in code[i, j])
            out[i, :, r : r + scale, c : c + scale] = scores[i, j][:, None, None]
    return out


def ref_forward(model, im: torch.Tensor, scores: torch.Tensor):
    """The whole CTS forward as the reference writes it, for a model without padding."""
    vit = model.encoder
    p = model.patch_size
    grid = model.grid
    mask1, mask2 = ref_masks(scores, model.reducer.num_shared, grid)
    patches, code = ref_images_to_patches(im, p, mask1, mask2)
    x = ref_embed(vit.patch_embed.proj, patches)
    npt = vit.num_prefix_tokens
    pos_grid = vit.pos_embed[:, npt:].transpose(1, 2).reshape(1, -1, *grid).expand(im.shape[0], -1, -1, -1)
    pos, _ = ref_images_to_patches(pos_grid, 1, mask1, mask2)
    x = x + pos.flatten(2)
    prefix = vit.cls_token + vit.pos_embed[:, :1]
    x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], 1)
    for blk in vit.blocks:
        x = blk(x)
    x = vit.norm(x)[:, npt:]
    masks = ref_unshare(model.decoder(x), code, grid)
    logits = F.interpolate(masks, size=im.shape[2:], mode="bilinear", align_corners=False)
    return logits, code, (mask1, mask2)
