"""The GPU path: on CUDA the model computes what it computes on the CPU, its speed features
(autocast, AMP training, torch.compile, CUDA graphs, torchrun/nccl) keep the results, the eager
forward never waits for the GPU, and the CPU-only fast path of the policy network stays off.

Every test is marked `cuda` and skipped, with the reason, where no CUDA device is available
(`make test` on a CPU machine lists them as skipped). Run them with `pytest -m cuda`, or with
`make gpu-check OUT=dir` on a GPU machine. Tests that read a dataset through mmseg's pipelines
are also skipped, with the reason, when mmseg is not importable (install gpu/wheels first).

Tolerances. CPU against CUDA in fp32 (TF32 off: `strict_fp32`): the same operations in
different kernels and summation orders differ by float rounding, about 1e-6 relative per
operation; over two ViT blocks, the decoder and the 16-layer policy network that stays far
below FP32_TOL = 1e-4 (logits are of order 1), while a real fault (a wrong token, position
embedding or window) moves logits by 1e-2 or more. Top-S selections are compared exactly where
the CPU's score gap at the selection boundary exceeds 1e-3 (asserted), else up to near-ties.
"""
import copy
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import segm
from segm.eval.window import sliding_window_inference
from segm.model.reduction import CTS, Reduction, build_reducer, cts
from segm.model.factory import save_model
from segm.model.policy import PolicyNet
from segm.model.policy import fastpath as policy_fastpath
from segm.model.segmenter import Segmenter
from segm.utils.logger import read_log
from tests.helpers.cuda import (K, assert_same_top_s, blocks, boundary_gaps, logits_error, strict_fp32,
                                tiny_net_kwargs)
from tests.helpers.train import load_ckpt, make_policy_ckpt, run_cli, tiny_args

REPO = Path(__file__).resolve().parent.parent
DEVICE = torch.device("cuda")
FP32_TOL = 1e-4
MIN_GAP = 1e-3  # score gap at the top-S boundary that float rounding cannot bridge
# (mean, max) |autocast − fp32| relative to the fp32 logits' mean and max magnitude: bf16 keeps
# 8 significant bits, fp16 11; measured on the CPU's autocast at a quarter of these or less.
AMP_TOL = {torch.bfloat16: (0.01, 0.05), torch.float16: (0.002, 0.01)}
# max |autocast − fp32| of the policy's superpatch probabilities (CPU autocast: 0.02 and 0.003)
POLICY_SCORE_TOL = {torch.bfloat16: 0.1, torch.float16: 0.02}

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module")
def policy_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "policy.pth"
    make_policy_ckpt(path)
    return path


@pytest.fixture(scope="module")
def mmseg():
    try:
        import mmseg.datasets  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: no dataset pipelines here
        pytest.skip(f"mmseg is not importable ({type(e).__name__}: {e}); on a GPU machine install gpu/wheels "
                    "(make gpu-wheels here, then carry gpu/wheels)")


