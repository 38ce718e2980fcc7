"""ONNX export (segm.export) and ONNX Runtime inference (segm.onnx_runtime): the sort-free
selection equals the stable sort bit for bit; every policy exports at 128 px and ONNX Runtime
matches eager (logits ≤ 1e-4, identical superpatches, tied scores included); dynamic batch; the
inference and benchmark backends; bad inputs give one line and leave no file behind."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import segm
from segm.export.cli import main as export_cli
from segm.export.graph import DEFAULT_OPSET
from segm.model import save_model
from segm.model.reduction import cts
from segm.model.factory import write_variant
from segm.onnx_runtime import OnnxModelError, OnnxSegmenter
from tests.helpers.models import tiny_variant

pytestmark = pytest.mark.usefixtures("one_thread")

CROP, S, N2 = 128, 5, 16  # 4×4 superpatches
POLICIES = ("no_sharing", "content", "random", "policy_net")


def checkpoint_at_crop(folder, policy, layers=1, seed=0):
    """A tiny checkpoint of `policy` at the 128-px crop (S = 5 where it shares), as training writes it."""
    variant = tiny_variant(folder / "data", policy)
    net = variant["net_kwargs"]
    net.update(image_size=(CROP, CROP), n_layers=layers, policy_schedule=(64, 0) if policy == "no_sharing" else (44, S))
    variant["dataset_kwargs"]["crop_size"] = CROP
    variant["inference_kwargs"].update(window_size=CROP, window_stride=64)
    torch.manual_seed(seed)
    model = segm.create_segmenter(net, policy_ckpt_required=False)
    folder.mkdir(parents=True)
    save_model(model, variant, folder / "checkpoint.pth")
    write_variant(variant, folder)
    return folder / "checkpoint.pth"


def _export(args):
    return CliRunner().invoke(export_cli, [str(a) for a in args])


# The content policy's export also checks on validation crops (test_check_on_validation_crops).
VALIDATION_CHECK = {"content"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic_root):
    """{policy: (checkpoint, model.onnx)}, exported by the command line (batch 2, check on).

    Each export costs 1–6 s (tracing; EfficientNet-Lite0 for policy_net), its parity check a
    few tenths: every export here keeps its check, and the tests reuse these exports."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for policy in POLICIES:
        ckpt = checkpoint_at_crop(root / policy, policy)
        real = ["--dataset", "synthetic", "--data-root", synthetic_root] if policy in VALIDATION_CHECK else []
        res = _export([ckpt, root / f"{policy}.onnx", *real])
        assert res.exit_code == 0, res.output
        assert "identical selection" in res.output or policy == "no_sharing"
        out[policy] = (ckpt, root / f"{policy}.onnx")
    return out


# ----------------------------------------------------------------------------- selection
def _score_cases():
    g = torch.Generator().manual_seed(0)
    for b, h2, w2, s in [(2, 16, 16, 103), (3, 2, 2, 4), (2, 4, 4, 1), (2, 3, 5, 7), (1, 24, 24, 336)]:
        n2 = h2 * w2
        special = torch.randint(0, 4, (b, n2), generator=g).float()
        special[special == 3] = float("nan")
        special[special == 2] = float("inf")
        special[:, :1] = -float("inf")
        for scores in (torch.rand(b, n2, generator=g), torch.randint(0, 3, (b, n2), generator=g).float(),
                       torch.zeros(b, n2), special, -torch.zeros(b, n2).index_fill(1, torch.tensor([1]), 0.0)):
            yield scores, s, (2 * h2, 2 * w2)


