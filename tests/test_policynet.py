"""Policy-network trainer and evaluator, on the small synthetic dataset."""
import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner

from policynet import eval as pn_eval
from policynet import train as pn_train
from policynet.data import PolicyDataset, TrainBatchSampler, geometry_for
from policynet.metrics import PolicyMeter, policy_loss, reference_budget, top_s
from segm.model.policy import PolicyNet, load_policy_checkpoint
from segm.utils.checkpoint import safe_torch_load

CROP = 64
ITERS = 3
STOP = 1  # the interrupted run stops here, then resumes to ITERS


def _config(root, logdir, **kw):
    base = dict(dataset="synthetic", data_root=str(root), logdir=str(logdir), crop_size=CROP,
                batch_size_train=2, batch_size_test=4, num_workers=0, eval_train_batches=1,
                eval_iterations=1000, pretrained="none", device="cpu", progress=False)
    base.update(kw)
    return pn_train.TrainConfig(**base)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    """An uninterrupted run of ITERS iterations, and the same run stopped at STOP and resumed."""
    logdir = tmp_path_factory.mktemp("policynet_logdir")
    full = pn_train.train(_config(synthetic_root, logdir, exp_name="full", num_iterations=ITERS))
    pn_train.train(_config(synthetic_root, logdir, exp_name="split", num_iterations=STOP))
    resumed = pn_train.train(_config(synthetic_root, logdir, exp_name="split", num_iterations=ITERS, resume=True))
    return {"logdir": logdir, "root": synthetic_root, "full": full, "resumed": resumed}


# ----------------------------------------------------------------------------- loss and metrics
def test_loss_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 3, 3)
    labels = torch.randint(0, 2, (2, 3, 3))
    labels[0, 0, 0] = labels[1, 2, 1] = 255
    valid = labels != 255
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid])
    assert torch.allclose(policy_loss(logits, labels), expected)
    changed = logits.clone()
    changed[0, :, 0, 0] = torch.tensor([50.0, -50.0])  # an ignored cell
    assert torch.equal(policy_loss(changed, labels), policy_loss(logits, labels))
    assert policy_loss(logits, torch.full_like(labels, 255)).item() == 0.0  # not NaN


def test_meter_hand_made():
    # One image, 2×3 grid. Labels: 1 1 255 / 0 0 1. P(class 1) from logits [0, x]: x decides.
    labels = torch.tensor([[[1, 1, 255], [0, 0, 1]]])
    x = torch.tensor([[[3.0, -1.0, 9.0], [2.0, -2.0, -3.0]]])
    logits = torch.stack([torch.zeros_like(x), x], dim=1)
    meter = PolicyMeter(s=3, seed=0)
    meter.update(logits, labels)
    m = meter.compute()
    # valid cells: 5; pred 1 at (0,0),(1,0) [and the ignored (0,2)]; correct: (0,0),(1,1)
    assert m["cells"] == 5 and m["images"] == 1
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["precision"] == pytest.approx(1 / 2)  # tp (0,0); fp (1,0)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["shareable_fraction"] == pytest.approx(3 / 5)
    # policy top-3: (0,2) ignored, (0,0) pure, (1,0) not → 1 / 2 counted
    assert m["top_s_policy"] == pytest.approx(1 / 2)
    assert m["top_s_oracle"] == 1.0  # the three label-1 cells
    assert 0.0 <= m["top_s_random"] <= 1.0
    again = PolicyMeter(s=3, seed=0)
    again.update(logits, labels)
    assert again.compute() == m  # the random baseline is seeded


def test_oracle_prefers_ignore_over_multi_class():
    labels = torch.tensor([[[1, 255, 0, 0]]])
    logits = torch.zeros(1, 2, 1, 4)
    meter = PolicyMeter(s=2)
    meter.update(logits, labels)
    assert meter.compute()["top_s_oracle"] == 1.0  # picks 1 and the ignored cell, never a 0


