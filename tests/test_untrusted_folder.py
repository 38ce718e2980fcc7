"""A shared model folder from a stranger (issue 21, part A): every bad folder of the table is
refused with one line naming the file and the field, both by `segm.load_model` and by the
commands that load a model (no traceback, nothing written); loading reads nothing outside the
folder (no path, no model name, no network) and allocates no more than the weights fill."""
from __future__ import annotations

import hashlib
import json
import resource
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner

import segm
from segm.model.hub import share_model
from tests.helpers.models import make_model_dir, tiny_variant

pytestmark = pytest.mark.usefixtures("one_thread")

# Paths no load may open (the audit hook below watches every Python-level open).
_FORBIDDEN: set = set()
_OPENED: list = []


def _audit(event, args):
    if event == "open" and _FORBIDDEN and args and isinstance(args[0], (str, bytes, Path)):
        path = Path(args[0].decode() if isinstance(args[0], bytes) else args[0])
        if path.resolve() in _FORBIDDEN:
            _OPENED.append(str(path))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def shared(synthetic_root, tmp_path_factory):
    """Good shared folders (random and policy_net policies), the images to segment, and a file
    a bad config may name (it must never be opened)."""
    w = tmp_path_factory.mktemp("untrusted")
    _, model, variant = make_model_dir(w / "random", synthetic_root, policy_method="random")
    out = {"random": share_model(model, variant, w / "shared_random")}
    variant = tiny_variant(synthetic_root, "policy_net")
    model = segm.create_segmenter(variant["net_kwargs"], policy_ckpt_required=False)
    out["policy_net"] = share_model(model, variant, w / "shared_policy_net")
    (w / "images").mkdir()
    shutil.copy(next((synthetic_root / "images" / "validation").iterdir()), w / "images")
    torch.save({"model": {}}, w / "secret.pth")
    out["world"] = w
    return out


# --------------------------------------------------------------------------- mutations
def _config(edit: Callable[[dict], None]):
    def mutate(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return mutate


def _net(**changes):
    return _config(lambda c: c["variant"]["net_kwargs"].update(changes))


def _text(text: str | bytes):
    def mutate(folder: Path):
        data = text.encode() if isinstance(text, str) else text
        (folder / "config.json").write_bytes(data)
    return mutate


def _replace(old: str, new: str):
    def mutate(folder: Path):
        (folder / "config.json").write_text((folder / "config.json").read_text().replace(old, new, 1))
    return mutate


def _weights(edit: Callable[[dict], None]):
    def mutate(folder: Path):
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        edit(state)
        save_file(state, str(folder / "model.safetensors"))
    return mutate


def _remove(*names):
    def mutate(folder: Path):
        for name in names:
            (folder / name).unlink()
    return mutate


def _truncate(folder: Path):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:999])


def _only_pickle(folder: Path):
    _remove("model.safetensors", "config.json")(folder)
    torch.save({}, folder / "pytorch_model.bin")


def _classes(n: int):
    def edit(c):
        net = c["variant"]["net_kwargs"]
        net["n_cls"] = net["decoder"]["n_cls"] = n
        c["palette"] = [[0, 0, 0]] * n
        c["class_names"] = None
    return edit


def _crop(size: int):
    """A larger crop, with the budget and summary that go with it (U = N − 4S)."""
    def edit(c):
        n = (size // 16) ** 2
        c["variant"]["net_kwargs"].update(image_size=[size, size], policy_schedule=[n - 8, 2])
        c["crop_size"] = [size, size]
        c["policy"]["num_notshared"] = n - 8
    return edit


def _algm_at_block(block: int):
    def edit(c):
        c["variant"]["net_kwargs"]["reducer"] = {"name": "algm", "local_block": 1, "global_block": block}
        c["reducer"] = {"reducer": "algm"}
    return edit


def _del(*keys):
    def edit(c):
        obj = c
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]
    return edit


def _set(value, *keys):
    def edit(c):
        obj = c
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
    return edit


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable
    fragment: str
    policy: str = "random"


