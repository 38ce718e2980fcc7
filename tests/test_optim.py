import pytest
import torch
from torch import nn

from segm.optim import PolynomialLR, create_optimizer


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv2d(3, 8, 3)
        self.frozen = nn.Linear(8, 2)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}


def _ids(params):
    return {id(p) for p in params}


def test_sgd_nesterov_groups_with_weight_decay():
    net = _Net()
    opt = create_optimizer(net, "sgd", lr=0.01, weight_decay=1e-4)
    assert isinstance(opt, torch.optim.SGD)
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-4
    for g in opt.param_groups:
        assert g["nesterov"] and g["momentum"] == 0.9 and g["lr"] == 0.01
    assert _ids(decay["params"]) == _ids([net.proj.weight, net.conv.weight])
    assert _ids(no_decay["params"]) == _ids(
        [net.pos_embed, net.cls_token, net.proj.bias, net.norm.weight, net.norm.bias, net.conv.bias]
    )
    # Frozen parameters are not optimised.
    assert not _ids(net.frozen.parameters()) & _ids(no_decay["params"] + decay["params"])
    # Group order follows model.named_parameters() (timm add_weight_decay), so
    # optimiser state dicts line up across runs.
    assert [id(p) for p in no_decay["params"]][:2] == [id(net.pos_embed), id(net.cls_token)]


def test_single_group_at_zero_weight_decay():
    net = _Net()
    opt = create_optimizer(net, lr=0.1)
    assert len(opt.param_groups) == 1
    (g,) = opt.param_groups
    assert g["weight_decay"] == 0.0 and g["nesterov"]
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert [id(p) for p in g["params"]] == [id(p) for p in trainable]


def test_no_weight_decay_method_is_optional():
    net = nn.Sequential(nn.Linear(4, 4))
    no_decay, decay = create_optimizer(net, lr=0.1, weight_decay=0.05).param_groups
    assert _ids(decay["params"]) == {id(net[0].weight)} and _ids(no_decay["params"]) == {id(net[0].bias)}


def test_adamw_option():
    net = _Net()
    opt = create_optimizer(net, "adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
    # At wd = 0 AdamW must not fall back to its 0.01 default.
    assert create_optimizer(net, "adamw", lr=1e-3).param_groups[0]["weight_decay"] == 0.0


def test_bad_optimizer_arguments():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        create_optimizer(_Net(), "adam", lr=0.1)
    with pytest.raises(ValueError, match="no trainable"):
        create_optimizer(nn.Linear(2, 2).requires_grad_(False), lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        create_optimizer(_Net(), lr=0.0)


def _sched(lr0=0.01, iter_max=1000, warmup=0, min_lr=1e-5):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr0, momentum=0.9, nesterov=True)
    return opt, PolynomialLR(opt, lr0, iter_max, warmup_iter=warmup, min_lr=min_lr, power=0.9)


def _lr(opt):
    return opt.param_groups[0]["lr"]


@pytest.mark.parametrize("t", [1, 2, 100, 500, 999, 1000])
def test_poly_formula_without_warmup(t):
    opt, sched = _sched()
    sched.step_update(t)
    expected = (0.01 - 1e-5) * (1 - t / 1000) ** 0.9 + 1e-5
    assert _lr(opt) == pytest.approx(expected, rel=1e-12)


def test_poly_pinned_values():
    opt, sched = _sched()
    sched.step_update(500)
    assert _lr(opt) == pytest.approx(0.0053635084, abs=1e-10)  # 0.00999 * 0.5**0.9 + 1e-5
    sched.step_update(1000)
    assert _lr(opt) == 1e-5  # coef 0 at t = T


@pytest.mark.parametrize("t", [1, 5, 9, 10, 11, 400])
def test_poly_formula_with_warmup(t):
    opt, sched = _sched(warmup=10, iter_max=400)
    sched.step_update(t)
    if t < 10:
        coef = (t / 10) * (1 - 10 / 400) ** 0.9
    else:
        coef = (1 - t / 400) ** 0.9
    assert _lr(opt) == pytest.approx((0.01 - 1e-5) * coef + 1e-5, rel=1e-12)


def test_first_iteration_runs_at_lr0_and_lr_kept_after_iter_max():
    opt, sched = _sched(warmup=10, iter_max=100)
    sched.step_update(0)
    assert _lr(opt) == 0.01  # t = 0 keeps the current lr, even during warm-up
    sched.step_update(100)
    assert _lr(opt) == 1e-5
    opt.param_groups[0]["lr"] = 0.123
    sched.step_update(101)
    assert _lr(opt) == 0.123  # t > T: untouched


def test_schedule_applies_to_all_groups_and_resumes():
    net = _Net()
    opt = create_optimizer(net, lr=0.01, weight_decay=1e-4)
    sched = PolynomialLR(opt, 0.01, 50, warmup_iter=5)
    for t in range(1, 21):
        opt.step()
        sched.step_update(t)
    assert len({g["lr"] for g in opt.param_groups}) == 1
    state = sched.state_dict()
    assert state["num_updates"] == 20

    opt2 = create_optimizer(_Net(), lr=0.01, weight_decay=1e-4)
    opt2.load_state_dict(opt.state_dict())
    sched2 = PolynomialLR(opt2, 1.0, 2)  # overwritten by the state dict
    sched2.load_state_dict(state)
    assert sched2.state_dict() == state
    for s, o in ((sched, opt), (sched2, opt2)):
        s.step_update(21)
    assert _lr(opt) == _lr(opt2)


def test_load_reference_scheduler_state():
    # A reference checkpoint's `lr_scheduler` entry (torch _LRScheduler state).
    ref = {"step_size": 1, "iter_warmup": 0, "iter_max": 1000, "power": 0.9, "min_lr": 1e-5,
           "base_lrs": [0.001], "last_epoch": 2527, "_step_count": 2528, "_last_lr": [0.0009]}
    opt, sched = _sched()
    sched.load_state_dict(ref)
    assert (sched.lr0, sched.iter_max, sched.num_updates, sched.min_lr) == (0.001, 1000, 2527, 1e-5)
    with pytest.raises(KeyError, match="PolynomialLR"):
        sched.load_state_dict({"foo": 1})


def test_scheduler_argument_checks():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="iter_max"):
        PolynomialLR(opt, 0.1, 0)
    with pytest.raises(ValueError, match="warmup_iter"):
        PolynomialLR(opt, 0.1, 10, warmup_iter=10)