def test_sort_free_selection_equals_the_stable_sort(monkeypatch):
    """What the exported graph computes (no sort) is eager's layout bit for bit: random scores,
    ties, all-equal scores, NaN (first, as torch.sort puts it), ±inf, ±0."""
    cases = list(_score_cases())
    eager = [(cts.select_shared(s, k), cts.layout_from_scores(s, k, grid)) for s, k, grid in cases]
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    for (scores, k, grid), (idx, layout) in zip(cases, eager):
        assert torch.equal(cts.select_shared(scores, k), idx)
        exported = cts.layout_from_scores(scores, k, grid)
        for field in ("base_idx", "shared_idx", "token_of_cell"):
            assert torch.equal(getattr(exported, field), getattr(layout, field)), (field, scores)


# ----------------------------------------------------------------------------- parity
def _tied_and_random(batch):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, CROP, CROP, generator=g), torch.full((batch, 3, CROP, CROP), -0.3)]


@pytest.mark.parametrize("policy", POLICIES)
def test_onnx_runtime_matches_eager(exported, policy):
    ckpt, path = exported[policy]
    model, _ = segm.load_model(ckpt)
    ort = OnnxSegmenter(path)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["policy"] == policy and side["batch_size"] == 2 and side["opset"] == DEFAULT_OPSET == 20
    assert side["num_shared"] == (0 if policy == "no_sharing" else S) and side["crop"] == [CROP, CROP]
    assert side["normalization"]["mean"] == [0.5] * 3 and side["parity"]["max_abs_logit_diff"] <= 1e-4
    for im in _tied_and_random(2):
        model.reducer.reset()  # the exported random policy: the first draw after seeding
        with torch.no_grad():
            ref = model.forward_all(im)
        out = ort.forward_all(im)
        assert (out.logits - ref.logits).abs().max() <= 1e-4
        for field in ("base_idx", "shared_idx", "token_of_cell"):
            assert torch.equal(getattr(out.layout, field), getattr(ref.layout, field))
    if policy == "content":  # a constant image: every score ties at 0, the lowest raster indices win
        assert ort.forward_all(_tied_and_random(2)[1]).layout.shared_idx.tolist() == [list(range(S))] * 2


def test_dynamic_batch_runs_any_batch(tmp_path, exported):
    ckpt, _ = exported["content"]
    res = _export([ckpt, tmp_path / "dyn.onnx", "--dynamic-batch", "--no-check", "--opset", "18"])
    assert res.exit_code == 0, res.output
    model, _ = segm.load_model(ckpt)
    ort = OnnxSegmenter(tmp_path / "dyn.onnx")
    assert ort.batch_size is None and json.loads((tmp_path / "dyn.json").read_text())["input"]["shape"][0] == "batch"
    for b in (1, 3):
        for im in _tied_and_random(b):
            with torch.no_grad():
                ref = model.forward_all(im)
            out = ort.forward_all(im)
            assert out.logits.shape[0] == b and (out.logits - ref.logits).abs().max() <= 1e-4
            assert torch.equal(out.layout.shared_idx, ref.layout.shared_idx)


def test_dynamic_batch_labels_graph_is_the_logits_graphs_argmax(tmp_path, exported):
    """A labels graph for any batch: its bands cannot be sized by a symbolic batch (one image's)."""
    ckpt, _ = exported["no_sharing"]
    for kind in ("logits", "labels"):
        res = _export([ckpt, tmp_path / f"{kind}.onnx", "--dynamic-batch", "--no-check", "--output", kind])
        assert res.exit_code == 0, res.output
    labels, logits = OnnxSegmenter(tmp_path / "labels.onnx"), OnnxSegmenter(tmp_path / "logits.onnx")
    for b in (1, 3):
        for im in _tied_and_random(b):
            assert torch.equal(labels.forward_labels(im), logits(im).argmax(1))


def test_check_on_validation_crops(exported):
    """The fixture's content export ran `--dataset synthetic --data-root ROOT` (exit 0 asserted there)."""
    parity = json.loads(exported["content"][1].with_suffix(".json").read_text())["parity"]
    assert parity["inputs"][-2:] == ["validation crops 0-1", "validation crops 2-3"]
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["near_tie_images"] == 0