CFG = "config.json: "
NET = CFG + "`variant.net_kwargs."
CLOSED = "names a file or model outside the folder"
CASES = [
    # what is missing
    Case("no-config", _remove("config.json"), "has no config.json"),
    Case("no-weights", _remove("model.safetensors"), "has no model.safetensors"),
    Case("only-pickle", _only_pickle, "pytorch_model.bin is a pickle and is never loaded"),
    # the JSON itself
    Case("not-json", _text("{not json"), "config.json is not valid JSON"),
    Case("deep-nesting", _text("[" * 100_000 + "]" * 100_000), "config.json nests deeper than 8 levels"),
    Case("nesting-past-the-schema", _config(_set([[[[[[[["x"]]]]]]]], "class_names")),
         "config.json nests deeper than 8 levels"),
    Case("many-repeated-keys", _text("{" + ",".join(f'"{i % 30000}":0' for i in range(60_000)) + "}"),
         "key '0' appears twice"),
    Case("not-an-object", _text("[1, 2]"), "must hold a JSON object, got a list"),
    Case("nan-constant", _replace('"dropout": 0.0', '"dropout": NaN'), "NaN is not a number JSON allows"),
    Case("repeated-key", _replace('"format"', '"format": 1, "format"'), "key 'format' appears twice"),
    Case("huge", _text('{"pad": "' + "x" * (2 << 20) + '"}'), "is larger than 1024 KB"),
    Case("not-utf8", _text(b'{"format": "\xff"}'), "is not UTF-8 text"),
    # the top level
    Case("unknown-top-key", _config(_set(1, "extra")), CFG + "`extra` is not a known field"),
    Case("wrong-format", _config(_set("other/1", "format")), CFG + "`format` must be 'segm-cts-model/1'"),
    Case("no-variant", _config(_del("variant")), CFG + "`variant` is missing"),
    Case("variant-not-mapping", _config(_set("x", "variant")), CFG + "`variant` must be a mapping, got a string"),
    Case("no-net-kwargs", _config(_del("variant", "net_kwargs")), CFG + "`variant.net_kwargs` is missing"),
    Case("unknown-variant-key", _config(_set({}, "variant", "optimizer_kwargs")),
         CFG + "`variant.optimizer_kwargs` is not a known field"),
    # sizes: types and ranges
    Case("n-layers-negative", _net(n_layers=-1), NET + "n_layers` must be in 1..256, got -1"),
    Case("patch-size-zero", _net(patch_size=0), NET + "patch_size` must be in 1..64, got 0"),
    Case("d-model-huge", _net(d_model=10**7), NET + "d_model` must be in 1..16384"),
    Case("n-layers-huge", _net(n_layers=100000), NET + "n_layers` must be in 1..256"),
    Case("d-model-string", _net(d_model="64"), NET + "d_model` must be an integer, got a string '64'"),
    Case("d-model-bool", _net(d_model=True), NET + "d_model` must be an integer"),
    Case("image-size-strings", _net(image_size=["64", "64"]), NET + "image_size` must be an integer"),
    Case("image-size-three", _net(image_size=[64, 64, 64]), NET + "image_size` must be a size or a [height, width]"),
    Case("dropout-range", _net(dropout=2.0), NET + "dropout` must be in [0, 1]"),
    Case("layer-norm-eps-zero", _net(layer_norm_eps=0), NET + "layer_norm_eps` must be in (0, 1]"),
    Case("distilled-string", _net(distilled="yes"), NET + "distilled` must be true or false"),
    Case("heads-do-not-divide", _net(n_heads=3), NET + "n_heads` (3) must divide d_model (64)"),
    Case("unknown-net-key", _net(foo=1), NET + "foo` is not a known field"),
    Case("decoder-not-mapping", _net(decoder="linear"), NET + "decoder` must be a mapping"),
    Case("decoder-no-name", _config(_del("variant", "net_kwargs", "decoder", "name")),
         NET + "decoder.name` is missing"),
    Case("decoder-unknown", _config(_set("unet", "variant", "net_kwargs", "decoder", "name")),
         NET + "decoder.name` must be one of linear, mask_transformer"),
    Case("decoder-classes", _config(_set(11, "variant", "net_kwargs", "decoder", "n_cls")),
         NET + "decoder.n_cls` (11) must equal n_cls (10)"),
    Case("policy-method-unknown", _net(policy_method="magic"), NET + "policy_method` must be one of"),
    Case("schedule-wrong", _net(policy_schedule=[9, 2]), CFG + "`variant.net_kwargs` does not describe a model"),
    Case("crop-not-superpatches", _net(image_size=[48, 48], policy_schedule=[None, 1]),
         CFG + "`variant.net_kwargs` does not describe a model"),
    Case("reducer-not-mapping", _net(reducer="algm"), NET + "reducer` must be a mapping with a `name`"),
    Case("reducer-unknown", _net(reducer={"name": "magic"}), "unknown reducer 'magic'"),
    Case("reducer-past-the-encoder", _config(_algm_at_block(5)),
         CFG + "`variant.net_kwargs` does not describe a model: algm's global_block 5 is past the encoder's 2"),
    Case("window-negative", _config(_set(-5, "variant", "inference_kwargs", "window_size")),
         CFG + "`variant.inference_kwargs.window_size` must be in 1..8192"),
    Case("dataset-normalization", _config(_set("imagenet", "variant", "dataset_kwargs", "normalization")),
         CFG + "`variant.dataset_kwargs.normalization` must be one of"),
    # closed: no path, no model name
    Case("pretrained-file", _net(pretrained="{w}/secret.pth"), NET + "pretrained` " + CLOSED),
    Case("pretrained-timm-name", _net(pretrained="vit_small_patch16_384.augreg_in21k_ft_in1k"),
         NET + "pretrained` " + CLOSED),
    Case("policynet-ckpt-file", _net(policynet_ckpt="{w}/secret.pth"), NET + "policynet_ckpt` " + CLOSED,
         policy="policy_net"),
    Case("policynet-ckpt-relative", _net(policynet_ckpt="secret.pth"), NET + "policynet_ckpt` " + CLOSED,
         policy="policy_net"),
    Case("data-root", _config(_set("{w}", "variant", "dataset_kwargs", "data_root")),
         CFG + "`variant.dataset_kwargs.data_root` " + CLOSED),
    Case("classes-file", _config(_set("{w}/secret.pth", "variant", "dataset_kwargs", "classes_file")),
         CFG + "`variant.dataset_kwargs.classes_file` " + CLOSED),
    Case("policy-backbone-hub", _net(policy_backbone="hf-hub:timm/efficientnet_lite0"),
         NET + "policy_backbone` must be a plain name", policy="policy_net"),
    Case("policy-backbone-other", _net(policy_backbone="resnet18"),
         NET + "policy_backbone` 'resnet18' has policy_net.", policy="policy_net"),
    # classes and the summary fields
    Case("palette-short", _config(lambda c: c["palette"].pop()), CFG + "`palette` must list 10 colours"),
    Case("palette-out-of-range", _config(_set([300, 0, 0], "palette", 0)), CFG + "`palette[0]` must be [r, g, b]"),
    Case("palette-string", _config(_set("red", "palette", 3)), CFG + "`palette[3]` must be [r, g, b]"),
    Case("palette-missing", _config(_del("palette")), CFG + "`palette` is missing"),
    Case("class-names-short", _config(_set(["a"], "class_names")), CFG + "`class_names` must list 10 names"),
    Case("class-name-number", _config(_set([1] * 10, "class_names")), CFG + "`class_names[0]` must be a string"),
    Case("crop-size-disagrees", _config(_set([32, 32], "crop_size")), CFG + "`crop_size` must be the model's crop"),
    Case("policy-disagrees", _config(_set(3, "policy", "num_shared")), CFG + "`policy` must agree with net_kwargs"),
    Case("normalization-disagrees", _config(_set([0, 0, 0], "normalization", "mean")),
         CFG + "`normalization` must be"),
    Case("dataset-disagrees", _config(_set("ade20k", "dataset")), CFG + "`dataset` ('ade20k') must equal"),
    Case("reducer-disagrees", _config(_set("algm", "reducer", "reducer")),
         CFG + "`reducer` must describe the model's reducer 'cts'"),
    # sizes against the weights (the header), before anything is built
    Case("width-against-weights", _net(d_model=16384, n_heads=16),
         "describe encoder.patch_embed.proj.weight of shape (16384, 3, 16, 16), but model.safetensors holds"),
    Case("depth-against-weights", _net(n_layers=256), NET + "n_layers` is 256, but model.safetensors holds 2 blocks"),
    Case("classes-against-weights", _config(_classes(11)), "describe decoder.head.weight of shape (11, 64)"),
    Case("crop-against-weights", _config(_crop(128)), "describe encoder.pos_embed of shape (1, 65, 64)"),
    Case("mlp-against-weights", _net(d_ff=100000), "describe encoder.blocks.0.mlp.fc1.weight of shape (100000, 64)"),
    # the weights themselves
    Case("weights-int64", _weights(lambda s: s.update({"decoder.head.weight": s["decoder.head.weight"].long()})),
         "model.safetensors: tensor decoder.head.weight is I64, the model holds torch.float32"),
    Case("weights-bool", _weights(lambda s: s.update({"encoder.norm.weight": s["encoder.norm.weight"] > 0})),
         "model.safetensors: tensor encoder.norm.weight is BOOL"),
    Case("weights-nan", _weights(lambda s: s["encoder.blocks.1.attn.qkv.weight"].__setitem__((0, 0), float("nan"))),
         "model.safetensors: tensor encoder.blocks.1.attn.qkv.weight holds NaN or infinite values"),
    Case("weights-inf", _weights(lambda s: s["decoder.head.bias"].__setitem__(0, float("inf"))),
         "tensor decoder.head.bias holds NaN or infinite values"),
    Case("weights-missing", _weights(lambda s: s.pop("decoder.head.bias")), "1 missing keys: decoder.head.bias"),
    Case("weights-extra", _weights(lambda s: s.update(extra=torch.zeros(1))), "1 unexpected keys: extra"),
    Case("weights-truncated", _truncate, "model.safetensors is not a readable safetensors file"),
    Case("weights-no-policy-net", _weights(lambda s: [s.pop(k) for k in list(s) if k.startswith("policy_net.")]),
         "model.safetensors has no such tensor", policy="policy_net"),
]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.is_file() and hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def bad_folder(request, shared, tmp_path, monkeypatch):
    """The case's folder (a mutated copy of a good one), with every open of the file a config
    names and every network connection recorded."""
    case: Case = request.param
    folder = tmp_path / "stranger"
    shutil.copytree(shared[case.policy], folder)
    w = shared["world"]
    mutate = case.mutate
    mutate(folder)
    config = folder / "config.json"
    if config.is_file() and config.stat().st_size < 1 << 20:
        config.write_bytes(config.read_bytes().replace(b"{w}", str(w).encode()))
    monkeypatch.chdir(w)  # a relative path in the config would resolve here
    _FORBIDDEN.clear()
    _FORBIDDEN.add((w / "secret.pth").resolve())
    _OPENED.clear()
    connections = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: connections.append(a) or _refuse())
    yield case, folder, connections
    _FORBIDDEN.clear()


