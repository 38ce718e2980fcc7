"""ALGM where a reducer goes: stacked on CTS (S = 0 is ALGM, ALGM's counts at 0 are CTS; shared
windows are no candidates; a shared token starts with size 4), exported to ONNX (static mode,
alone and on CTS, parity and the same token map), compiled without recompiles, trained by
`segm.train --reducer`, and a checkpoint of the published ALGM code loaded in reference mode."""
import json

import pytest
import torch
import yaml

import segm
from segm.config import load_yaml
from segm.model import save_model
from segm.model.factory import reshare, write_variant
from segm.model.reduction import ReductionError
from segm.model.reduction.algm import AlgmReducer
from tests.helpers.models import tiny_net_kwargs, tiny_variant
from tests.helpers.train import load_ckpt, run_cli, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

CROP = 128  # 8×8 patches, 16 windows


def _plain(layers=5):
    net = {**tiny_net_kwargs("no_sharing"), "n_layers": layers, "image_size": (CROP, CROP),
           "policy_schedule": (64, 0)}
    torch.manual_seed(0)
    return segm.create_segmenter(net).eval(), net


def _run(model, im):
    with torch.no_grad():
        return model.forward_all(im)


def test_cts_with_no_shared_superpatch_is_algm_and_algm_with_no_merge_is_cts():
    plain, net = _plain()
    im = torch.randn(2, 3, CROP, CROP)
    algm_alone, _ = reshare(plain, net, "no_sharing", reducer={"name": "algm"})
    on_s0, _ = reshare(plain, net, "content", num_shared=0, reducer={"name": "algm"})
    a, b = _run(algm_alone, im), _run(on_s0, im)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.token_map.token_of_cell, b.token_map.token_of_cell)
    cts, _ = reshare(plain, net, "content", num_shared=5)
    no_merge, _ = reshare(plain, net, "content", num_shared=5,
                          reducer={"name": "algm", "local_ratio": 0.0, "global_ratio": 0.0})
    c, d = _run(cts, im), _run(no_merge, im)
    assert torch.equal(c.logits, d.logits) and torch.equal(c.layout.shared_idx, d.layout.shared_idx)
    assert no_merge.reducer.static_tokens(no_merge.grid) == cts.reducer.static_tokens(cts.grid) == 64 - 15