def test_top_s_and_budget():
    scores = torch.tensor([[[0.1, 0.9], [0.5, 0.7]]])
    assert top_s(scores, 2).tolist() == [[[False, True], [False, True]]]
    with pytest.raises(ValueError, match="does not fit"):
        top_s(scores, 5)
    assert reference_budget("ade20k", 512) == 103  # the reference budgets
    assert reference_budget("pascal_context", 480) == 90
    assert reference_budget("cityscapes", 768) == 336
    assert reference_budget("synthetic", 128) == 6  # round(0.3 · 64 / 3)


# ----------------------------------------------------------------------------- data
def test_dataset_items(synthetic_root):
    val = PolicyDataset("synthetic", "val", data_root=synthetic_root, crop_size=CROP)
    im, label, path = val[0]
    assert im.shape == (3, CROP, CROP) and label.shape == (CROP, CROP) and label.dtype == torch.long
    assert im.min() >= -1 and im.max() <= 1
    assert set(label.unique().tolist()) <= set(range(10)) | {255}
    im2, label2, _ = val[0]
    assert torch.equal(im, im2) and torch.equal(label, label2)  # deterministic val
    train = PolicyDataset("synthetic", "train", data_root=synthetic_root, crop_size=CROP, train=True)
    views = [train[(0, s)] for s in range(6)]
    assert torch.equal(train[(0, 3)][0], views[3][0])  # a seed fixes the view
    assert len({v[0].sum().item() for v in views}) > 1  # different seeds, different crops/flips
    with pytest.raises(ValueError, match="synthetic and custom only"):
        geometry_for("ade20k", 256)
    assert geometry_for("pcontext").size == 480 and geometry_for("cityscapes").mode == "crop"


def test_sampler_resumes_mid_epoch():
    full = list(TrainBatchSampler(10, 3, seed=1, start=0, stop=7))
    tail = list(TrainBatchSampler(10, 3, seed=1, start=4, stop=7))
    assert tail == full[4:]
    epoch0 = [i for b in full[:3] for i, _ in b]
    assert len(set(epoch0)) == 9  # drop_last, no repeats within an epoch


# ----------------------------------------------------------------------------- training
def test_resume_is_bit_identical(runs):
    a = safe_torch_load(runs["logdir"] / "full" / "model.pth")
    b = safe_torch_load(runs["logdir"] / "split" / "model.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs["full"] == runs["resumed"]
    state = safe_torch_load(runs["logdir"] / "split" / "state.pth")
    assert state["iteration"] == ITERS and state["data"]["position"] == ITERS


def test_tensorboard_keeps_the_saved_step_across_a_resume(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["logdir"] / "split"))
    events.Reload()
    assert [e.step for e in events.Scalars("Accuracy/val")] == [STOP, ITERS]


def test_outputs(runs):
    run = runs["logdir"] / "full"
    weights = safe_torch_load(run / "model.pth")
    assert weights["head.weight"].shape == (2, 320, 1, 1) and weights["head.bias"].shape == (2,)
    assert sum(k.startswith("backbone.") for k in weights) == 288
    policy = PolicyNet()
    load_policy_checkpoint(policy, run / "model.pth")
    assert torch.equal(policy.head.bias, weights["head.bias"])
    lines = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert lines[-1]["iteration"] == ITERS and {ln.get("split") for ln in lines} >= {"val", "train"}
    assert max(ln["iteration"] for ln in lines if "loss" in ln) == ITERS  # exactly num_iterations
    assert list(run.glob("events.out.tfevents.*"))
    val = runs["full"]["val"]
    assert val["images"] == 8 and val["num_shared"] == reference_budget("synthetic", CROP)
    assert val["top_s_oracle"] >= val["top_s_policy"] and val["top_s_oracle"] >= val["top_s_random"]


