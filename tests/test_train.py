"""`python -m segm.train`: outputs, recipe, log-folder rules, clear errors, non-finite loss,
the loss (`segm.train.loss`) and the deterministic data helpers (`segm.utils.determinism`).
Tiny runs on the synthetic fixture (crop 64, one encoder layer), in process through click's
CliRunner (`tests/helpers/train.py`)."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.utils.data import Dataset

import segm
from segm import train as train_mod
from segm.optim import PolynomialLR
from segm.train import loop, loss as train_loss
from segm.utils import determinism
from segm.utils.logger import read_log, restore_log
from tests.helpers.train import load_ckpt, make_policy_ckpt, run_cli, tiny_args

REFERENCE_CKPT_KEYS = {"model", "optimizer", "n_cls", "lr_scheduler", "epoch"}
REFERENCE_VARIANT_KEYS = {"world_batch_size", "version", "resume", "amp", "log_dir", "dataset_kwargs",
                          "algorithm_kwargs", "optimizer_kwargs", "net_kwargs", "inference_kwargs"}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- full run
@pytest.fixture(scope="module")
def cts_run(synthetic_root, tmp_path_factory):
    """2 epochs × 3 iterations of a CTS model (policy_net, S = 2 of 4), eval at the end only."""
    tmp = tmp_path_factory.mktemp("cts_run")
    policy_state = make_policy_ckpt(tmp / "policy.pth")
    log_dir = tmp / "run"
    args = tiny_args(log_dir, synthetic_root, "--policy-method", "policy_net", "--num-tokens-shared", "2",
                     "--num-tokens-notshared", "8", "--policynet-ckpt", str(tmp / "policy.pth"),
                     "--batch-size", "8", "--epochs", "2", "--eval-freq", "0", "-lr", "0.01",
                     "--warmup-iter", "2")
    result = run_cli(args)
    return dict(log_dir=log_dir, args=args, result=result, policy_state=policy_state)


def test_run_outputs_reference_files(cts_run):
    log_dir, result = cts_run["log_dir"], cts_run["result"]
    assert result.exit_code == 0, result.output
    ckpt = load_ckpt(log_dir)
    assert REFERENCE_CKPT_KEYS | {"variant", "format", "iteration", "train_state"} <= set(ckpt)
    assert "loss_scaler" not in ckpt  # no AMP
    assert ckpt["n_cls"] == 10 and ckpt["epoch"] == 1 and ckpt["iteration"] == 6
    assert not any(k.startswith("module.") for k in ckpt["model"])
    # The policy net stayed frozen, BatchNorm statistics included (docs/DESIGN.md, "Policies").
    for k, v in cts_run["policy_state"].items():
        assert torch.equal(ckpt["model"][f"policy_net.{k}"], v), k
    opt_group = ckpt["optimizer"]["param_groups"][0]
    assert opt_group["nesterov"] and opt_group["momentum"] == 0.9

    text = (log_dir / "variant.yml").read_text()
    assert "!!python/tuple" in text
    variant = segm.config.load_yaml(log_dir / "variant.yml")
    assert REFERENCE_VARIANT_KEYS <= set(variant)
    assert variant["net_kwargs"]["policy_schedule"] == (8, 2)
    assert variant["net_kwargs"]["image_size"] == (64, 64)
    assert variant["optimizer_kwargs"]["iter_max"] == 6 and variant["optimizer_kwargs"]["poly_power"] == 0.9
    assert variant["dataset_kwargs"]["batch_size"] == 8 and variant["world_batch_size"] == 8
    assert list(log_dir.glob("events.out.tfevents.*"))

    model, loaded_variant = segm.load_model(log_dir / "checkpoint.pth")
    assert loaded_variant["net_kwargs"]["policy_method"] == "policy_net"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10, 64, 64)


def poly_lrs(iter_max, lr0=0.01, warmup=2):
    """The lr after each update t = 1..iter_max of the reference schedule."""
    sched = PolynomialLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr0), lr0, iter_max, warmup,
                         1e-5, 0.9)
    lrs = []
    for t in range(1, iter_max + 1):
        sched.step_update(t)
        lrs.append(sched.get_last_lr()[0])
    return lrs


def test_log_lines_follow_the_recipe(cts_run):
    records = read_log(cts_run["log_dir"] / "log.txt")
    assert [r["epoch"] for r in records] == [0, 1]
    assert [r["num_updates"] for r in records] == [3, 6]
    assert "val_mean_iou" not in records[0]  # --eval-freq 0: evaluate at the end only
    assert {"val_pixel_accuracy", "val_mean_accuracy", "val_mean_iou"} <= set(records[1])
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in records)
    # train_learning_rate = mean of the per-iteration lr after step_update (the reference meter),
    # with the polynomial schedule: lr0 0.01, iter_max 6, warm-up 2, min 1e-5, power 0.9.
    lrs = poly_lrs(6)
    assert records[0]["train_learning_rate"] == pytest.approx(sum(lrs[:3]) / 3, rel=1e-12)
    assert records[1]["train_learning_rate"] == pytest.approx(sum(lrs[3:]) / 3, rel=1e-12)


def test_rerun_of_a_finished_run_changes_nothing(cts_run):
    log_dir = cts_run["log_dir"]
    before = (log_dir / "checkpoint.pth").read_bytes(), (log_dir / "log.txt").read_text()
    result = run_cli(cts_run["args"])
    assert result.exit_code == 0 and "already complete" in result.output
    assert before == ((log_dir / "checkpoint.pth").read_bytes(), (log_dir / "log.txt").read_text())


def with_option(args, name, value):
    out = list(args)
    out[out.index(name) + 1] = value
    return out


def test_changed_config_is_refused_then_resume_and_overwrite(cts_run, tmp_path):
    import shutil

    log_dir = tmp_path / "run"
    shutil.copytree(cts_run["log_dir"], log_dir)
    args = with_option(cts_run["args"], "--log-dir", str(log_dir))
    ckpt_bytes = (log_dir / "checkpoint.pth").read_bytes()

    result = run_cli(args + ["--dropout", "0.1"])
    assert result.exit_code != 0
    assert "different configuration" in result.output and "net_kwargs.dropout: 0.0 -> 0.1" in result.output
    assert (log_dir / "checkpoint.pth").read_bytes() == ckpt_bytes

    result = run_cli(args + ["--no-resume"])
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert (log_dir / "checkpoint.pth").read_bytes() == ckpt_bytes

    # An explicit --resume continues the run under the new schedule: one more epoch.
    result = run_cli(with_option(args, "--epochs", "3") + ["--resume"])
    assert result.exit_code == 0, result.output
    assert "optimizer_kwargs.iter_max: 6 -> 9" in result.output
    records = read_log(log_dir / "log.txt")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert load_ckpt(log_dir)["iteration"] == 9
    assert records[:2] == read_log(cts_run["log_dir"] / "log.txt")
    assert records[2]["train_learning_rate"] == pytest.approx(sum(poly_lrs(9)[6:]) / 3, rel=1e-12)

    result = run_cli(args + ["--overwrite", "--resume"])
    assert result.exit_code != 0 and "contradict" in result.output
    result = run_cli(with_option(args, "--epochs", "1") + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in read_log(log_dir / "log.txt")] == [0]
    assert load_ckpt(log_dir)["iteration"] == 3
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1


def test_amp_fp16_iterations_stop_mid_epoch(synthetic_root, tmp_path):
    log_dir = tmp_path / "run"
    result = run_cli(tiny_args(log_dir, synthetic_root, "--policy-method", "random", "--num-tokens-shared", "2",
                               "--batch-size", "8", "--iterations", "2", "--amp", "--amp-dtype", "fp16"))
    assert result.exit_code == 0, result.output
    ckpt = load_ckpt(log_dir)
    assert {"scale", "_growth_tracker"} <= set(ckpt["loss_scaler"])
    assert ckpt["iteration"] == 2 and ckpt["epoch"] == -1  # no epoch completed
    assert (ckpt["train_state"]["next_epoch"], ckpt["train_state"]["next_batch"]) == (0, 2)
    [record] = read_log(log_dir / "log.txt")
    assert record["num_updates"] == 2 and "val_mean_iou" in record
    assert segm.config.load_yaml(log_dir / "variant.yml")["optimizer_kwargs"]["iter_max"] == 2


def test_custom_dataset(synthetic_root, tmp_path):
    log_dir = tmp_path / "run"
    args = with_option(tiny_args(log_dir, synthetic_root, "--policy-method", "no_sharing", "--iterations", "1",
                                 "--classes", str(synthetic_root / "classes.yml")), "--dataset", "custom")
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    variant = segm.config.load_yaml(log_dir / "variant.yml")
    assert variant["dataset_kwargs"]["dataset"] == "custom" and variant["net_kwargs"]["n_cls"] == 10
    result = run_cli([a for a in args if a not in ("--data-root", str(synthetic_root))] + ["--overwrite"])
    assert result.exit_code != 0 and "needs --data-root" in result.output


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--policy-method", "policy_net", "--num-tokens-shared", "2", "--policynet-ckpt", "missing/model.pth"],
         "policy-network checkpoint not found: missing/model.pth"),
        (["--policy-method", "policy_net", "--num-tokens-shared", "2"], "needs --policynet-ckpt"),
        (["--policy-method", "random", "--num-tokens-shared", "2", "--num-tokens-notshared", "9"],
         "U must be N − 4S = 8"),
        (["--policy-method", "random", "--num-tokens-shared", "5"], "out of range"),
        (["--policy-method", "random", "--num-tokens-shared", "2", "--window-size", "128"],
         "use windows of the crop (--window-size 64"),
        (["--policy-method", "no_sharing", "--batch-size", "0"], "--batch-size must be positive"),
        (["--policy-method", "no_sharing", "-lr", "inf"], "--learning-rate must be a positive finite number, got inf"),
        (["--policy-method", "no_sharing", "-lr", "nan"], "--learning-rate must be a positive finite number, got nan"),
        (["--policy-method", "no_sharing", "--pretrained", "missing/S_16.npz"],
         "pretrained weights not found: missing/S_16.npz"),
    ],
)
def test_bad_options_give_one_clear_error(synthetic_root, tmp_path, extra, message):
    log_dir = tmp_path / "run"
    result = run_cli(tiny_args(log_dir, synthetic_root, *extra))
    assert result.exit_code != 0
    assert message in result.output
    assert result.output.strip().count("\n") == 0, result.output  # one line, no traceback
    assert not log_dir.exists()


def test_global_batch_must_split_over_the_processes(synthetic_root, tmp_path):
    from types import SimpleNamespace

    params = {p.name: p.default for p in train_mod.main.params if p.expose_value}  # not --version
    o = SimpleNamespace(**{**params, "log_dir": tmp_path, "dataset": "ade20k", "backbone": "vit_small_patch16_384",
                           "policy_method": "no_sharing"})
    resolved = train_mod.resolve_options(o, world_size=8)
    # The reference ADE20K recipe (docs/DESIGN.md, "Training recipe"), windows = crop.
    assert (resolved.batch_size, resolved.epochs, resolved.learning_rate, resolved.eval_freq) == (8, 64, 1e-3, 2)
    assert (resolved.im_size, resolved.crop_size, resolved.window_size, resolved.window_stride) == (512,) * 4
    assert (resolved.drop_path, resolved.dropout, resolved.min_lr, resolved.warmup_iter) == (0.1, 0.0, 1e-5, 0)
    with pytest.raises(train_mod.ConfigError, match="divisible by the 3 processes"):
        train_mod.resolve_options(o, world_size=3)


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    log_dir = tmp_path / "run"
    result = run_cli(tiny_args(log_dir, tmp_path / "nowhere", "--policy-method", "no_sharing"))
    assert result.exit_code != 0
    assert "synthetic dataset not found" in result.output and "prepare_synthetic" in result.output
    assert result.output.strip().count("\n") == 0, result.output
    monkeypatch.delenv("DATASET", raising=False)
    args = [a for a in tiny_args(log_dir, "x", "--policy-method", "no_sharing") if a not in ("--data-root", "x")]
    result = run_cli(with_option(args, "--dataset", "ade20k"))
    assert result.exit_code != 0 and "export DATASET=" in result.output
    monkeypatch.setenv("DATASET", str(tmp_path))
    result = run_cli(with_option(args, "--dataset", "ade20k"))
    assert result.exit_code != 0 and "ade20k dataset not found" in result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert not log_dir.exists()


def poison_loss(monkeypatch, at_call: int) -> None:
    """The training loss becomes NaN at its `at_call`-th computation."""
    calls = {"n": 0}
    real_loss = train_loss.segmentation_loss

    def poisoned(logits, target, world_size=1):
        calls["n"] += 1
        loss, value = real_loss(logits, target, world_size)
        if calls["n"] == at_call:
            return loss * float("nan"), value * float("nan")
        return loss, value

    monkeypatch.setattr(loop, "segmentation_loss", poisoned)


def no_sharing_run(log_dir, root, *extra):
    return run_cli(tiny_args(log_dir, root, "--policy-method", "no_sharing", "--batch-size", "8", *extra))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_root, tmp_path, monkeypatch):
    poison_loss(monkeypatch, at_call=3)
    log_dir = tmp_path / "run"
    result = no_sharing_run(log_dir, synthetic_root, "--epochs", "2", "--ckpt-every", "2")
    assert result.exit_code == 3
    assert "loss is nan at iteration 3" in result.output and "iteration 2" in result.output
    ckpt = load_ckpt(log_dir)
    assert ckpt["iteration"] == 2 and ckpt["train_state"]["next_batch"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (log_dir / "log.txt").exists() or read_log(log_dir / "log.txt") == []


def test_non_finite_loss_before_any_checkpoint_says_there_is_none(synthetic_root, tmp_path, monkeypatch):
    poison_loss(monkeypatch, at_call=1)
    log_dir = tmp_path / "run"
    result = no_sharing_run(log_dir, synthetic_root, "--epochs", "1", "--ckpt-every", "2")
    assert result.exit_code == 3
    assert "loss is nan at iteration 1" in result.output
    assert "No checkpoint was written yet" in result.output and "(iteration None)" not in result.output
    assert not (log_dir / "checkpoint.pth").exists()


def test_no_final_eval_skips_only_the_evaluation_at_the_end(synthetic_root, tmp_path):
    """--no-final-eval: the last epoch is not evaluated unless --eval-freq asks for it; the run
    and its checkpoint are otherwise complete."""
    for extra, evaluated in (("--eval-freq", "0"), False), (("--eval-freq", "1"), True):
        log_dir = tmp_path / f"run_{evaluated}"
        result = no_sharing_run(log_dir, synthetic_root, "--iterations", "1", "--no-final-eval", *extra)
        assert result.exit_code == 0, result.output
        record = read_log(log_dir / "log.txt")[-1]
        assert record["num_updates"] == 1 and ("val_mean_iou" in record) == evaluated
        assert load_ckpt(log_dir)["iteration"] == 1


def test_exploded_training_never_replaces_the_good_checkpoint(synthetic_root, tmp_path):
    """An absurd learning rate destroys the weights while they stay finite: neither the exploded
    loss nor the exploded weights may replace the good checkpoint, which stays resumable."""
    log_dir = tmp_path / "run"
    args = tiny_args(log_dir, synthetic_root, "--policy-method", "no_sharing", "--batch-size", "8",
                     "--ckpt-every", "1", "--eval-freq", "0")
    assert run_cli(args + ["--iterations", "2"]).exit_code == 0
    good = load_ckpt(log_dir)
    result = run_cli(args + ["--iterations", "6", "--resume", "-lr", "1e12"])
    assert result.exit_code == 3
    assert "exploded" in result.output and "The last good checkpoint is" in result.output
    assert "(iteration 2)" in result.output
    kept = load_ckpt(log_dir)
    assert kept["iteration"] == 2 and all(torch.equal(kept["model"][k], v) for k, v in good["model"].items())
    resumed = run_cli(args + ["--iterations", "4", "--resume"])
    assert resumed.exit_code == 0, resumed.output


def test_exploded_loss_stops_before_the_update(synthetic_root, tmp_path, monkeypatch):
    real_loss = train_loss.segmentation_loss
    monkeypatch.setattr(loop, "segmentation_loss",
                        lambda logits, target, world_size=1: [v * 1e6 for v in real_loss(logits, target, world_size)])
    log_dir = tmp_path / "run"
    result = no_sharing_run(log_dir, synthetic_root, "--iterations", "2")
    assert result.exit_code == 3
    assert "at iteration 1" in result.output and "exploded: above 100·ln K" in result.output


SYNTHETIC_CLASSES = ("sky", "wall", "floor", "grass", "road", "water", "tree", "ball", "box", "sign")


def test_tensorboard_keeps_every_step_across_a_resume(synthetic_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "run"
    base = tiny_args(log_dir, synthetic_root, "--policy-method", "no_sharing", "--batch-size", "8",
                     "--eval-freq", "0", "--ckpt-every", "1")
    assert run_cli(base + ["--iterations", "3"]).exit_code == 0
    assert run_cli(base + ["--iterations", "6", "--resume"]).exit_code == 0
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    per_class = [t for t in events.Tags()["scalars"] if t.startswith("val_iou/")]
    assert per_class and all(t.split("/")[1] in SYNTHETIC_CLASSES for t in per_class)  # by class name
    assert "model/reduction/text_summary" in events.Tags()["tensors"]  # the reduction, beside the curves


# ----------------------------------------------------------------------------- loss and determinism
def test_resumable_sampler_matches_distributed_layout_and_skips():
    full = determinism.ResumableSampler(10, seed=3)
    full.set_epoch(2)
    order = [i for _, i in full]
    assert sorted(order) == list(range(10))
    assert all(e == 2 for e, _ in full)
    ref = torch.utils.data.DistributedSampler(range(10), num_replicas=2, rank=1, shuffle=True, seed=3)
    ref.set_epoch(2)
    r1 = determinism.ResumableSampler(10, num_replicas=2, rank=1, seed=3)
    r1.set_epoch(2)
    assert [i for _, i in r1] == list(ref)
    r1.set_epoch(2, start=2)
    assert [i for _, i in r1] == list(ref)[2:] and len(r1) == 3
    # A global batch of 4 over 2 ranks (2 each) holds the same samples as on one process.
    ranks = [determinism.ResumableSampler(10, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    per_rank = [[i for _, i in s] for s in ranks]
    assert sorted(per_rank[0][:2] + per_rank[1][:2]) == sorted(order[:4])


class _RandomItems(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_seeded_dataset_depends_only_on_seed_epoch_index():
    ds = determinism.SeededDataset(_RandomItems(), seed=7)
    a = ds[(1, 3)]
    np.random.seed(123)
    random.seed(5)
    torch.manual_seed(9)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    assert ds[(1, 3)] == a  # the caller's RNG does not matter ...
    assert random.getstate() == states[0]  # ... and is left untouched
    assert np.array_equal(np.random.get_state()[1], states[1]) and torch.equal(torch.get_rng_state(), states[2])
    assert ds[(2, 3)] != a and ds[(1, 4)] != a
    assert determinism.SeededDataset(_RandomItems(), seed=8)[(1, 3)] != a


def test_loss_is_the_global_mean_and_safe_on_empty_batches():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, :3] = 255
    loss, value = train_loss.segmentation_loss(logits, target)
    ref = F.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(value, ref.detach())
    loss, value = train_loss.segmentation_loss(logits, torch.full_like(target, 255))
    assert loss.item() == 0.0 and value.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_rng_state_round_trip():
    state = determinism.get_rng_state(torch.device("cpu"))
    draws = random.random(), np.random.rand(), torch.rand(2)
    determinism.set_rng_state(state, torch.device("cpu"))
    again = random.random(), np.random.rand(), torch.rand(2)
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_set_numerics_sets_every_deterministic_flag(monkeypatch):
    """One function sets the flags of --deterministic, cuBLAS's workspace among them."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        determinism.set_numerics(False, torch.device("cpu"))
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        determinism.set_numerics(True, torch.device("cpu"))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_restore_log_keeps_covered_epochs_and_the_pending_record(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("".join(json.dumps({"epoch": e, "x": e}) + "\n" for e in range(3)) + '{"epoch": 3, "x"')
    restore_log(path, before_epoch=2, pending={"epoch": 1, "x": 1})
    assert read_log(path) == [{"epoch": 0, "x": 0}, {"epoch": 1, "x": 1}]
    path.write_text(json.dumps({"epoch": 0}) + "\n")
    restore_log(path, before_epoch=2, pending={"epoch": 1, "x": 9})  # crashed before appending
    assert read_log(path) == [{"epoch": 0}, {"epoch": 1, "x": 9}]
    restore_log(path, before_epoch=1, pending={"epoch": 1, "x": 9})  # record of an epoch to be redone
    assert read_log(path) == [{"epoch": 0}]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("policy", ["policy_net", "no_sharing"])
def test_train_then_eval_then_inference(policy, cts_run, synthetic_root, tmp_path):
    """The three daily commands chained on one tiny run, with CTS and without."""
    from segm.config import load_yaml
    from segm.eval.miou import main as miou_main
    from segm.inference import main as inference_main

    if policy == "policy_net":
        log_dir = cts_run["log_dir"]
        assert cts_run["result"].exit_code == 0, cts_run["result"].output
    else:
        log_dir = tmp_path / "run"
        result = run_cli(tiny_args(log_dir, synthetic_root, "--policy-method", "no_sharing",
                                   "--batch-size", "8", "--iterations", "2", "--eval-freq", "0"))
        assert result.exit_code == 0, result.output
    ckpt = log_dir / "checkpoint.pth"
    result = CliRunner().invoke(miou_main, [str(ckpt), "synthetic", "--data-root", str(synthetic_root),
                                            "--im-size", "64", "--num-workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    scores = load_yaml(log_dir / "scores_ss.yml")
    assert 0 <= scores["mean_iou"] <= 100 and scores["inference"] == "single_scale"
    images = sorted((synthetic_root / "images" / "validation").iterdir())[:2]
    out = tmp_path / "pred"
    result = CliRunner().invoke(inference_main, ["--model-path", str(ckpt), "-i", str(images[0].parent),
                                                 "-o", str(out), "--cpu", "--show-sharing"])
    assert result.exit_code == 0, result.output
    preds = {p.name for p in out.iterdir()}
    assert f"{images[0].stem}.png" in preds
    assert (f"{images[0].stem}_sharing.png" in preds) == (policy == "policy_net")
