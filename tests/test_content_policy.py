"""Training-free content policies: ranking on hand-made images, raster order, batch and dtype."""
import pytest
import torch

from segm.model.reduction import content_policy as cp
from segm.model.reduction.cts import layout_from_scores, select_shared

_G = torch.Generator().manual_seed(0)
W_EMB, B_EMB = torch.randn(8, 3, 16, 16, generator=_G) * 0.05, torch.randn(8, generator=_G)

SCORES = {
    "colour_spread": cp.colour_spread_score,
    "colour_spread_pool4": lambda x: cp.colour_spread_score(x, pool=4),
    "colour_spread_pool8": lambda x: cp.colour_spread_score(x, pool=8),
    "gradient": cp.gradient_score,
    "gradient_pool4": lambda x: cp.gradient_score(x, pool=4),
    "embedding_variance": lambda x: cp.embedding_score(x, W_EMB, B_EMB),
    "embedding_cosine": lambda x: cp.embedding_score(x, W_EMB, B_EMB, metric="cosine"),
}
ALL = pytest.mark.parametrize("name", list(SCORES))
RED, BLUE = torch.tensor([0.8, -0.6, -0.4]), torch.tensor([-0.7, -0.2, 0.9])


def flat(colour, h=64, w=96):
    """(1, 3, h, w) image of one colour: a 2×3 superpatch grid by default."""
    return colour.view(1, 3, 1, 1).expand(1, 3, h, w).clone()


def paint(im, r, c, kind):
    """Puts a non-uniform 32×32 block at superpatch (r, c)."""
    blk = im[0, :, 32 * r:32 * r + 32, 32 * c:32 * c + 32]
    if kind == "split":  # two colours, left half / right half
        blk[:, :, 16:] = BLUE.view(3, 1, 1)
    elif kind == "ramp":  # a smooth horizontal colour gradient
        blk += torch.linspace(-0.5, 0.5, 32).view(1, 1, 32)
    elif kind == "corner":  # a small object not aligned to any patch or pool cell
        blk[:, 5:14, 9:19] = BLUE.view(3, 1, 1)
    return im


@ALL
@pytest.mark.parametrize("kind", ["split", "ramp", "corner"])
def test_uniform_block_scores_highest_and_others_strictly_lower(name, kind):
    s = SCORES[name](paint(flat(RED), 0, 1, kind))[0]
    assert s.dtype == torch.float32
    assert torch.all(s[[0, 2, 3, 4, 5]] == 0)  # uniform blocks: exactly the maximum
    assert s[1] < 0


@ALL
def test_uniform_is_exactly_zero_for_any_colour(name):
    colours = torch.rand(20, 3, 1, 1, generator=_G) * 2 - 1
    s = SCORES[name](colours.expand(20, 3, 64, 64).contiguous())
    assert torch.all(s == 0)


@pytest.mark.parametrize("name", ["colour_spread", "gradient"])
def test_edges_on_block_borders_do_not_leak(name):
    im = flat(RED)
    im[..., 32:] = BLUE.view(1, 3, 1, 1)
    im[..., 32:, :] = 0.1
    assert torch.all(SCORES[name](im) == 0)


def test_more_spread_scores_lower():
    a, b = paint(flat(RED), 0, 0, "ramp"), paint(flat(RED), 0, 0, "ramp")
    b[0, :, :32, :32] = RED.view(3, 1, 1) + 2 * (b[0, :, :32, :32] - RED.view(3, 1, 1))  # steeper ramp
    for name in ("colour_spread", "gradient", "embedding_variance"):
        assert SCORES[name](b)[0, 0] < SCORES[name](a)[0, 0] < 0, name


@ALL
@pytest.mark.parametrize("rc", [(0, 0), (0, 2), (1, 0), (1, 2)])
def test_shape_and_raster_order(name, rc):
    r, c = rc
    s = SCORES[name](paint(flat(RED, 64, 96), r, c, "split"))
    assert s.shape == (1, 6)
    lowered = (s[0] < 0).nonzero().flatten().tolist()
    assert lowered == [r * 3 + c]


@ALL
def test_batch_equals_each_image_alone(name):
    x = torch.rand(3, 3, 64, 128, generator=_G) * 2 - 1
    x[1, :, :32, :32] = 0.25  # one uniform block
    batch = SCORES[name](x)
    alone = torch.cat([SCORES[name](x[i:i + 1]) for i in range(3)])
    assert torch.equal(batch, alone)
    assert batch[1, 0] == 0 and torch.all(batch[1, 1:] < 0)


@ALL
def test_float32_under_bf16_autocast(name):
    x = paint(flat(RED), 1, 1, "ramp")
    ref = SCORES[name](x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = SCORES[name](x)
        got_bf16_input = SCORES[name](x.bfloat16())
    assert got.dtype == got_bf16_input.dtype == torch.float32
    assert torch.equal(got, ref)
    assert got_bf16_input[0, 4] < 0 and torch.all(got_bf16_input[0, [0, 1, 2, 3, 5]] == 0)


def test_ties_go_to_the_lower_raster_index():
    im = flat(RED, 64, 128)  # 2×4 superpatches, all uniform → all tied at 0
    for r, c in [(0, 0), (0, 2), (1, 1)]:
        paint(im, r, c, "ramp")
    s = cp.colour_spread_score(im)
    assert select_shared(s, 3).tolist() == [[1, 3, 4]]  # first three of the tied 1, 3, 4, 6, 7
    assert select_shared(cp.colour_spread_score(flat(RED, 64, 128)), 2).tolist() == [[0, 1]]
    layout = layout_from_scores(s, 3, (4, 8))
    assert layout.shared_idx.tolist() == [[1, 3, 4]]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="multiple of 32"):
        cp.colour_spread_score(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match="pool must divide"):
        cp.gradient_score(torch.zeros(1, 3, 64, 64), pool=3)
    with pytest.raises(ValueError, match="metric"):
        cp.embedding_score(torch.zeros(1, 3, 64, 64), W_EMB, B_EMB, metric="l1")
    with pytest.raises(ValueError, match="16×16"):
        cp.embedding_score(torch.zeros(1, 3, 64, 64), torch.zeros(8, 3, 8, 8))


def test_registry_default_scores_images():
    s = cp.CONTENT_SCORES[cp.DEFAULT_CONTENT_SCORE](paint(flat(RED), 1, 2, "corner"))
    assert s.shape == (1, 6) and (s[0] < 0).nonzero().flatten().tolist() == [5]
