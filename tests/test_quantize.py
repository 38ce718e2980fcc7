"""`segm.export --quantize int8`: the int8 graph runs in ONNX Runtime and its sidecar records the
quantisation and its pixel agreement with the fp32 graph; only the encoder's and decoder's
matrix products are quantised (not the bilinear upsampling's, not the convolutions); a
quantisation that changes too many labels is refused in one line and writes nothing; the schema
refuses a malformed record; `segm.bench --onnx-int8` times the int8 graphs."""
import json

import numpy as np
import onnx
import pytest
import torch

from segm.export.check import check_inputs
from segm.export.quantize import labels_of
from segm.export.sidecar import SidecarError, read_sidecar
from segm.onnx_runtime import OnnxSegmenter
from tests.test_export import CROP, _export, checkpoint_at_crop

SHARE = 0.05  # the random tiny model's labels are nearly tied: a looser bound than the default


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(checkpoint, fp32 export, int8 export) of a one-block model at 128 px (no reduction)."""
    root = tmp_path_factory.mktemp("quantize")
    ckpt = checkpoint_at_crop(root / "run", "no_sharing")
    for name, extra in (("fp32", []), ("int8", ["--quantize", "int8", "--max-changed-pixels", SHARE])):
        res = _export([ckpt, root / f"{name}.onnx", "--no-check", *extra])
        assert res.exit_code == 0, res.output
    return ckpt, root / "fp32.onnx", root / "int8.onnx"


def test_int8_export_runs_and_records_its_agreement(pair):
    import segm

    ckpt, fp32, int8 = pair
    side = json.loads(int8.with_suffix(".json").read_text())
    q = side["quantization"]
    assert json.loads(fp32.with_suffix(".json").read_text())["quantization"] is None
    assert {k: q[k] for k in ("method", "weights", "activations", "nodes", "max_changed_pixels")} == \
        {"method": "dynamic", "weights": "int8", "activations": "uint8", "nodes": 5, "max_changed_pixels": SHARE}
    assert 1 - SHARE <= q["pixel_agreement"] < 1
    model, _ = segm.load_model(ckpt)
    runs = {p: OnnxSegmenter(p) for p in (fp32, int8)}
    same = total = 0
    for _, im in check_inputs(model, [2]):  # the agreement the sidecar records, recomputed
        a, b = (labels_of([runs[p](im).numpy()]) for p in (fp32, int8))
        same, total = same + int((a == b).sum()), total + a.size
    assert same / total == pytest.approx(q["pixel_agreement"], abs=1e-12)
    assert int8.stat().st_size < fp32.stat().st_size


def test_an_int8_labels_graph_compares_labels(tmp_path, pair):
    """`--output labels --quantize int8`: the agreement is the labels', against the fp32 graph's."""
    import segm

    ckpt, fp32, _ = pair
    res = _export([ckpt, tmp_path / "l.onnx", "--output", "labels", "--quantize", "int8", "--max-changed-pixels", SHARE,
                   "--no-check"])
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "l.json").read_text())
    assert side["output"] == "labels" and side["quantization"]["nodes"] == 5
    model, _ = segm.load_model(ckpt)
    labels, reference = OnnxSegmenter(tmp_path / "l.onnx"), OnnxSegmenter(fp32)
    inputs = [im for _, im in check_inputs(model, [2])]
    same = sum(int((labels.forward_labels(im) == reference.forward_labels(im)).sum()) for im in inputs)
    assert same / (len(inputs) * 2 * CROP * CROP) == pytest.approx(side["quantization"]["pixel_agreement"], abs=1e-12)


def test_only_the_models_matrix_products_are_quantised(pair):
    """4 block products + the linear head become integer products; the two upsampling products
    (constant 8×128 interpolation weights) stay float MatMuls; no convolution is quantised."""
    graph = onnx.load(str(pair[2])).graph
    ops = [n.op_type for n in graph.node]
    consts = {t.name: tuple(t.dims) for t in graph.initializer}
    float_weights = [consts[i] for n in graph.node if n.op_type == "MatMul" for i in n.input if i in consts]
    assert ops.count("MatMulInteger") == ops.count("DynamicQuantizeLinear") == 5
    assert sorted(float_weights) == [(8, 128), (128, 8)]  # the other float MatMuls: attention's
    assert "ConvInteger" not in ops and "Resize" not in ops


def test_too_many_changed_labels_is_refused_and_writes_nothing(tmp_path, pair):
    res = _export([pair[0], tmp_path / "m.onnx", "--quantize", "int8", "--max-changed-pixels", "0", "--no-check"])
    assert res.exit_code == 1 and "int8 quantisation changes the label of" in res.output, res.output
    assert "more than the 0 % allowed" in res.output and res.output.count("Error:") == 1
    assert res.output.strip().splitlines()[-1].startswith("Error: int8")  # after the progress lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--max-changed-pixels", "0.1"], "give --quantize int8 too"),
    (["--quantize", "int8", "--max-changed-pixels", "1.5"], "--max-changed-pixels must be a share in 0..1"),
])
def test_bad_quantize_options_fail_in_one_line(tmp_path, pair, args, message):
    res = _export([pair[0], tmp_path / "m.onnx", *args])
    assert res.exit_code == 1 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, field", [
    ({"per_channel": "yes"}, "quantization.per_channel"),
    ({"pixel_agreement": 1.5}, "quantization.pixel_agreement"),
    ({"weights": "int4"}, "quantization.weights"),
    ({"colour": "blue"}, "quantization.colour"),
    ({"pixel_agreement": 0.5}, "quantization.pixel_agreement"),  # beyond its own max_changed_pixels
    ("drop nodes", "quantization.nodes"),
    ("not an object", "quantization"),
])
def test_schema_refuses_a_malformed_quantization(tmp_path, pair, change, field):
    int8 = pair[2]
    side = json.loads(int8.with_suffix(".json").read_text())
    if change == "drop nodes":
        del side["quantization"]["nodes"]
    elif change == "not an object":
        side["quantization"] = "int8"
    else:
        side["quantization"].update(change)
    (tmp_path / "m.onnx").write_bytes(int8.read_bytes())
    (tmp_path / "m.json").write_text(json.dumps(side))
    with pytest.raises(SidecarError, match=f"field {field} "):
        read_sidecar(tmp_path / "m.onnx")


def test_a_sidecar_without_the_field_is_an_fp32_export(tmp_path, pair):
    """Sidecars written before `quantization` existed still load."""
    side = json.loads(pair[1].with_suffix(".json").read_text())
    del side["quantization"]
    (tmp_path / "m.onnx").write_bytes(pair[1].read_bytes())
    (tmp_path / "m.json").write_text(json.dumps(side))
    out = OnnxSegmenter(tmp_path / "m.onnx")(torch.zeros(2, 3, CROP, CROP))
    assert out.shape == (2, 10, CROP, CROP) and np.isfinite(out.numpy()).all()


@pytest.mark.slow  # 4 exports, two with the policy network: 15-20 s
def test_bench_times_the_int8_graphs_beside_fp32():
    """With --output labels, the ONNX twins are labels graphs too (checked against eager's labels)."""
    from segm import bench

    cfg = bench.BenchConfig(crop_size=64, n_cls=10, overrides=dict(d_model=64, n_heads=2, n_layers=1,
                            decoder_layers=1), batch_size=2, warmup=0, repeats=1, matmul_size=64, threads=1,
                            num_shared=3, onnx_int8=True, memory=False, output="labels")
    result = bench.run_benchmark(cfg)
    names = [r["name"] for r in result["variants"]]
    assert names == ["no_sharing", "cts", "no_sharing_ort", "cts_ort", "no_sharing_ort_int8", "cts_ort_int8"]
    assert [r["backend"] for r in result["variants"]][-2:] == ["onnxruntime-int8"] * 2
    assert set(result["onnxruntime"]["int8_over_fp32"]) == {"no_sharing", "cts"}
    table = bench.format_table(result)
    assert "| cts_ort_int8 |" in table and "int8 (*_ort_int8 rows" in table


def test_parity_script_reports_miou_and_agreement(pair, synthetic_root):
    """scripts/quantization_parity.py: both graphs' mIoU on the validation images and their label
    agreement; a graph against itself agrees everywhere."""
    import importlib.util
    import re
    from pathlib import Path

    from click.testing import CliRunner

    path = Path(__file__).parents[1] / "scripts" / "quantization_parity.py"
    spec = importlib.util.spec_from_file_location("quantization_parity", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, fp32, int8 = pair
    pattern = r"mIoU fp32 ([\d.]+), int8 ([\d.]+) \(Δ ([+-][\d.]+)\); labels agree on ([\d.]+) %"
    outs = {}
    for name, other in (("self", fp32), ("int8", int8)):
        res = CliRunner().invoke(script.main, [str(fp32), str(other), "synthetic", "--data-root", str(synthetic_root)])
        assert res.exit_code == 0, res.output
        outs[name] = [float(v) for v in re.search(pattern, res.output).groups()]
    assert outs["self"][0] == outs["self"][1] and outs["self"][3] == 100.0
    assert outs["int8"][0] == outs["self"][0] and 100 * (1 - SHARE) <= outs["int8"][3] <= 100