def test_on_cts_the_local_stage_merges_only_unshared_windows():
    plain, net = _plain()
    model, recorded = reshare(plain, net, "content", num_shared=5, reducer={"name": "algm"})
    red = model.reducer
    assert isinstance(red, AlgmReducer) and red.base is not None
    assert (red.r1, red.r2) == (round(0.25 * (16 - 5)), round(0.15 * (49 - 9)))
    assert red.stage_tokens() == [49, 40, 34] and recorded["policy_method"] == "content"
    assert recorded["reducer"]["name"] == "algm" and recorded["policy_schedule"] == (44, 5)
    out = _run(model, torch.randn(3, 3, CROP, CROP))
    tmap = out.token_map
    assert tmap.num_tokens == 34 and tmap.sizes.sum(1).tolist() == [64.0] * 3
    cells = tmap.token_of_cell.view(3, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(3, 16, 4)  # per window
    shared = torch.zeros(3, 16, dtype=torch.bool).scatter(1, out.layout.shared_idx, True)
    one_token = (cells == cells[..., :1]).all(-1)
    assert one_token[shared].all()  # CTS's windows stay whole
    # the local stage merged r1 unshared windows (a global merge may join two windows, never split one)
    assert (one_token & ~shared).sum(1).ge(red.r1).all()
    sizes = torch.gather(tmap.sizes, 1, cells[..., 0])
    assert (sizes[shared] >= 4).all()  # a shared token starts with size 4


def test_description_tag_and_summary_name_both_methods():
    plain, net = _plain()
    model, _ = reshare(plain, net, "content", num_shared=5, reducer={"name": "algm"})
    d = model.describe_reduction()
    assert d["reducer"] == "algm" and d["tokens"] == 34 and d["cts"]["num_shared"] == 5 and "tau" not in d
    assert model.reducer.tag() == "content_s5_algm_static"
    assert model.reducer.policy_record() == {"method": "content", "num_shared": 5, "num_notshared": 44}
    assert model.reducer.summary().startswith("CTS, policy content (U, S) = (44, 5), then ALGM static: tokens 49")
    ref, _ = reshare(plain, net, "no_sharing", reducer={"name": "algm", "mode": "reference"})
    assert ref.describe_reduction()["tau"] == 0.88 and ref.describe_reduction()["tokens"] is None


def test_a_reducer_that_does_not_stack_on_cts_is_refused(monkeypatch):
    from segm.model.reduction import rules

    monkeypatch.setitem(rules._REDUCERS, "solo", rules.ReducerEntry("x:y", rules._no_options))
    plain, net = _plain()
    with pytest.raises(ReductionError, match="reducer 'solo' does not combine with token sharing"):
        reshare(plain, net, "content", num_shared=5, reducer={"name": "solo"})


def test_static_mode_compiles_once_and_never_recompiles():
    import torch._inductor.config as inductor_config

    plain, net = _plain(layers=2)
    model, _ = reshare(plain, net, "no_sharing", reducer={"name": "algm", "global_block": 2})
    compiled = torch.compile(model.forward, dynamic=False)
    ims = [torch.randn(2, 3, CROP, CROP), torch.full((2, 3, CROP, CROP), 0.2)]
    with torch.no_grad(), inductor_config.patch({"compile_threads": 1, "cpp.vec_isa_ok": True}):
        torch.testing.assert_close(compiled(ims[0]), model(ims[0]), rtol=1e-4, atol=1e-4)
        with torch.compiler.set_stance("fail_on_recompile"):
            torch.testing.assert_close(compiled(ims[1]), model(ims[1]), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- ONNX
def _checkpoint(folder):
    variant = tiny_variant(folder / "data", "no_sharing")
    plain, net = _plain()
    variant["net_kwargs"] = net
    variant["dataset_kwargs"]["crop_size"] = CROP
    variant["inference_kwargs"].update(window_size=CROP, window_stride=64)
    folder.mkdir(parents=True)
    save_model(plain, variant, folder / "checkpoint.pth")
    write_variant(variant, folder)
    return folder / "checkpoint.pth"


@pytest.mark.parametrize("stack", [[], ["--policy-method", "content", "--num-tokens-shared", "5"]])
def test_static_mode_exports_and_onnx_runtime_gives_its_logits_and_map(tmp_path, stack):
    from click.testing import CliRunner

    from segm.export.cli import main as export_cli
    from segm.onnx_runtime import OnnxSegmenter
    from segm.policy_choice import apply_policy_choice, policy_choice

    ckpt = _checkpoint(tmp_path / "plain")
    out = tmp_path / "algm.onnx"
    res = CliRunner().invoke(export_cli, [str(ckpt), str(out), "--reducer", "algm:prop_attn=true", "--dynamic-batch",
                                          *stack])
    assert res.exit_code == 0, res.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["parity"]["max_abs_logit_diff"] <= 1e-4 and list(side["outputs"])[-1] == "token_of_cell"
    choice = policy_choice(stack[1] if stack else None, 5 if stack else None, reducer="algm:prop_attn=true")
    model, _ = apply_policy_choice(*segm.load_model(ckpt), choice)
    ort = OnnxSegmenter(out)
    for im in (torch.randn(3, 3, CROP, CROP), torch.full((1, 3, CROP, CROP), -0.3)):
        ref, got = _run(model, im), ort.forward_all(im)
        assert (got.logits - ref.logits).abs().max() <= 1e-4
        assert torch.equal(got.token_map.token_of_cell, ref.token_map.token_of_cell)
    res = CliRunner().invoke(export_cli, [str(ckpt), str(tmp_path / "ref.onnx"), "--reducer", "algm:mode=reference"])
    assert res.exit_code == 1 and "no static token count" in res.output


# ----------------------------------------------------------------------------- training, published runs
def test_train_with_algm_records_the_reducer_and_the_checkpoint_runs_it(synthetic_root, tmp_path):
    log_dir = tmp_path / "run"
    args = tiny_args(log_dir, synthetic_root, "--encoder-layers", "2", "--crop-size", "64", "--iterations", "2",
                     "--batch-size", "2", "--eval-freq", "0", "--reducer", "algm:global_block=2", "--seed", "0")
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    variant = load_yaml(log_dir / "variant.yml")
    net = variant["net_kwargs"]
    assert net["policy_method"] == "no_sharing"
    assert net["reducer"] == {"name": "algm", "mode": "static", "local_block": 1, "global_block": 2,
                              "local_ratio": 0.25, "global_ratio": 0.15, "tau": None, "prop_attn": False}
    model, _ = segm.load_model(log_dir / "checkpoint.pth")
    assert model.reduction_method == "algm" and model.reducer.stage_tokens() == [16, 13, 11]
    assert load_ckpt(log_dir)["model"].keys() == model.state_dict().keys()
    bad = run_cli(tiny_args(tmp_path / "bad", synthetic_root, "--reducer", "algm:speed=2"))
    assert bad.exit_code != 0 and "algm has no setting speed" in bad.output and not (tmp_path / "bad").exists()


def test_a_published_algm_run_loads_in_reference_mode(tmp_path):
    """The published code records ALGM in dataset_kwargs (patch_type, selected_layers,
    merging_window_size, threshold) beside a plain Segmenter net_kwargs and state dict."""
    ckpt = _checkpoint(tmp_path / "run")
    variant = load_yaml(tmp_path / "run" / "variant.yml")
    variant["net_kwargs"].pop("policy_method")
    variant["net_kwargs"].pop("policy_schedule")
    variant["dataset_kwargs"].update(patch_type="algm", selected_layers=[1, 4], merging_window_size=[2, 2],
                                     threshold=0.9)
    (tmp_path / "run" / "variant.yml").write_text(yaml.safe_dump(variant))
    model, loaded = segm.load_model(ckpt)
    assert model.reduction_method == "algm" and model.reducer.mode == "reference"
    assert (model.reducer.local_block, model.reducer.global_block, model.reducer.tau) == (1, 4, 0.9)
    assert loaded["net_kwargs"]["reducer"]["mode"] == "reference"
    variant["dataset_kwargs"]["merging_window_size"] = [3, 3]
    (tmp_path / "run" / "variant.yml").write_text(yaml.safe_dump(variant))
    with pytest.raises(ReductionError, match=r"merges \[3, 3\] windows; only 2×2"):
        segm.load_model(ckpt)
    variant["dataset_kwargs"]["patch_type"] = "pure"
    (tmp_path / "run" / "variant.yml").write_text(yaml.safe_dump(variant))
    assert segm.load_model(ckpt)[0].reduction_method == "none"


def test_the_record_counts_tokens_per_stage_in_both_modes():
    plain, net = _plain()
    im = torch.randn(2, 3, CROP, CROP)
    static, _ = reshare(plain, net, "content", num_shared=5, reducer={"name": "algm"})
    out = _run(static, im)
    assert out.token_map.record.stage_tokens == (49, 40, 34) and out.layout.shared_idx.shape == (2, 5)
    ref, _ = reshare(plain, net, "no_sharing", reducer={"name": "algm", "mode": "reference", "tau": -1.0})
    out = _run(ref, im)  # τ = −1: every window merges
    assert out.token_map.record.stage_tokens[:2] == (64, 16) and out.token_map.num_tokens == out.token_map.record.stage_tokens[2]


def test_the_benchmark_times_algm_alone_on_cts_and_the_lower_resolution(tmp_path):
    from click.testing import CliRunner

    from segm.bench import cli as bench
    from tests.test_bench import TINY_ARGS

    out = tmp_path / "b.json"
    args = [*TINY_ARGS, "--no-memory", "--reducer", "algm:global_block=2", "--reducer", "algm:mode=reference,global_block=2",
            "--reducer", "resize:size=32", "--on-cts", "algm:global_block=2", "--json", str(out)]
    res = CliRunner().invoke(bench.main, args)
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(out.read_text())["variants"]}
    assert rows["algm_static_global_block2"]["stage_tokens"] == [16, 13, 11]
    assert rows["algm_static_global_block2"]["tokens"] == 12 and "12 (16→13→11)" in res.output
    assert len(rows["algm_reference_global_block2"]["stage_tokens"]) == 3
    assert rows["resize32"]["patch_tokens"] == 4 and rows["resize32"]["stage_tokens"] is None
    stacked = rows["policy_net_s2_algm_static_global_block2"]  # S = 2 (30 %): 2 windows left, none merged locally
    assert stacked["stage_tokens"] == [10, 10, 8] and stacked["reducer"]["cts"]["policy"] == "policy_net"


def test_the_reference_mode_says_its_batch_dependence_where_users_read():
    plain, net = _plain()
    ref, _ = reshare(plain, net, "no_sharing", reducer={"name": "algm", "mode": "reference"})
    assert "an image's output depends on the other images of its batch" in ref.reducer.summary()