def _refuse():
    raise OSError("no network in this test")


def _check_closed(connections):
    assert not _OPENED, f"opened {_OPENED}"
    assert not connections, f"connected to {connections}"


@pytest.mark.parametrize("bad_folder", CASES, ids=[c.id for c in CASES], indirect=True)
def test_load_model_refuses_in_one_line(bad_folder):
    case, folder, connections = bad_folder
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        segm.load_model(folder)
    message = str(info.value)
    assert case.fragment in message, message
    assert "\n" not in message and len(message) < 600, message
    _check_closed(connections)


@pytest.mark.parametrize("command", ["inference", "miou"])
@pytest.mark.parametrize("bad_folder", CASES, ids=[c.id for c in CASES], indirect=True)
def test_commands_refuse_in_one_line(bad_folder, command, shared, synthetic_root):
    from segm.eval.miou import main as miou
    from segm.inference import main as inference

    case, folder, connections = bad_folder
    w = shared["world"]
    out = folder.parent / "out"
    args = {"inference": (inference, ["--model-path", str(folder), "-i", str(w / "images"), "-o", str(out)]),
            "miou": (miou, [str(folder), "synthetic", "--data-root", str(synthetic_root), "--num-workers", "0"])}
    main, argv = args[command]
    before = _snapshot(folder.parent)
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert case.fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert _snapshot(folder.parent) == before  # nothing written, not even an empty output folder
    _check_closed(connections)


