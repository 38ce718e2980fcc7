"""Unreadable or mismatched weight files are named in one clear message."""
import pytest
import torch

from segm.model.vit import create_vit, load_pretrained_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_vit():
    return create_vit(64, 16, 32, 2, 1)


@pytest.mark.parametrize("name, content", [
    ("w.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"),
    ("w.npz", b"PK\x03\x04 truncated"),
    ("w.npz", b"plain text"),
])
def test_corrupt_pretrained_file_is_named(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot read pretrained weights {path}"):
        load_pretrained_vit(_tiny_vit(), str(path))


def test_pretrained_mismatch_names_the_keys(tmp_path):
    state = _tiny_vit().state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    state["extra.weight"] = torch.zeros(1)
    del state["norm.bias"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError) as info:
        load_pretrained_vit(_tiny_vit(), str(tmp_path / "w.pth"))
    message = str(info.value)
    assert "1 missing keys: norm.bias" in message
    assert "1 unexpected keys: extra.weight" in message
    assert "blocks.0.attn.qkv.weight (5, 5) in the file, (96, 32) in the model" in message


def test_checkpoint_that_does_not_fit_its_variant_names_the_keys(tmp_path):
    import segm
    from segm.model import build_net_kwargs, save_model

    net = build_net_kwargs("vit_tiny_patch16_384", "linear", 3, 64, n_layers=1)
    model = segm.create_segmenter(net)
    save_model(model, {"net_kwargs": net}, tmp_path / "ckpt.pth")
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    ckpt["model"]["decoder.head.weight"] = torch.zeros(7, 192)
    ckpt["model"].pop("encoder.norm.weight")
    torch.save(ckpt, tmp_path / "ckpt.pth")
    # a size the description gives against the weights' shapes, before the model is built
    with pytest.raises(ValueError, match=r"`net_kwargs` n_cls describe decoder.head.weight of shape \(3, 192\), "
                                         r"but ckpt.pth holds decoder.head.weight of shape \(7, 192\)"):
        segm.load_model(tmp_path / "ckpt.pth")
    ckpt["model"]["decoder.head.weight"] = torch.zeros(3, 192)
    ckpt["model"]["decoder.head.bias"] = torch.zeros(7)
    torch.save(ckpt, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError) as info:
        segm.load_model(tmp_path / "ckpt.pth")
    message = str(info.value)
    assert "missing keys: encoder.norm.weight" in message
    assert "decoder.head.bias (7,) in the file, (3,) in the model" in message


@pytest.mark.parametrize("change, fragment", [
    ({"d_model": "192"}, "`net_kwargs.d_model` must be an integer, got a string '192'"),
    ({"n_layers": 100000}, "`net_kwargs.n_layers` must be in 1..256, got 100000"),
    ({"d_model": 10**7}, "`net_kwargs.d_model` must be in 1..16384"),
    ({"n_layers": 2}, "`net_kwargs.n_layers` is 2, but ckpt.pth holds 1 blocks under encoder.blocks."),
    ({"d_model": 96, "n_heads": 3}, "`net_kwargs` d_model, patch_size describe encoder.patch_embed.proj.weight"),
    ({"n_heads": 5}, "`net_kwargs.n_heads` (5) must divide d_model (192)"),
    ({"image_size": [64, 64, 3]}, "`net_kwargs.image_size` must be a size or a [height, width] pair"),
    ({"decoder": 7}, "`net_kwargs.decoder` must be a decoder name or a mapping"),
    ({"decoder": {"name": "linear", "n_cls": "3"}}, "`net_kwargs.decoder.n_cls` must be an integer"),
    ({"policy_method": "best"}, "`net_kwargs.policy_method` must be one of"),
    ({"normalization": "imagenet"}, "`net_kwargs.normalization` must be one of"),
])
def test_a_checkpoint_description_is_checked_before_the_model_is_built(tmp_path, change, fragment):
    """A checkpoint's variant (a stranger's variant.yml) is checked field by field, and its sizes
    against the weights' shapes, before anything is allocated; keys this project does not read
    (a reference run records many) are ignored."""
    import segm
    from segm.config import dump_yaml
    from segm.model import build_net_kwargs, save_model

    net = build_net_kwargs("vit_tiny_patch16_384", "linear", 3, 64, n_layers=1)
    model = segm.create_segmenter(net)
    save_model(model, {"net_kwargs": net}, tmp_path / "ckpt.pth")
    dump_yaml({"net_kwargs": {**net, "from_the_reference": {"any": "thing"}}}, tmp_path / "variant.yml")
    segm.load_model(tmp_path / "ckpt.pth")  # unknown keys are ignored
    dump_yaml({"net_kwargs": {**net, **change}}, tmp_path / "variant.yml")
    with pytest.raises(ValueError) as info:
        segm.load_model(tmp_path / "ckpt.pth")
    assert str(info.value).startswith(f"{tmp_path / 'variant.yml'}: ") and fragment in str(info.value)