def test_eval_cli_matches_training(runs, tmp_path):
    out = tmp_path / "eval.json"
    ckpt = runs["logdir"] / "full" / "model.pth"
    res = CliRunner().invoke(pn_eval.main, [str(ckpt), "--dataset", "synthetic", "--data-root", str(runs["root"]),
                                            "--num-workers", "0", "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "top-S purity" in res.output and "random" in res.output
    report = json.loads(out.read_text())
    assert report["crop"] == CROP  # taken from the run's config.json
    for key in ("accuracy", "top_s_policy", "top_s_random", "top_s_oracle"):
        assert report[key] == pytest.approx(runs["full"]["val"][key])


def _nan_loss_from(monkeypatch, step):
    """The training loss turns NaN from the given (1-based) step on."""
    real, calls = pn_train.policy_loss, [0]

    def loss(logits, target):
        calls[0] += 1
        out = real(logits, target)
        return out * float("nan") if calls[0] >= step else out

    monkeypatch.setattr(pn_train, "policy_loss", loss)


def test_non_finite_loss_before_any_save(synthetic_root, tmp_path, monkeypatch):
    cfg = _config(synthetic_root, tmp_path, exp_name="nan", num_iterations=2, summary_iterations=1)
    _nan_loss_from(monkeypatch, 1)
    with pytest.raises(pn_train.NonFiniteLossError) as e:
        pn_train.train(cfg)
    message = str(e.value)
    assert "no checkpoint was written yet" in message and "state.pth" not in message
    assert not (tmp_path / "nan" / "state.pth").exists()
    monkeypatch.undo()
    assert pn_train.train(cfg)["val"]["images"] == 8  # the same run starts again, without --resume


def test_non_finite_loss_resumes_from_the_last_save(runs, tmp_path, monkeypatch):
    """The stop names the state.pth of the last save; --resume continues from it and ends with
    the weights of the run that never failed."""
    cfg = _config(runs["root"], tmp_path, exp_name="nan", num_iterations=ITERS, summary_iterations=1,
                  eval_iterations=STOP)
    _nan_loss_from(monkeypatch, STOP + 1)
    with pytest.raises(pn_train.NonFiniteLossError) as e:
        pn_train.train(cfg)
    state_path = tmp_path / "nan" / "state.pth"
    assert f"the last good checkpoint is {state_path} (iteration {STOP})" in str(e.value)
    assert safe_torch_load(state_path)["iteration"] == STOP
    monkeypatch.undo()
    resumed = pn_train.train(dataclasses.replace(cfg, resume=True))
    a = safe_torch_load(runs["logdir"] / "full" / "model.pth")
    b = safe_torch_load(tmp_path / "nan" / "model.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed == runs["full"]


# ----------------------------------------------------------------------------- errors
def _invoke(cmd, args):
    res = CliRunner().invoke(cmd, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res


def test_cli_errors(runs, tmp_path):
    root, logdir = str(runs["root"]), str(runs["logdir"])
    res = _invoke(pn_train.main, ["--dataset", "imagenet"])
    assert res.exit_code == 2 and "imagenet" in res.output
    res = _invoke(pn_train.main, ["--dataset", "synthetic", "--data-root", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "dataset not found" in res.output
    common = ["--dataset", "synthetic", "--data-root", root, "--logdir", logdir, "--crop-size", str(CROP),
              "--pretrained", "none", "--num-workers", "0", "--device", "cpu", "--batch_size_train", "2"]
    res = _invoke(pn_train.main, common + ["--exp_name", "full"])
    assert res.exit_code == 1 and "--resume" in res.output  # never overwrites a run
    res = _invoke(pn_train.main, common + ["--exp_name", "fresh", "--resume"])
    assert res.exit_code == 1 and "no training state" in res.output
    res = _invoke(pn_train.main, common + ["--exp_name", "full", "--resume", "--num_iterations", str(ITERS)])
    assert res.exit_code == 1 and "already at iteration" in res.output
    res = _invoke(pn_train.main, common + ["--exp_name", "full", "--resume", "--lr", "1e-3",
                                           "--num_iterations", "10"])
    assert res.exit_code == 1 and "different settings" in res.output and "lr" in res.output
    res = _invoke(pn_train.main, common + ["--exp_name", "x", "--pretrained", str(tmp_path / "none.pth")])
    assert res.exit_code == 1 and "pretrained weights not found" in res.output

    res = _invoke(pn_eval.main, [str(tmp_path / "missing.pth"), "--dataset", "synthetic", "--data-root", root])
    assert res.exit_code == 1 and "not found" in res.output
    bad = tmp_path / "bad.pth"
    torch.save({"head.weight": torch.zeros(3, 3)}, bad)
    res = _invoke(pn_eval.main, [str(bad), "--dataset", "synthetic", "--data-root", root])
    assert res.exit_code == 1 and "does not fit the policy network" in res.output
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob(".*tmp"))
    assert not math.isnan(runs["full"]["val"]["accuracy"])


def test_data_errors_name_the_file_also_from_workers(synthetic_root, tmp_path):
    """A label of another size is refused by segm's one check; a corrupt image read in a
    DataLoader worker ends the command with the same single line as without workers."""
    import shutil

    import numpy as np
    from PIL import Image

    from segm.data.io import DataError

    root = tmp_path / "synthetic"
    shutil.copytree(synthetic_root, root)
    label = sorted((root / "annotations" / "validation").iterdir())[0]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(label)
    with pytest.raises(DataError, match=f"label {label} is 10x10 but its image") as e:
        PolicyDataset("synthetic", "val", data_root=root, crop_size=CROP)[0]
    assert "must have the same stored size" in str(e.value)

    for image in (root / "images" / "training").iterdir():
        image.write_bytes(b"not an image")
    res = _invoke(pn_train.main, ["--dataset", "synthetic", "--data-root", str(root), "--logdir", str(tmp_path / "runs"),
                                  "--exp_name", "x", "--crop-size", str(CROP), "--pretrained", "none",
                                  "--num-workers", "1", "--device", "cpu", "--batch_size_train", "2",
                                  "--num_iterations", "1", "--no-progress"])
    assert res.exit_code == 1 and "Traceback" not in res.output and "Caught" not in res.output, res.output
    error = res.output[res.output.index("Error: "):].strip()
    assert len(error.splitlines()) == 1 and f"cannot decode image {root / 'images' / 'training'}" in error, res.output


# ----------------------------------------------------------------------------- command line
@pytest.mark.parametrize("args, hflip", [([], True), (["--hflip"], True), (["--no-hflip"], False),
                                         (["--hflip", "1"], True), (["--hflip", "0"], False),
                                         (["--hflip=false"], False), (["--hflip", "0", "--lr", "1e-4"], False)])
def test_hflip_flag_and_reference_spelling(monkeypatch, args, hflip):
    seen = []
    monkeypatch.setattr(pn_train, "train", lambda cfg: seen.append(cfg) or {})
    res = CliRunner().invoke(pn_train.main, ["--dataset", "synthetic", *args])
    assert res.exit_code == 0, res.output
    assert seen[0].hflip is hflip


def test_hflip_refuses_a_non_boolean(monkeypatch):
    monkeypatch.setattr(pn_train, "train", lambda cfg: {})
    res = CliRunner().invoke(pn_train.main, ["--dataset", "synthetic", "--hflip", "maybe"])
    assert res.exit_code == 2 and "'maybe' is not a boolean" in res.output


def test_eval_takes_s_from_the_runs_config(runs, tmp_path):
    """Without --num-shared, S is the one the run reported on its dataset and crop."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pth").write_bytes((runs["logdir"] / "full" / "model.pth").read_bytes())
    record = json.loads((runs["logdir"] / "full" / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**record, "num_shared": 3, "num_shared_eval": 3}))
    assert reference_budget("synthetic", CROP) != 3
    common = [str(run / "model.pth"), "--dataset", "synthetic", "--data-root", str(runs["root"]), "--num-workers", "0",
              "--device", "cpu", "--max-images", "2"]
    for extra, s in [([], 3), (["--num-shared", "2"], 2), (["--crop-size", str(2 * CROP)], None)]:
        res = CliRunner().invoke(pn_eval.main, [*common, *extra, "-o", str(tmp_path / "e.json")])
        assert res.exit_code == 0, res.output
        crop = json.loads((tmp_path / "e.json").read_text())["crop"]
        expected = s if s is not None else reference_budget("synthetic", crop)
        assert json.loads((tmp_path / "e.json").read_text())["num_shared"] == expected
        assert f"S={expected}" in res.output