def test_the_table_is_large():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


def test_a_config_cannot_ask_for_more_memory_than_its_weights(shared, tmp_path):
    """A 1.5 KB config describing a ~800 GB model is refused from the header, with no allocation."""
    folder = tmp_path / "big"
    shutil.copytree(shared["random"], folder)
    _net(d_model=16384, n_heads=16, n_layers=256, d_ff=1 << 17)(folder)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="describe encoder.patch_embed.proj.weight"):
        segm.load_model(folder)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_the_open_spy_sees_an_open(shared):
    """The audit hook the table relies on does record an open of the watched file."""
    secret = shared["world"] / "secret.pth"
    _FORBIDDEN.add(secret.resolve())
    _OPENED.clear()
    try:
        torch.load(secret, weights_only=True)
        assert _OPENED == [str(secret)]
    finally:
        _FORBIDDEN.clear()
        _OPENED.clear()


def test_a_checkpoint_never_reads_the_pretrained_source_its_variant_names(synthetic_root, tmp_path, monkeypatch):
    """checkpoint.pth + variant.yml (ours or a stranger's): the weights are the checkpoint's, so
    the `pretrained` file or timm name in its description is not opened and nothing is fetched."""
    from segm.config import dump_yaml, load_yaml

    ckpt, model, _ = make_model_dir(tmp_path, synthetic_root)
    variant = load_yaml(ckpt.parent / "variant.yml")
    for source in (str(tmp_path / "secret.pth"), "vit_tiny_patch16_384.augreg_in21k_ft_in1k"):
        dump_yaml({**variant, "net_kwargs": {**variant["net_kwargs"], "pretrained": source}}, ckpt.parent / "variant.yml")
        monkeypatch.setattr("segm.model.factory.load_pretrained_vit",
                            lambda *a: pytest.fail(f"read the pretrained source {a[1]}"))
        loaded, _ = segm.load_model(ckpt)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