def train_steps(model, steps: int, amp_dtype=None, scaler=None, lr=3e-3) -> list[float]:
    """AdamW steps on fresh `blocks` batches (8 × 128 px); returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        x, y = (t.to(DEVICE) for t in blocks(8, 128, seed=100 + step))
        with torch.autocast(DEVICE.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="module")
def trained(policy_ckpt):
    """A tiny CTS model (policy net, S = 4 of 16) trained in fp32 on `blocks`, so that its class
    margins are real and argmax agreement means something."""
    torch.manual_seed(0)
    model = segm.create_segmenter(tiny_net_kwargs(policy_ckpt)).to(DEVICE)
    with strict_fp32():
        train_steps(model, 150)
        x, y = blocks(8, 128, seed=7)
        with torch.no_grad():
            accuracy = (model(x.to(DEVICE)).argmax(1).cpu() == y).float().mean().item()
    assert accuracy > 0.6, f"the tiny model did not learn the blocks task (accuracy {accuracy:.2f})"
    return model


# ----------------------------------------------------------------------------- CPU = CUDA
@pytest.mark.parametrize("policy_method,decoder", [("policy_net", "linear"), ("policy_net", "mask_transformer"),
                                                   ("no_sharing", "mask_transformer")])
def test_same_checkpoint_same_logits_on_cpu_and_cuda(policy_ckpt, tmp_path, policy_method, decoder):
    net = tiny_net_kwargs(policy_ckpt, policy_method=policy_method, decoder=decoder)
    torch.manual_seed(0)
    save_model(segm.create_segmenter(net), {"net_kwargs": net}, tmp_path / "checkpoint.pth")
    cpu, _ = segm.load_model(tmp_path / "checkpoint.pth")
    gpu = segm.load_model(tmp_path / "checkpoint.pth")[0].to(DEVICE)
    x, _ = blocks(4, 128, seed=1)
    with torch.no_grad(), strict_fp32():
        ref = cpu.forward_all(x)
        out = gpu.forward_all(x.to(DEVICE))
        if policy_method == "policy_net":
            assert boundary_gaps(cpu.reducer.scorer(x, None)[0], 4).min() > MIN_GAP  # no near-tie
            torch.testing.assert_close(out.policy_logits.cpu(), ref.policy_logits, rtol=FP32_TOL, atol=FP32_TOL)
    assert torch.equal(out.layout.shared_idx.cpu(), ref.layout.shared_idx)
    torch.testing.assert_close(out.logits.cpu(), ref.logits, rtol=FP32_TOL, atol=FP32_TOL)


def test_policy_fast_path_is_cpu_only_and_selects_the_same(policy_ckpt, monkeypatch):
    """At 512 px the CPU runs the frozen policy one image at a time with oneDNN's fused conv
    (the controls); CUDA runs the whole batch through plain convs, and selects the same top S."""
    calls, fused = [], []  # (batch, size) of every policy forward; whether each conv took oneDNN
    real_forward, real_onednn = PolicyNet.forward, policy_fastpath.FoldedConvAct._onednn

    def counting_forward(self, im):
        calls.append((im.shape[0], im.shape[-1]))
        return real_forward(self, im)

    def spying_onednn(self, x):
        fused.append(real_onednn(self, x))
        return fused[-1]

    monkeypatch.setattr(PolicyNet, "forward", counting_forward)
    monkeypatch.setattr(policy_fastpath.FoldedConvAct, "_onednn", spying_onednn)
    cpu = segm.create_segmenter(tiny_net_kwargs(policy_ckpt, crop=512, num_shared=103)).eval()
    gpu = copy.deepcopy(cpu).to(DEVICE)
    x, _ = blocks(2, 512, seed=3)
    with torch.no_grad(), strict_fp32():
        s_cpu = cpu.reducer.scorer(x, None)[0]
        cpu_calls, cpu_fused = calls[:], fused[:]
        calls.clear(), fused.clear()
        s_gpu = gpu.reducer.scorer(x.to(DEVICE), None)[0].cpu()
    assert [b for b, size in cpu_calls if size == 512] == [1, 1]  # control: one image at a time
    if policy_fastpath._ONEDNN_FUSED_CONV:
        assert any(cpu_fused)  # control: the CPU took the fused oneDNN conv
    assert calls == [(2, 512)]
    assert fused and not any(fused)
    torch.testing.assert_close(s_gpu, s_cpu, rtol=0, atol=FP32_TOL)
    assert_same_top_s(s_cpu, cts.select_shared(s_cpu, 103), cts.select_shared(s_gpu, 103), 103, tol=FP32_TOL)


def test_sliding_window_inference_cuda_equals_cpu(policy_ckpt):
    cpu = segm.create_segmenter(tiny_net_kwargs(policy_ckpt, decoder="mask_transformer")).eval()
    gpu = copy.deepcopy(cpu).to(DEVICE)
    im = blocks(1, 304, seed=21)[0][0, :, :176]  # (3, 176, 304): overlapping and border-flush windows
    layouts, gaps = {"cpu": [], "cuda": []}, []

    def forward(model, key):
        def run(windows, boxes):
            out = model.forward_all(windows)
            layouts[key].append(out.layout.shared_idx.cpu())
            if key == "cpu":
                gaps.append(boundary_gaps(model.reducer.scorer(windows, None)[0], 4))
            return out.logits
        return run

    with torch.no_grad(), strict_fp32():
        ref = sliding_window_inference(forward(cpu, "cpu"), im, 128, 64, window_batch_size=3)
        out = sliding_window_inference(forward(gpu, "cuda"), im.to(DEVICE), 128, 64, window_batch_size=3)
    assert torch.cat(gaps).min() > MIN_GAP
    assert torch.equal(torch.cat(layouts["cuda"]), torch.cat(layouts["cpu"]))
    torch.testing.assert_close(out.cpu(), ref, rtol=FP32_TOL, atol=FP32_TOL)


def test_evaluate_dataset_cuda_equals_cpu(mmseg, synthetic_root, trained):
    """The trained encoder and decoder with the oracle policy (its selection is exact on both
    devices), scored over the synthetic val set. Scores are rounded to 0.01 %; a few pixels whose
    two best classes tie within float rounding may flip, hence 0.05 percentage points."""
    from torch.utils.data import DataLoader

    from segm.data import build_dataset, val_collate
    from segm.eval.evaluate import evaluate_dataset

    oracle = build_reducer(Reduction(CTS, "oracle", 4), trained.grid, trained.patch_size)
    gpu = Segmenter(trained.encoder, trained.decoder, K, oracle).eval()
    cpu = copy.deepcopy(gpu).cpu()
    data = build_dataset("synthetic", "val", im_size=128, crop_size=128, normalization="vit", data_root=synthetic_root)
    loader = DataLoader(data, batch_size=1, shuffle=False, collate_fn=val_collate, num_workers=0)
    kw = dict(n_cls=K, window_size=128, window_stride=64, progress=False)
    with strict_fp32():
        ref = evaluate_dataset(cpu, loader, device="cpu", **kw)
        out = evaluate_dataset(gpu, loader, device=DEVICE, **kw)
    assert sum(iou > 0 for iou in ref["cat_iou"] if not math.isnan(iou)) >= 3  # predictions vary
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou"):
        assert out[key] == pytest.approx(ref[key], abs=0.05), key
    assert out["cat_iou"] == pytest.approx(ref["cat_iou"], abs=0.05, nan_ok=True)


# ----------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_inference_stays_close_to_fp32(trained, dtype):
    """Under autocast the policy network runs in low precision too, so a superpatch whose score
    is within that precision of the top-S boundary may swap places (a real effect of CTS under
    autocast, bounded here by POLICY_SCORE_TOL); logits and argmax are compared on the images
    whose selection did not change."""
    x = blocks(8, 128, seed=7)[0].to(DEVICE)
    with torch.no_grad(), strict_fp32():
        ref = trained.forward_all(x)
        with torch.autocast(DEVICE.type, dtype=dtype):
            out = trained.forward_all(x)
    s_ref, s_out = (torch.softmax(o.policy_logits.float(), 1)[:, 1].flatten(1).cpu() for o in (ref, out))
    tol = POLICY_SCORE_TOL[dtype]
    assert (s_out - s_ref).abs().max() <= tol
    assert_same_top_s(s_ref, ref.layout.shared_idx.cpu(), out.layout.shared_idx.cpu(), 4, tol=tol)
    same = (out.layout.shared_idx == ref.layout.shared_idx).all(1)
    assert same.sum() >= 4, same.tolist()
    agree = (out.logits[same].argmax(1) == ref.logits[same].argmax(1)).float().mean().item()
    assert agree >= 0.99, f"argmax agreement {agree:.4f} on the images with unchanged selection {same.tolist()}"
    err = logits_error(out.logits[same], ref.logits[same])
    mean_tol, max_tol = AMP_TOL[dtype]
    assert err["mean_rel"] <= mean_tol and err["max_rel"] <= max_tol, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_amp_training_lowers_the_loss(policy_ckpt, dtype):
    """bf16 autocast; fp16 autocast with a GradScaler (as segm.train does). The frozen policy
    network stays untouched."""
    torch.manual_seed(0)
    model = segm.create_segmenter(tiny_net_kwargs(policy_ckpt)).to(DEVICE)
    policy_before = {k: v.clone() for k, v in model.policy_net.state_dict().items()}
    scaler = torch.amp.GradScaler(DEVICE.type) if dtype == torch.float16 else None
    losses = train_steps(model, 40, amp_dtype=dtype, scaler=scaler)
    assert all(math.isfinite(v) for v in losses), losses
    assert statistics.mean(losses[-5:]) < 0.75 * losses[0], losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for k, v in model.policy_net.state_dict().items():
        assert torch.equal(v, policy_before[k]), k
    if scaler is not None:
        assert 0 < scaler.get_scale() < math.inf


@pytest.mark.parametrize("amp_dtype", ["bf16", "fp16"])
def test_train_cli_with_amp_on_cuda(mmseg, synthetic_root, policy_ckpt, tmp_path, amp_dtype):
    """`segm.train --device cuda --amp`: trains, evaluates under autocast, saves the scaler (fp16)."""
    log_dir = tmp_path / "run"
    result = run_cli(tiny_args(
        log_dir, synthetic_root, "--device", DEVICE.type, "--amp", "--amp-dtype", amp_dtype,
        "--policy-method", "policy_net", "--num-tokens-shared", "2", "--policynet-ckpt", str(policy_ckpt),
        "--batch-size", "4", "--iterations", "4", "--eval-freq", "0", "--ckpt-every", "2",
    ))
    assert result.exit_code == 0, result.output
    ckpt = load_ckpt(log_dir)
    assert ckpt["iteration"] == 4
    assert ("loss_scaler" in ckpt) == (amp_dtype == "fp16")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    record = read_log(log_dir / "log.txt")[-1]
    assert math.isfinite(record["train_loss"]) and "val_mean_iou" in record


# ----------------------------------------------------------------------------- compile, graphs
def test_torch_compile_matches_eager(policy_ckpt):
    model = segm.create_segmenter(tiny_net_kwargs(policy_ckpt, decoder="mask_transformer")).to(DEVICE).eval()
    x = blocks(2, 128, seed=5)[0].to(DEVICE)
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad(), strict_fp32():
        assert boundary_gaps(model.reducer.scorer(x, None)[0], 4).min() > MIN_GAP
        eager = model(x)
        out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=FP32_TOL, atol=FP32_TOL)


def test_eager_cts_forward_never_waits_for_the_gpu(policy_ckpt):
    """docs/DESIGN.md: the token-sharing code "never synchronises with the host". A blocking copy
    or a read-back in the forward would stall the CPU until the GPU drains, losing the overlap of
    kernel launches with GPU work (and would break CUDA-graph capture of the eager model)."""
    model = segm.create_segmenter(tiny_net_kwargs(policy_ckpt, decoder="mask_transformer")).to(DEVICE).eval()
    x = blocks(2, 128, seed=5)[0].to(DEVICE)
    with torch.no_grad():
        model(x)  # the first call builds the BN-folded policy copy (a set-up, not the steady state)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.forward_all(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_replay_matches_eager(policy_ckpt):
    """torch.compile(mode="reduce-overhead") replays the static-shape CTS forward (policy, top-S,
    gather, unshare) as CUDA graphs: replayed on another input with another selection, it must
    select again, not bake the recorded selection in."""
    from torch._dynamo.utils import counters

    model = segm.create_segmenter(tiny_net_kwargs(policy_ckpt, decoder="mask_transformer")).to(DEVICE).eval()
    x1, x2 = (blocks(2, 128, seed=s)[0].to(DEVICE) for s in (11, 12))
    counters.clear()
    graphed = torch.compile(model, mode="reduce-overhead", dynamic=False)
    with torch.no_grad(), strict_fp32():
        eager2 = model.forward_all(x2)
        assert not torch.equal(model.forward_all(x1).layout.shared_idx, eager2.layout.shared_idx)
        for _ in range(3):  # warm-up, then recording
            graphed(x1)
        out = graphed(x2).clone()  # a replay (its output buffer is reused by the next one)
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor did not use CUDA graphs"
    torch.testing.assert_close(out, eager2.logits, rtol=FP32_TOL, atol=FP32_TOL)


# ----------------------------------------------------------------------------- torchrun
def torchrun(args: list[str], log_path: Path, timeout: float = 300) -> str:
    """`torchrun --standalone --nproc_per_node 1 ARGS` from the repository; returns its output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "4",
           "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    log_path.write_text(output)
    assert proc.returncode == 0, output[-4000:]
    return output


