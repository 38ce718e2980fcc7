"""`resize`, the lower-resolution competitor as a reducer: the encoder sees exactly the plain
model's tokens of the resized image, each base cell takes the token holding its centre, and
bad settings are refused in one line."""
import pytest
import torch
import torch.nn.functional as F

import segm
from segm.model.factory import reshare
from segm.model.reduction import ReductionError
from segm.model.reduction.resize import nearest_token
from tests.helpers.models import tiny_net_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cells_take_the_token_holding_their_centre():
    assert nearest_token((4, 4), (2, 2), "cpu").tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert nearest_token((4, 4), (3, 3), "cpu").view(4, 4)[:, 0].tolist() == [0, 3, 3, 6]  # centres 0.375, 1.125, 1.875, 2.625
    assert nearest_token((2, 2), (2, 2), "cpu").tolist() == [0, 1, 2, 3]


def test_the_encoder_sees_the_resized_image():
    net = {**tiny_net_kwargs("no_sharing"), "image_size": (128, 128), "policy_schedule": (64, 0)}
    torch.manual_seed(0)
    plain = segm.create_segmenter(net).eval()
    model, recorded = reshare(plain, net, "no_sharing", reducer={"name": "resize", "size": 96})
    assert recorded["reducer"] == {"name": "resize", "size": [96, 96]}
    assert model.describe_reduction() == {"reducer": "resize", "tokens": 36, "reduction": 1 - 36 / 64, "size": [96, 96]}
    im = torch.randn(2, 3, 128, 128)
    small = F.interpolate(im, size=(96, 96), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        feats, tmap = model.encode(im)
        want, _ = plain.encode(small)
        out = model.forward_all(im)
    assert torch.equal(feats, want) and tmap.num_tokens == 36 and out.logits.shape == (2, plain.n_cls, 128, 128)
    for bad, words in (({"name": "resize"}, "one setting, size"), ({"name": "resize", "size": 100}, "multiple of the patch"),
                       ({"name": "resize", "size": "big"}, "positive number of pixels"),
                       ({"name": "resize", "size": 4096}, "larger than the model's crop 128×128")):
        with pytest.raises(ReductionError, match=words):
            reshare(plain, net, "no_sharing", reducer=bad)
