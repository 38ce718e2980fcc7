"""ALGM as a reducer: its stages pinned on hand-made tokens (scores, τ inclusive, the batch
minimum and the batch-level threshold of the reference mode, token order, sizes, the composed
token map), then the model: merging identical tokens with size-weighted attention keeps the
unreduced model's logits, static mode is batch-independent, gradients flow through the means."""
import pytest
import torch

import segm
from segm.model.factory import reshare
from segm.model.reduction import ReductionError, algm
from segm.model.reduction.algm_rules import check_algm, static_counts
from segm.model.reduction.base import identity_map
from tests.helpers.models import tiny_net_kwargs

GRID = (4, 4)  # 16 cells, 4 windows: cells {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}


def _tokens(batch=1, d=16):
    """Orthogonal tokens (one-hot), one per cell: every window scores 0."""
    return torch.eye(d)[:16].expand(batch, 16, d).clone()


def _with_prefix(t):
    return torch.cat([torch.full((t.shape[0], 1, t.shape[2]), 0.5), t], 1)


def test_identical_windows_merge_and_orthogonal_ones_do_not():
    t = _tokens()
    t[0, [8, 9, 12, 13]] = torch.arange(16.0)  # window 2: four identical tokens
    scores, cells = algm.window_scores(t, identity_map(1, GRID, "cpu"))
    torch.testing.assert_close(scores, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    assert cells[0, 2].tolist() == [8, 9, 12, 13]
    x, tmap = algm.local_merge(_with_prefix(t), identity_map(1, GRID, "cpu"), 1, scores, cells)
    assert x.shape == (1, 1 + 13, 16) and tmap.num_tokens == 13
    torch.testing.assert_close(x[0, 1], torch.arange(16.0))  # the merged token comes first
    assert torch.equal(x[0, 2:], t[0, [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 14, 15]])  # the rest, ascending
    assert tmap.token_of_cell[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 9, 10, 0, 0, 11, 12]
    assert tmap.sizes[0].tolist() == [4] + [1] * 12


def test_merged_tokens_come_in_descending_score_and_are_size_weighted():
    t = _tokens()
    t[0, [0, 1, 4, 5]] = torch.tensor([1.0] + [0.0] * 15)  # identical: score 1
    t[0, [10, 11, 14]] = torch.tensor([0.0, 1.0] + [0.0] * 14)
    t[0, 15] = torch.tensor([0.0, 2.0, 1.0] + [0.0] * 13)  # window 3: similar, score < 1
    tmap = identity_map(1, GRID, "cpu")._replace(sizes=torch.arange(1.0, 17.0)[None])
    scores, cells = algm.window_scores(t, tmap)
    assert scores[0, 0] > scores[0, 3] > scores[0, 1]
    x, new = algm.local_merge(_with_prefix(t), tmap, 2, scores, cells)
    w = torch.tensor([11.0, 12, 15, 16])  # the sizes of cells 10, 11, 14, 15
    torch.testing.assert_close(x[0, 2], (t[0, [10, 11, 14, 15]] * w[:, None]).sum(0) / w.sum())
    assert new.token_of_cell[0, [0, 10]].tolist() == [0, 1]  # window 0 (score 1) first, then window 3
    assert new.sizes[0, :2].tolist() == [1 + 2 + 5 + 6, 11 + 12 + 15 + 16] and new.sizes.sum() == 136


def test_reference_mode_counts_inclusively_and_takes_the_batch_minimum():
    red = algm.AlgmReducer(GRID, 16, mode="reference", local_block=1, global_block=2)
    t = _tokens(2)
    t[:, [0, 1, 4, 5]] = torch.ones(16)  # both images: window 0 identical
    t[0, [2, 3, 6, 7]] = torch.ones(16)  # image 0: window 1 too
    scores, _ = algm.window_scores(t, identity_map(2, GRID, "cpu"))
    red.tau = float(scores[0, 1])  # exactly a window's score: it counts (≥)
    x, tmap = red.after_attention(0, _with_prefix(t), identity_map(2, GRID, "cpu"))
    assert tmap.num_tokens == 16 - 3  # image 0 alone would merge 2 windows; the batch minimum is 1
    alone, _ = red.after_attention(0, _with_prefix(t[:1]), identity_map(1, GRID, "cpu"))
    assert alone.shape[1] == 1 + 16 - 6


def test_global_stage_order_sizes_and_map():
    x = torch.eye(8)[None, :7].clone()  # prefix + 6 patch tokens; A = 0, 2, 4, 6; B = 1, 3, 5
    x[0, 4] = x[0, 3]  # A[2] matches B[1] exactly
    x[0, 6] = 0.9 * x[0, 5] + 0.1 * x[0, 1]  # A[3] matches B[2] well
    tmap = identity_map(1, (2, 3), "cpu")
    v, j = algm.best_matches(x)
    assert v[0, 0] == float("-inf") and j[0, 2] == 1 and j[0, 3] == 2
    out, new = algm.global_merge(x, tmap, 1, v, j)  # one merge: the best match, A[2] into B[1]
    assert torch.equal(out[0], x[0, [0, 2, 6, 1, 3, 5]])  # kept A ascending, then B
    assert new.token_of_cell[0].tolist() == [2, 0, 3, 3, 4, 1] and new.sizes[0].tolist() == [1, 1, 1, 2, 1]


def test_reference_threshold_is_batch_level():
    torch.manual_seed(0)
    xs = torch.randn(2, 9, 8)
    v, _ = algm.best_matches(xs)
    theta_batch = algm.reference_threshold(v, 5)
    rest = v[:, 1:]
    expected = rest.mean(1).mean() + rest.std(1, unbiased=True).mean() / 5
    torch.testing.assert_close(theta_batch, expected)
    theta_alone = algm.reference_threshold(v[:1], 5)
    assert not torch.equal(theta_batch, theta_alone)  # a companion moves image 0's threshold


def test_settings_are_checked_without_torch_and_static_counts():
    assert check_algm({}, (32, 32))["mode"] == "static"
    for bad, words in (({"mode": "fast"}, "mode"), ({"local_block": 5, "global_block": 5}, "local_block"),
                       ({"local_ratio": 1.5}, "local_ratio"), ({"size": 2}, "no setting")):
        with pytest.raises(ReductionError, match=words):
            check_algm(bad, (32, 32))
    with pytest.raises(ReductionError, match="even patch grid"):
        check_algm({}, (5, 4))
    assert static_counts((32, 32), 0.25, 0.15) == (64, 125)  # 1024 → 832 → 707 tokens at 512 px


def _model(layers=6, crop=64):
    net = {**tiny_net_kwargs("no_sharing"), "n_layers": layers, "image_size": (crop, crop),
           "policy_schedule": ((crop // 16) ** 2, 0)}
    torch.manual_seed(0)
    return segm.create_segmenter(net).eval(), net


def test_merging_identical_tokens_keeps_the_logits_with_size_weighted_attention():
    plain, net = _model()
    with torch.no_grad():
        plain.encoder.pos_embed.zero_()  # a constant image: every patch token is the same
    model, _ = reshare(plain, net, "no_sharing",
                       reducer={"name": "algm", "local_ratio": 0.5, "global_ratio": 0.3, "prop_attn": True})
    im = torch.full((2, 3, 64, 64), 0.3)
    with torch.no_grad():
        out = model.forward_all(im)
        ref = plain(im)
    assert out.token_map.num_tokens == model.reducer.static_tokens(model.grid) < 16
    assert out.token_map.sizes.sum(1).tolist() == [16, 16]
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy, s", [("no_sharing", None), ("content", 1)])
def test_static_mode_is_batch_independent_and_has_static_shapes(policy, s):
    """Each image's output, alone and beside any companions (a constant image, its own copy,
    other random images), is the same bit for bit (one intra-op thread, as the tests run)."""
    plain, net = _model()
    model, _ = reshare(plain, net, policy, num_shared=s, reducer={"name": "algm"})
    im = torch.randn(3, 3, 64, 64)
    batches = [im, im.flip(0), torch.cat([torch.full((1, 3, 64, 64), 0.3), im[:1], im[:1]])]
    with torch.no_grad():
        alone = [model.forward_all(im[i : i + 1]) for i in range(3)]
        for batch in batches:
            out = model.forward_all(batch)
            assert out.token_map.num_tokens == model.reducer.static_tokens(model.grid)
            for j in range(batch.shape[0]):
                i = next((i for i in range(3) if torch.equal(batch[j], im[i])), None)
                if i is not None:
                    assert torch.equal(alone[i].token_map.token_of_cell[0], out.token_map.token_of_cell[j])
                    assert torch.equal(alone[i].logits[0], out.logits[j])


def test_gradients_flow_through_the_weighted_means():
    t = _tokens().requires_grad_()
    scores, cells = algm.window_scores(t.detach(), identity_map(1, GRID, "cpu"))  # all 0: the stable order picks window 0
    x, _ = algm.local_merge(_with_prefix(t), identity_map(1, GRID, "cpu"), 1, scores, cells)
    x[0, 1].sum().backward()
    expected = torch.zeros(16)
    expected[[0, 1, 4, 5]] = 0.25  # d mean / d token; the selection itself is not differentiated
    torch.testing.assert_close(t.grad[0].sum(1), expected * 16)
    plain, net = _model()
    model, _ = reshare(plain, net, "no_sharing", reducer={"name": "algm"})
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.blocks[0].parameters())


def test_a_global_block_past_the_encoder_is_refused_and_file_names_name_the_settings():
    plain, net = _model(layers=2)
    with pytest.raises(ReductionError, match="global_block 5 is past the encoder's 2 blocks"):
        reshare(plain, net, "no_sharing", reducer={"name": "algm"})
    model, _ = reshare(plain, net, "no_sharing", reducer={"name": "algm", "global_block": 2, "prop_attn": True})
    assert model.reducer.tag() == "algm_static_global_block2_prop_attnTrue"
    assert model.reducer.summary() == "ALGM static: tokens 16 → 13 → 11 (blocks 1, 2)"