def test_torchrun_one_process_trains_and_resumes(mmseg, synthetic_root, policy_ckpt, tmp_path):
    """With one process segm.train forms no process group (nothing to reduce); the launch, the
    device choice (cuda:LOCAL_RANK), the checkpoint and the resume are what this proves."""
    log_dir = tmp_path / "run"
    base = ["-m", "segm.train", *tiny_args(
        log_dir, synthetic_root, "--device", DEVICE.type, "--policy-method", "policy_net", "--num-tokens-shared", "2",
        "--policynet-ckpt", str(policy_ckpt), "--batch-size", "4", "--eval-freq", "0", "--ckpt-every", "1",
    )]
    torchrun(base + ["--iterations", "2"], tmp_path / "first.log")
    assert load_ckpt(log_dir)["iteration"] == 2
    output = torchrun(base + ["--iterations", "4", "--resume"], tmp_path / "resumed.log")
    assert f"resumed from {log_dir / 'checkpoint.pth'}" in output
    ckpt = load_ckpt(log_dir)
    assert ckpt["iteration"] == 4 and ckpt["train_state"]["world_size"] == 1


NCCL_PROBE = """
import torch, torch.distributed as dist
dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
t = torch.full((4,), 3.0, device="cuda")
dist.all_reduce(t)
torch.cuda.synchronize()
print("backend", dist.get_backend(), "sum", t.tolist(), flush=True)
dist.destroy_process_group()
"""


def test_nccl_process_group_under_torchrun(tmp_path):
    """The nccl backend itself: a one-rank process group under torchrun all-reduces on the GPU."""
    probe = tmp_path / "nccl_probe.py"
    probe.write_text(NCCL_PROBE)
    output = torchrun([str(probe)], tmp_path / "nccl.log", timeout=120)
    assert "backend nccl sum [3.0, 3.0, 3.0, 3.0]" in output
