"""The token-reduction seam, proven by a reducer that exists only in this file: it merges every
2×2 window of tokens after the first encoder block and unmerges features before the decoder.
Registered here, it runs through evaluation, inference with sharing maps and the benchmark with
no change anywhere else."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

import segm
from segm import bench
from segm.config import dump_yaml, load_yaml
from segm.eval.miou import main as miou_main
from segm.inference import main as inference_main, predict_image
from segm.model.reduction import rules
from segm.model.reduction.base import Reducer, TokenMap
from tests.helpers.models import CROP, make_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


class MergeWindows(Reducer):
    """After block `after`, each 2×2 window of patch tokens becomes its mean (size 4)."""

    name = "toy_merge"
    unmerge_at = "features"

    def __init__(self, grid, patch_size, after=0):
        super().__init__(grid, patch_size)
        self.after = after

    def after_block(self, i, x, tmap):
        if i != self.after:
            return x, tmap
        gh, gw = tmap.grid
        npt = x.shape[1] - tmap.num_tokens
        tokens = x[:, npt:]
        b, n, d = tokens.shape
        merged = F.avg_pool2d(tokens.transpose(1, 2).reshape(b, d, gh, gw), 2).flatten(2).transpose(1, 2)
        cell = torch.arange(n, device=x.device)
        window = (cell // gw // 2) * (gw // 2) + (cell % gw) // 2
        sizes = torch.full((b, n // 4), 4, device=x.device)
        return torch.cat([x[:, :npt], merged], 1), TokenMap(window.expand(b, n), tmap.grid, n // 4, sizes)

    def static_tokens(self, grid):
        return grid[0] * grid[1] // 4

    def settings(self):
        return {"after": self.after}


def _check(options, grid):
    if set(options) - {"after"} or grid[0] % 2 or grid[1] % 2:
        raise rules.ReductionError(f"toy_merge takes after=BLOCK on an even grid, got {options} on {grid}")
    return {"after": int(options.get("after", 0))}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(rules, "_REDUCERS", dict(rules._REDUCERS))  # the registration ends with the test
    rules.register_reducer("toy_merge", lambda red, grid, p, net: MergeWindows(grid, p, red.option("after", 0)),
                           check=_check, fixed_input=False)


@pytest.fixture
def plain_run(synthetic_root, tmp_path):
    return make_model_dir(tmp_path, synthetic_root, policy_method="no_sharing")


def test_the_forward_pass_is_the_blocks_with_the_merge_between_them(toy, plain_run):
    _, plain, variant = plain_run
    model, net = segm.model.factory.reshare(plain, variant["net_kwargs"], "no_sharing",
                                            reducer={"name": "toy_merge"})
    assert net["reducer"] == {"name": "toy_merge", "after": 0} and model.describe_reduction() == {
        "reducer": "toy_merge", "tokens": 4, "reduction": 0.75, "after": 0}
    im = torch.randn(2, 3, CROP, CROP)
    vit = model.encoder
    with torch.no_grad():
        x = vit.patch_embed(im) + vit.pos_embed[:, 1:]
        x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
        x = vit.blocks[0](x)
        pooled = F.avg_pool2d(x[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4), 2).flatten(2).transpose(1, 2)
        x = vit.norm(vit.blocks[1](torch.cat([x[:, :1], pooled], 1)))[:, 1:]
        cells = x.transpose(1, 2).reshape(2, -1, 2, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
        expected = model.decoder(cells.flatten(2).transpose(1, 2))  # features unmerged before the decoder
        expected = F.interpolate(expected.transpose(1, 2).reshape(2, -1, 4, 4), size=(CROP, CROP), mode="bilinear",
                                 align_corners=False)
        out = model.forward_all(im)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert out.token_map.num_tokens == 4 and out.token_map.token_of_cell[0].tolist() == [
        0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]


def test_evaluation_runs_a_checkpoint_with_the_reducer_and_records_it(toy, plain_run):
    ckpt, _, variant = plain_run
    common = [str(ckpt), "synthetic", "--num-workers", "0", "--frac-dataset", "0.25"]
    chosen = CliRunner().invoke(miou_main, common + ["--reducer", "toy_merge:after=1"], catch_exceptions=False)
    assert chosen.exit_code == 0, chosen.output
    assert "reducer toy_merge: 4 of 16 tokens" in chosen.output
    scores = load_yaml(ckpt.parent / "scores_ss_toy_merge_frac0.25.yml")
    assert scores["reducer"] == {"reducer": "toy_merge", "tokens": 4, "reduction": 0.75, "after": 1}
    # a checkpoint whose description names the reducer runs with it, without options
    dump_yaml({**variant, "net_kwargs": {**variant["net_kwargs"], "reducer": {"name": "toy_merge"}}},
              ckpt.parent / "variant.yml")
    own = CliRunner().invoke(miou_main, common, catch_exceptions=False)
    assert own.exit_code == 0, own.output
    assert load_yaml(ckpt.parent / "scores_ss_frac0.25.yml")["reducer"]["reducer"] == "toy_merge"
    bad = CliRunner().invoke(miou_main, common + ["--reducer", "toy_merge:size=3"])
    assert bad.exit_code != 0 and "toy_merge takes after=BLOCK" in bad.output and "Traceback" not in bad.output


def test_inference_draws_the_merge_map_from_the_token_map(toy, plain_run, tmp_path):
    ckpt, plain, variant = plain_run
    model, net = segm.model.factory.reshare(plain, variant["net_kwargs"], "no_sharing", reducer={"name": "toy_merge"})
    image = np.random.default_rng(3).integers(0, 256, (CROP, 2 * CROP, 3), dtype=np.uint8)
    _, (shared, block) = predict_image(model, image, variant={**variant, "net_kwargs": net}, window_stride=CROP,
                                       return_sharing=True)
    assert shared.all()  # every cell's token covers four cells
    assert len(np.unique(block)) == 2 * 4 and len(np.unique(block[:32, :32])) == 1  # 4 tokens per window
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(image).save(src / "a.png")
    result = CliRunner().invoke(inference_main, ["--model-path", str(ckpt), "-i", str(src), "-o", str(out), "--cpu",
                                                 "--show-sharing", "--reducer", "toy_merge"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_sharing.png"]


def test_the_benchmark_times_the_reducer(toy, tmp_path):
    from tests.test_bench import TINY_ARGS

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(bench.main, TINY_ARGS + ["--no-memory", "--reducer", "toy_merge", "--json", str(out)])
    assert res.exit_code == 0, res.output
    import json

    rows = {r["name"]: r for r in json.loads(out.read_text())["variants"]}
    assert rows["toy_merge"]["reducer"]["tokens"] == 4 and rows["toy_merge"]["reduction"] == 0.75
