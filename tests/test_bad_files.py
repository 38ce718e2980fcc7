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
    with pytest.raises(ValueError) as info:
        segm.load_model(tmp_path / "ckpt.pth")
    message = str(info.value)
    assert "missing keys: encoder.norm.weight" in message
    assert "decoder.head.weight (7, 192) in the file, (3, 192) in the model" in message
