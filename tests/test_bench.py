"""segm.bench on a tiny model (2-layer 64-wide ViT at 64 px): result fields, token counts and
FLOPs against the CTS formulas, the interleaving, memory measurement, real-image inputs, the
CLI and its errors. One thread, so a loaded machine does not stall OpenMP barriers."""
import json
import statistics

import pytest
import torch
from click.testing import CliRunner

from segm import bench
from segm.model import TokenBudgetError

TINY = dict(crop_size=64, n_cls=10, overrides=dict(d_model=64, n_heads=2, n_layers=2, decoder_layers=1),
            batch_size=2, warmup=1, repeats=2, matmul_size=128, threads=1)
TINY_ARGS = ["--crop", "64", "--n-cls", "10", "--d-model", "64", "--n-heads", "2", "--n-layers", "2",
             "--decoder-layers", "1", "--batch-size", "2", "--warmup", "1", "--repeats", "2",
             "--matmul-size", "128", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def result():
    cfg = bench.BenchConfig(**TINY, num_shared=3, with_random=True, latency=True,
                            train_step=True)
    return bench.run_benchmark(cfg)


def test_result_fields_tokens_and_flops(result):
    by_name = {r["name"]: r for r in result["variants"]}
    assert list(by_name) == ["no_sharing", "cts", "random"]
    n = 16  # (64/16)²
    for r in by_name.values():
        s = r["num_shared"]
        assert r["tokens"] == n - 3 * s + 1 and r["prefix_tokens"] == 1  # T = N − 3S, + CLS
        assert r["num_notshared"] == n - 4 * s
        assert r["reduction"] == pytest.approx(3 * s / n)
        inf = r["inference"]
        assert len(inf["times_s"]) == 2 and all(t > 0 for t in inf["times_s"])
        assert inf["img_s"]["min"] <= inf["img_s"]["median"] <= inf["img_s"]["max"]
        assert inf["gflop_per_s"] == pytest.approx(r["gflops"] * inf["img_s"]["median"])
        assert inf["memory"]["delta_mib"] >= 0
        assert r["latency_b1"]["ms"]["median"] > 0
        train = r["train"]
        assert len(train["times_s"]) == 2 and train["gflops"] > 2 * (r["gflops"] - r["policy_gflops"])
    ns, c, rnd = by_name["no_sharing"], by_name["cts"], by_name["random"]
    assert ns["num_shared"] == 0 and c["num_shared"] == rnd["num_shared"] == 3
    assert ns["inference"]["speedup"] == 1.0 and ns["inference"]["speedup_paired"] == 1.0
    # The policy net is counted for CTS only; without it CTS costs less than no_sharing, and
    # exactly what the random policy (same token count, no network) costs.
    assert ns["policy_gflops"] == rnd["policy_gflops"] == 0 < c["policy_gflops"]
    assert rnd["gflops"] < ns["gflops"]
    assert c["gflops"] - c["policy_gflops"] == pytest.approx(rnd["gflops"], rel=1e-9)
    assert result["matmul"]["gflop_per_s"]["median"] > 0
    m = result["machine"]
    assert m["cpu"] and m["torch"] == torch.__version__ and m["torch_threads"] == 1
    assert result["protocol"]["policy_net_included"] and result["protocol"]["interleaved"]
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert result["protocol"]["reuse_memory"] is False
    json.dumps(result)  # serialisable


def test_policy_network_timed_alone_in_the_same_rounds(result):
    """The CTS variant's policy network is timed on its own in the inference rounds, as a share
    of the CTS forward, with whether oneDNN's fused conv ran (the first thing to check on a CPU
    where CTS gains less)."""
    from segm.model.policy.fastpath import _ONEDNN_FUSED_CONV

    policy = result["policy_net"]
    cts = next(r for r in result["variants"] if r["name"] == "cts")
    assert len(policy["times_s"]) == len(cts["inference"]["times_s"]) == 2
    assert policy["ms_per_batch"] == pytest.approx(1e3 * statistics.median(policy["times_s"]))
    assert policy["ms_per_image"] == pytest.approx(policy["ms_per_batch"] / 2)
    assert 0 < policy["share_of_cts"]
    assert policy["onednn"] == {"available": _ONEDNN_FUSED_CONV, "layers": 48,
                                "taken": 48 if _ONEDNN_FUSED_CONV else 0}
    line = next(x for x in bench.format_table(result).splitlines() if x.startswith("Policy network alone"))
    assert f"{policy['ms_per_image']:.1f} ms per image" in line


def test_reuse_memory_option_reaches_the_allocator_and_the_report(monkeypatch):
    from segm.bench import run as bench_run

    calls = []
    monkeypatch.setattr(bench_run, "keep_freed_memory", lambda: calls.append(True))
    res = CliRunner().invoke(bench.main, TINY_ARGS + ["--no-memory", "--reuse-memory"])
    assert res.exit_code == 0, res.output
    assert calls == [True] and "freed memory kept (--reuse-memory)" in res.output


def test_thread_count_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the benchmark's 1 (the test run itself uses one thread)
    try:
        bench.run_benchmark(bench.BenchConfig(**{**TINY, "threads": 1, "repeats": 1, "warmup": 0}, memory=False))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_table_has_one_row_per_variant(result):
    table = bench.format_table(result)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["no_sharing", "cts", "random"]
    assert "train img/s" in table and "b1 latency ms" in table


def test_round_robin_rotates_and_times_every_call():
    calls = []
    fns = {k: (lambda x, k=k: calls.append((k, x))) for k in "abc"}
    times = bench.round_robin(fns, inputs=[10, 20], warmup=1, repeats=3, device="cpu")
    assert [len(t) for t in times.values()] == [3, 3, 3]
    timed = calls[3:]
    assert [k for k, _ in timed] == list("abc" + "bca" + "cab")
    assert [x for _, x in timed] == [10] * 3 + [20] * 3 + [10] * 3  # one input per round


def test_peak_memory_tracks_allocations_and_frees():
    mem = bench.measure_peak_memory(lambda _: torch.ones(16 * 2**20).sum(), None, "cpu")  # 64 MiB
    assert mem["delta_mib"] == pytest.approx(64, abs=0.01)

    def two_in_turn(_):
        a = torch.ones(16 * 2**20)
        del a
        b = torch.ones(8 * 2**20)  # noqa: F841
        c = torch.zeros(8 * 2**20) + 1  # noqa: F841 (+1 makes a third 32 MiB tensor)

    assert bench.measure_peak_memory(two_in_turn, None, "cpu")["delta_mib"] == pytest.approx(96, abs=0.01)


def test_real_image_batches(synthetic_root):
    cfg = bench.BenchConfig(batch_size=3, num_batches=2, inputs="synthetic:val", data_root=str(synthetic_root))
    batches = bench.make_batches(cfg, (64, 64), "vit", "cpu")
    assert len(batches) == 2 and all(b.shape == (3, 3, 64, 64) for b in batches)
    ims = torch.cat(batches)
    assert ims.min() >= -1.01 and ims.max() <= 1.01  # vit normalisation
    assert len({tuple(im.flatten()[:64].tolist()) for im in ims}) == 6  # six different images
    same = bench.make_batches(bench.BenchConfig(**{**cfg.__dict__, "same_image": True}), (64, 64), "vit", "cpu")
    assert torch.equal(same[0][0], same[0][2])


def test_default_budget_is_the_reference_schedule():
    assert bench.default_num_shared((32, 32)) == 103  # 612/103 at 512
    assert bench.default_num_shared((30, 30)) == 90  # 540/90 at 480
    cfg = bench.BenchConfig(sweep=(0.0, 0.1, 0.3))
    assert bench.resolve_budgets(cfg, (32, 32)) == (103, [34])  # 0.3 → the reference 103


def test_cli_writes_json_plot_and_table(tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "sweep.png"
    res = CliRunner().invoke(bench.main, TINY_ARGS + ["--sweep", "0,0.25", "--no-memory", "--json", str(out),
                                                      "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["variants"]] == ["no_sharing", "cts", "cts_0.19"]
    # default 30 %: S = round(0.3·16/3) = 2; sweep 0.25: S = 1; 0 is no_sharing itself
    assert [r["num_shared"] for r in data["variants"]] == [0, 2, 1]
    assert [r["tokens"] for r in data["variants"]] == [17, 11, 14]
    assert data["config"]["sweep"] == [0.0, 0.25] and data["machine"]["torch_threads"] == 1
    assert "| no_sharing |" in res.output and "| cts_0.19 |" in res.output
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "sweep.png"]  # no temp files


@pytest.mark.parametrize("args, message", [
    (["--num-shared", "5"], "out of range"),  # max S = 4 on a 4×4 grid
    (["--num-shared", "2", "--token-reduction", "0.3"], "not both"),
    (["--sweep", "0,abc"], "comma-separated"),
    (["--sweep", "0,0.8"], "must lie in [0, 0.75]"),  # through the one budget rule
    (["--repeats", "0"], "--repeats must be"),
    (["--inputs", "nowhere:val"], "unknown dataset"),
])
def test_cli_bad_settings_fail_clearly(tmp_path, args, message):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(bench.main, TINY_ARGS + args + ["--json", str(out)])
    assert res.exit_code != 0
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_bad_budget_raises_before_building():
    with pytest.raises(TokenBudgetError, match="out of range"):
        bench.build_variants(bench.BenchConfig(crop_size=512, num_shared=300))


def test_checkpoint_model_keeps_its_budget_and_policy_weights(tmp_path):
    from segm.model import build_net_kwargs, create_segmenter, save_model

    net = build_net_kwargs("vit_small_patch16_384", "linear", 5, 64, policy_method="policy_net", num_shared=1,
                           d_model=64, n_heads=2, n_layers=1)
    model = create_segmenter(net, policy_ckpt_required=False)
    save_model(model, {"net_kwargs": net}, tmp_path / "ckpt.pth")
    cfg = bench.BenchConfig(model_path=str(tmp_path / "ckpt.pth"), backbone=None)
    variants, info = bench.build_variants(cfg)
    assert [(v.name, v.num_shared) for v in variants] == [("no_sharing", 0), ("cts", 1)]  # its own S
    assert info["policy_weights"].startswith("checkpoint") and info["n_cls"] == 5
    cts_policy = variants[1].model.policy_net.state_dict()
    assert all(torch.equal(t, cts_policy[k]) for k, t in model.policy_net.state_dict().items())
    assert variants[0].model.encoder is variants[1].model.encoder  # one shared encoder



def test_a_reducer_registered_here_runs_through_the_cli(tmp_path, monkeypatch):
    """`--reducer NAME[:KEY=VALUE]` times any registered reducer beside the others, with no change
    outside this file: a toy that keeps every `stride`-th patch token and unmerges features."""
    from segm.model.reduction import rules
    from segm.model.reduction.base import Reducer, TokenMap

    class Strided(Reducer):
        name = "toy"
        unmerge_at = "features"

        def __init__(self, grid, patch_size, stride):
            super().__init__(grid, patch_size)
            self.stride = stride

        def embed(self, vit, im, labels=None, given=None):
            x, tmap = super().embed(vit, im, labels, given)
            n = x.shape[1]
            cells = torch.arange(n, device=x.device) // self.stride  # each cell takes its group's first token
            return x[:, ::self.stride], TokenMap(cells.expand(x.shape[0], n), tmap.grid, n // self.stride)

        def static_tokens(self, grid):
            return grid[0] * grid[1] // self.stride

        def settings(self):
            return {"stride": self.stride}

        def tag(self):
            return "toy" if self.stride == 2 else f"toy_s{self.stride}"

    def check(options, grid):
        stride = options.get("stride", 2)
        if set(options) - {"stride"} or not isinstance(stride, int) or (grid[0] * grid[1]) % stride:
            raise rules.ReductionError(f"toy takes stride=K, K dividing {grid[0] * grid[1]}; got {options}")
        return {"stride": stride}

    monkeypatch.setattr(rules, "_REDUCERS", dict(rules._REDUCERS))  # the registration ends with the test
    rules.register_reducer("toy", lambda red, grid, p, net: Strided(grid, p, red.option("stride", 2)), check=check)
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(bench.main, TINY_ARGS + ["--no-memory", "--reducer", "toy", "--reducer", "toy:stride=4",
                                                      "--json", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(out.read_text())["variants"]}
    assert list(rows) == ["no_sharing", "cts", "toy", "toy_s4"]
    for name, t in (("toy", 8), ("toy_s4", 4)):  # N = 16
        r = rows[name]
        assert (r["patch_tokens"], r["tokens"], r["reduction"]) == (t, t + 1, 1 - t / 16)
        assert r["reducer"]["reducer"] == "toy" and r["reducer"]["tokens"] == t and r["reducer"]["stride"] == 16 // t
        assert r["num_shared"] == 0 and r["policy"] is None and r["policy_gflops"] == 0
        assert r["gflops"] < rows["no_sharing"]["gflops"]
    assert rows["cts"]["reducer"] == {"reducer": "cts", "tokens": 10, "reduction": 6 / 16, "policy": "policy_net",
                                      "num_shared": 2, "num_notshared": 8}
    assert "| toy | – | 9 | 50.0 % |" in res.output
    for args, message in [(["--reducer", "toy:stride=3"], "toy takes stride=K"),
                          (["--reducer", "nothing"], "unknown reducer 'nothing'"),
                          (["--reducer", "toy:stride"], "KEY=VALUE")]:
        res = CliRunner().invoke(bench.main, TINY_ARGS + args)
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output


def test_output_labels_times_the_label_path(monkeypatch):
    """--output labels: every inference call (and its memory probe) returns labels, through
    Segmenter.forward_labels; the training step still trains on the logits."""
    from segm.model.segmenter import Segmenter

    calls = []
    forward_labels = Segmenter.forward_labels

    def spy(self, im, *a, **kw):
        out = forward_labels(self, im, *a, **kw)
        calls.append(out.shape)
        return out

    monkeypatch.setattr(Segmenter, "forward_labels", spy)
    cfg = bench.BenchConfig(**{**TINY, "repeats": 1, "warmup": 0}, num_shared=3, output="labels", train_step=True)
    res = bench.run_benchmark(cfg)
    assert res["protocol"]["output"] == "labels"
    assert calls and all(s == (2, 64, 64) for s in calls)
    assert not any("won outright" in n for n in res["notes"])  # 10 classes: the label path never skips cells
    many = bench.run_benchmark(bench.BenchConfig(**{**TINY, "n_cls": 40, "repeats": 1, "warmup": 0}, output="labels",
                                                 memory=False))
    assert any("won outright" in n for n in many["notes"])  # a random-weight model's labels are the worst case
    assert {r["name"] for r in res["variants"]} == {"no_sharing", "cts"} and all("train" in r for r in res["variants"])
    with pytest.raises(bench.BenchError, match="--output"):
        bench.run_benchmark(bench.BenchConfig(**TINY, output="probs"))