def test_near_ties_are_reported_and_wrong_tie_breaking_fails():
    """Scores that differ by rounding may reorder a tie (counted, not a failure); a selection that
    eager would not make from the graph's own scores fails."""
    from segm.export.check import compare, failure

    torch.manual_seed(0)
    net = tiny_variant(".", "content")["net_kwargs"]
    net.update(image_size=(CROP, CROP), policy_schedule=(44, S))
    model = segm.create_segmenter(net).eval()
    im = torch.full((2, 3, CROP, CROP), 0.1)  # all scores tie at 0: eager shares superpatches 0..4
    eager_scores = model.reducer.scorer(im, None)[0]
    scores = eager_scores.clone()
    scores[:, 10] += 1e-6  # "rounded" differently by the other runtime: 10 now wins
    with torch.no_grad():
        ort = model.forward_all(im, given=scores)
    r = compare(model, [ort.logits, ort.layout.shared_idx, scores], im)
    assert r["near_ties"] == 2 and r["selection_given_scores"] and failure("x", r) is None
    assert eager_scores.eq(0).all() and 10 in ort.layout.shared_idx[0]
    wrong = ort.layout.shared_idx.flip(1)  # not what eager selects from these scores
    r = compare(model, [ort.logits, wrong, scores], im)
    assert "tie-breaking" in failure("x", r)


def test_failed_parity_check_writes_nothing(tmp_path, exported, monkeypatch):
    monkeypatch.setattr("segm.export.check.LOGIT_TOL", -1.0)
    res = _export([exported["no_sharing"][0], tmp_path / "m.onnx"])
    assert res.exit_code == 1 and "parity check failed on input 'random normal, batch 2'" in res.output
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- backends
@pytest.mark.filterwarnings("ignore:using a generated palette")
def test_inference_cli_with_onnx_equals_eager(tmp_path, exported):
    from segm.inference import main as infer

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    ckpt, path = exported["content"]
    runs = {"eager": ["--model-path", ckpt], "onnx": ["--onnx", path]}
    for name, args in runs.items():
        res = CliRunner().invoke(infer, [*map(str, args), "-i", str(tmp_path / "in"), "-o", str(tmp_path / name),
                                         "--cpu", "--show-sharing", "--window-batch-size", "2"])
        assert res.exit_code == 0, res.output
    for f in ("a.png", "a_sharing.png"):  # 3 windows: the last batch of 1 is padded to the exported 2
        assert (tmp_path / "eager" / f).read_bytes() == (tmp_path / "onnx" / f).read_bytes()


def test_bench_times_onnx_runtime_beside_eager():
    from segm import bench

    cfg = bench.BenchConfig(crop_size=64, n_cls=10, overrides=dict(d_model=64, n_heads=2, n_layers=1,
                            decoder_layers=1), batch_size=2, warmup=0, repeats=1, matmul_size=64, threads=1,
                            num_shared=3, onnxruntime=True)
    result = bench.run_benchmark(cfg)
    assert [r["name"] for r in result["variants"]] == ["no_sharing", "cts", "no_sharing_ort", "cts_ort"]
    assert set(result["onnxruntime"]["ort_over_eager"]) == {"no_sharing", "cts"}
    assert "cts_ort" in result["onnxruntime"]["speedup_over_ort_no_sharing"]
    assert "n/a" in bench.format_table(result)  # no memory figure for ONNX Runtime rows


# ----------------------------------------------------------------------------- bad input
def test_bad_export_inputs_fail_with_one_line_and_no_file(tmp_path, exported):
    ckpt = exported["content"][0]
    oracle = checkpoint_at_crop(tmp_path / "oracle", "oracle")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    cases = [
        ([ckpt, tmp_path / "m.onnx", "--opset", "7"], "--opset 7 is not supported: choose 18..25"),
        ([junk, tmp_path / "m.onnx"], "junk.pth is corrupt or not a torch checkpoint"),
        ([tmp_path / "none.pth", tmp_path / "m.onnx"], "checkpoint not found"),
        ([ckpt, tmp_path / "m.onnx", "--batch-size", "2", "--dynamic-batch"], "not both"),
        ([ckpt, tmp_path / "m.onnx", "--batch-size", "0"], "--batch-size must be ≥ 1"),
        ([ckpt, tmp_path / "m.pt"], "must end in .onnx"),
        ([ckpt, tmp_path / "nowhere" / "m.onnx"], "does not exist"),
        ([exported["random"][0], tmp_path / "m.onnx", "--dynamic-batch"], "drawn once at export for a fixed batch"),
        ([oracle, tmp_path / "m.onnx"], "oracle_s5 selects from ground-truth labels"),
    ]
    before = sorted(tmp_path.iterdir())
    for args, message in cases:
        res = _export(args)
        assert res.exit_code == 1 and message in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert sorted(tmp_path.iterdir()) == before


def test_bad_runtime_inputs(tmp_path, exported):
    from segm.inference import main as infer

    path = exported["content"][1]
    ort = OnnxSegmenter(path)
    with pytest.raises(OnnxModelError, match=r"exported for batch 2, not batch size 3: .*--batch-size 3"):
        ort(torch.zeros(3, 3, CROP, CROP))
    fake = tmp_path / "fake.onnx"
    fake.write_text("hello")
    with pytest.raises(OnnxModelError, match="is not an ONNX model ONNX Runtime can load"):
        OnnxSegmenter(fake)
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="no lonely.json beside"):
        OnnxSegmenter(lonely)
    (tmp_path / "in").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    cases = [(["--onnx", path, "--window-batch-size", "3"], "exported for batch 2, not --window-batch-size 3"),
             (["--onnx", fake], "is not an ONNX model"),
             (["--onnx", path, "--policy-method", "random", "--num-tokens-shared", "2"], "fixed at export"),
             ([], "give --model-path CHECKPOINT or --onnx MODEL.onnx")]
    for args, message in cases:
        res = CliRunner().invoke(infer, [*map(str, args), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")])
        assert res.exit_code == 1 and message in res.output, (args, res.output)
    assert not (tmp_path / "out").exists()


def test_bench_refuses_onnx_runtime_outside_cpu_fp32_inference():
    from segm import bench

    for kw, message in [(dict(dtype="bf16"), "CPU in fp32"), (dict(train_step=True), "batched inference only")]:
        with pytest.raises(bench.BenchError, match=message):
            bench.check_config(bench.BenchConfig(onnxruntime=True, **kw))


# ----------------------------------------------------------------------------- any reducer
@pytest.fixture
def test_reducers(monkeypatch):
    """Two reducers that are not CTS, registered for one test: `test_pool2` (every 2×2 block
    of patches is one token, T = N/4, static) and `test_dynamic` (no static token count)."""
    import torch.nn.functional as F

    from segm.model.reduction import rules
    from segm.model.reduction.base import Reducer, TokenMap

    class Pool2(Reducer):
        name = "test_pool2"

        def embed(self, vit, im, labels=None, given=None):
            x, tmap = super().embed(vit, im, labels, given)
            (gh, gw), b = tmap.grid, x.shape[0]
            x = F.avg_pool2d(x.transpose(1, 2).reshape(b, -1, gh, gw), 2).flatten(2).transpose(1, 2)
            cell = torch.arange(gh * gw, device=im.device)
            token = (cell // gw // 2) * (gw // 2) + cell % gw // 2
            return x, TokenMap(token.expand(b, -1), tmap.grid, gh * gw // 4)

        def static_tokens(self, grid):
            return grid[0] * grid[1] // 4

    class Dynamic(Reducer):
        name = "test_dynamic"

        def static_tokens(self, grid):
            return None

    monkeypatch.setattr(rules, "_REDUCERS", dict(rules._REDUCERS))
    rules.register_reducer("test_pool2", lambda reduction, grid, p, net: Pool2(grid, p))
    rules.register_reducer("test_dynamic", lambda reduction, grid, p, net: Dynamic(grid, p))


def test_a_reducer_that_is_not_cts_exports_and_runs(tmp_path, exported, test_reducers):
    """The export and OnnxSegmenter speak the reducer interface: a registered reducer exports
    (logits only: its token map is unknown to the deployment) and matches eager; one whose token
    count depends on the image is refused in one line."""
    from segm.onnx_runtime import UNKNOWN_TOKEN
    from segm.policy_choice import apply_policy_choice, policy_choice

    ckpt = exported["no_sharing"][0]
    res = _export([ckpt, tmp_path / "pool.onnx", "--reducer", "test_pool2"])
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "pool.json").read_text())
    assert side["reducer"] == {"reducer": "test_pool2", "tokens": 16, "reduction": 0.75}
    assert list(side["outputs"]) == ["logits"] and side["parity"]["max_abs_logit_diff"] <= 1e-4
    model, _ = apply_policy_choice(*segm.load_model(ckpt), policy_choice(reducer="test_pool2"))
    ort = OnnxSegmenter(tmp_path / "pool.onnx")
    assert ort.reduction_method == "test_pool2" and ort.shares_tokens and ort.describe_reduction() == side["reducer"]
    for im in _tied_and_random(2):
        with torch.no_grad():
            ref = model.forward_all(im)
        out = ort.forward_all(im)
        assert (out.logits - ref.logits).abs().max() <= 1e-4
        assert out.token_map.num_tokens == 16 and not out.token_map.identity
        assert (out.token_map.token_of_cell == UNKNOWN_TOKEN).all()
    res = _export([ckpt, tmp_path / "dyn.onnx", "--reducer", "test_dynamic"])
    assert res.exit_code == 1 and "test_dynamic has no static token count" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "dyn.onnx").exists()


# ----------------------------------------------------------------------------- labels output
def _full_resolution_floats(path) -> list[str]:
    """The graph's float values (outputs and inferred intermediates) of shape (B, K, H, W) or
    (B, H, W, K) at the crop."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    found = []
    for v in [*graph.value_info, *graph.output]:
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and len(dims) == 4 \
                and [CROP, CROP] in (dims[2:], dims[1:3]):
            found.append(v.name)
    return found


@pytest.mark.parametrize("policy", ["no_sharing", "content"])
def test_labels_graph_is_the_logits_graphs_argmax(tmp_path, exported, policy, monkeypatch):
    """`--output labels`: forward_labels in the graph (bands of rows through the matrix-product
    upsampling: no Resize, no (B, K, H, W) value), equal to the argmax of the logits graph. The
    band budget is shrunk so that this small map is cut into bands (2 grid rows each)."""
    import onnx

    import segm.model.labels

    monkeypatch.setattr(segm.model.labels, "BAND_BYTES", 3 * 2 * 10 * 16 * CROP * 4)
    ckpt, logits_path = exported[policy]
    res = _export([ckpt, tmp_path / "l.onnx", "--output", "labels"])
    assert res.exit_code == 0 and "labels vs eager forward_labels" in res.output, res.output
    side = json.loads((tmp_path / "l.json").read_text())
    assert side["output"] == "labels" and side["outputs"]["labels"] == {"shape": [2, CROP, CROP], "dtype": "int64"}
    assert side["parity"]["max_abs_logit_diff"] is None and side["parity"]["min_argmax_agreement"] == 1.0
    labels, logits = OnnxSegmenter(tmp_path / "l.onnx"), OnnxSegmenter(logits_path)
    for im in _tied_and_random(2):
        assert torch.equal(labels.forward_labels(im), logits(im).argmax(1))
        record = [m.run(im).get("shared_idx", torch.zeros(0)) for m in (labels, logits)]
        assert torch.equal(*record)
    with pytest.raises(OnnxModelError, match="exported with --output labels: it returns labels, not logits"):
        labels(im)
    nodes = onnx.load(str(tmp_path / "l.onnx")).graph.node
    assert "Resize" not in {n.op_type for n in nodes}
    # each band's ArgMax reduces the innermost axis, the classes (ONNX Runtime's fast case)
    axes = [onnx.helper.get_attribute_value(a) for n in nodes if n.op_type == "ArgMax" for a in n.attribute
            if a.name == "axis"]
    assert len(axes) == CROP // 32 and set(axes) <= {-1, 3}
    assert _full_resolution_floats(tmp_path / "l.onnx") == [] and _full_resolution_floats(logits_path) == ["logits"]


def test_labels_break_exact_ties_to_the_lower_class(tmp_path):
    """Classes 3 and 5 with the same decoder weights tie exactly everywhere: the labels graph, the
    logits graph's argmax and eager all pick 3; the sidecar's output kind is checked."""
    from segm.export.sidecar import SidecarError, read_sidecar

    ckpt = checkpoint_at_crop(tmp_path / "run", "no_sharing")
    model, variant = segm.load_model(ckpt)
    head = model.decoder.head
    with torch.no_grad():
        head.weight[5] = head.weight[3]
        head.bias[3] = head.bias[5] = 0.15  # the others' are 0: 3 wins on part of each image
    save_model(model, variant, ckpt)
    for kind in ("logits", "labels"):
        res = _export([ckpt, tmp_path / f"{kind}.onnx", "--output", kind])
        assert res.exit_code == 0, res.output
    labels, logits = OnnxSegmenter(tmp_path / "labels.onnx"), OnnxSegmenter(tmp_path / "logits.onnx")
    for im in _tied_and_random(2):
        got, scores = labels.forward_labels(im), logits(im)
        assert torch.equal(scores[:, 3], scores[:, 5]) and torch.equal(got, scores.argmax(1))
        assert (got == 3).any() and not (got == 5).any() and (got != 3).any()
        with torch.no_grad():
            assert torch.equal(got, model.forward_labels(im))
    side = json.loads((tmp_path / "labels.json").read_text())
    for value, message in [("probs", r"field output \(the graph's first output"), ("logits", "must start with 'logits'")]:
        (tmp_path / "bad.onnx").write_bytes((tmp_path / "labels.onnx").read_bytes())
        (tmp_path / "bad.json").write_text(json.dumps({**side, "output": value}))
        with pytest.raises(SidecarError, match=message):
            read_sidecar(tmp_path / "bad.onnx")


def test_a_labels_check_tolerates_rounding_ties_only(tmp_path):
    """A labels graph whose label differs from eager's where eager's two logits lie within the
    logit tolerance passes (float rounding breaks such ties either way); a clear difference fails."""
    from segm.export.check import compare, failure

    model, _ = segm.load_model(checkpoint_at_crop(tmp_path / "run", "no_sharing"))
    head = model.decoder.head
    with torch.no_grad():
        head.weight[5] = head.weight[3]
        head.bias[3] = head.bias[5] = 0.15  # 3 and 5 tie exactly; 3 wins on part of each image
        im = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
        logits = model(im)
    labels = logits.argmax(1)
    tied = (labels == 3).flatten().nonzero()[0, 0]
    clear = (logits.topk(2, dim=1).values.diff(dim=1).abs().flatten()).argmax()
    for pixel, other, ok in ((tied, 5, True), (clear, (int(labels.flatten()[clear]) + 1) % logits.shape[1], False)):
        graph = labels.clone()
        graph.view(-1)[pixel] = other
        r = compare(model, [graph.numpy()], im)
        assert r["diff"] == 1 / graph.numel() and (failure("x", r) is None) == ok, (r, failure("x", r))
    assert failure("x", compare(model, [labels.numpy()], im)) is None
