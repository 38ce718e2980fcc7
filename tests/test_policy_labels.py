"""Policy labels from ground truth (docs/DESIGN.md, "Policies"): every rule pinned on hand-made maps."""
import pytest
import torch
import torch.nn.functional as F

from segm.data import IGNORE_LABEL, PolicyLabelRules, policy_labels, rules_for

I = IGNORE_LABEL


def grid_map(blocks, block=32):
    """Label map from a grid of 32×32 block contents; each entry is a list of values that
    fill the block in vertical stripes (one value = uniform block)."""
    rows = []
    for row in blocks:
        cells = []
        for values in row:
            cell = torch.empty(block, block, dtype=torch.long)
            for k, v in enumerate(values):
                cell[:, k * block // len(values):(k + 1) * block // len(values)] = v
            cells.append(cell)
        rows.append(torch.cat(cells, 1))
    return torch.cat(rows, 0)


def reference_policy_gt(gt, rules, block=32):
    """Literal transcription of the reference `policy_gt_gen` (float max-pools)."""
    gt = gt.clone().float()
    if rules.zero_is_ignore:
        gt[gt == 0] = 255
    mx = F.max_pool2d(gt[:, None], block)[:, 0]
    mn = -F.max_pool2d(-gt[:, None], block)[:, 0]
    one_class = mx == mn
    gt2 = gt.clone()
    gt2[gt2 == 255] = -1000
    mx2 = F.max_pool2d(gt2[:, None], block)[:, 0]
    one_plus_ignore = (mx2 == mn) & ~one_class
    label = one_class.long()
    if not rules.group_if_all_ignore:
        label[one_class & (mx == 255)] = 255
    if rules.ignore_if_one_class_plus_ignore:
        label[one_plus_ignore] = 255
    if rules.ignore_if_one_class_plus_ignore_border:
        border = torch.zeros_like(one_class)
        border[:, 0, :] = border[:, -1, :] = border[:, :, 0] = border[:, :, -1] = True
        label[one_plus_ignore & border] = 255
    return label


# A 3×3 grid whose centre cell is interior: the outer ring is the other 8 cells.
def case_map(centre):
    cells = [[[4], [4, 7], [I]], [[5, I], centre, [2]], [[0], [0, I], [I, I]]]
    return grid_map(cells)


@pytest.mark.parametrize(
    "values, expected",
    [([3], 1), ([3, 8], 0), ([I], 1), ([3, 8, I], 0), ([3, I], 0), ([0], 1)],
    ids=["one-class", "two-classes", "all-ignore", "two-classes+ignore", "one+ignore", "zero-class"],
)
def test_cityscapes_rules_interior(values, expected):
    out = policy_labels(case_map(values), rules_for("cityscapes"))
    assert out[1, 1].item() == expected


def test_cityscapes_whole_grid():
    out = policy_labels(case_map([3]), rules_for("cityscapes"))
    # [4]→1, [4,7]→0, [I]→1 / [5,I]→0, centre 1, [2]→1 / [0]→1, [0,I]→0, [I,I]→1
    assert out.tolist() == [[1, 0, 1], [0, 1, 1], [1, 0, 1]]
    assert out.dtype == torch.long


def test_ade20k_border_rule():
    rules = rules_for("ade20k")
    assert rules.ignore_if_one_class_plus_ignore_border and not rules.zero_is_ignore
    out = policy_labels(case_map([3, I]), rules)
    # one class + ignore: 0 in the interior, 255 on the outer ring; others as cityscapes
    assert out.tolist() == [[1, 0, 1], [I, 0, 1], [1, I, 1]]


def test_pascal_context_background_is_ignore():
    rules = rules_for("pascal_context")
    assert rules == rules_for("pcontext") and rules.zero_is_ignore
    out = policy_labels(case_map([3]), rules)
    # [0, I] becomes all-ignore → 1 (cityscapes: one class + ignore → 0)
    assert out.tolist() == [[1, 0, 1], [0, 1, 1], [1, 1, 1]]
    # background + one class = one class + ignore → 0; background + two classes → 0
    assert policy_labels(grid_map([[[0, 5], [0, 5, 6], [0]]]), rules).tolist() == [[0, 0, 1]]
    cs = rules_for("cityscapes")
    assert policy_labels(grid_map([[[0, I]]]), cs).item() == 0
    assert policy_labels(grid_map([[[0, I]]]), rules).item() == 1


def test_group_if_all_ignore_false():
    rules = PolicyLabelRules(group_if_all_ignore=False)
    out = policy_labels(grid_map([[[I], [3], [3, I]]]), rules)
    assert out.tolist() == [[I, 1, 0]]


def test_ignore_if_one_class_plus_ignore_everywhere():
    rules = PolicyLabelRules(ignore_if_one_class_plus_ignore=True)
    out = policy_labels(case_map([3, I]), rules)
    assert out.tolist() == [[1, 0, 1], [I, I, 1], [1, I, 1]]


def test_synthetic_and_custom_follow_cityscapes():
    assert rules_for("synthetic") == rules_for("custom") == rules_for("cityscapes") == PolicyLabelRules()
    with pytest.raises(ValueError, match="unknown dataset"):
        rules_for("imagenet")


def _random_block_maps(b, gh, gw, seed):
    """Maps whose blocks hit every case: uniform, ignore, one+ignore, many classes, zeros."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.randint(0, 5, (b, gh, gw), generator=g)
    lab = torch.randint(0, 6, (b, gh * 32, gw * 32), generator=g)
    up = lambda t: t.repeat_interleave(32, 1).repeat_interleave(32, 2)  # noqa: E731
    k = up(kinds)
    uniform = up(torch.randint(0, 6, (b, gh, gw), generator=g))
    lab = torch.where(k == 0, uniform, lab)
    lab = torch.where(k == 1, torch.full_like(lab, I), lab)
    sparse_ignore = torch.rand(lab.shape, generator=g) < 0.3
    lab = torch.where((k == 2) & sparse_ignore, torch.full_like(lab, I), torch.where(k == 2, uniform, lab))
    lab = torch.where((k == 3) & sparse_ignore, torch.full_like(lab, I), lab)
    return lab


@pytest.mark.parametrize(
    "rules",
    [
        rules_for("ade20k"),
        rules_for("pascal_context"),
        rules_for("cityscapes"),
        PolicyLabelRules(False, False, True, False),
        PolicyLabelRules(True, False, False, True),
    ],
)
def test_matches_reference_on_random_maps(rules):
    lab = _random_block_maps(3, 5, 7, seed=0)
    assert torch.equal(policy_labels(lab, rules), reference_policy_gt(lab, rules))


def test_ade_premap_equals_reduce_zero_label():
    """Reference: raw ADE labels with gt==0 → 255; ours: reduce_zero_label (0→255, −1)."""
    m = _random_block_maps(2, 4, 5, seed=1)
    raw = torch.where(m == I, 0, m + 10)  # ADE file values: 0 = other, classes ≥ 1
    reduced = torch.where(raw == 0, I, raw - 1)
    premapped = torch.where(raw == 0, I, raw)
    rules = rules_for("ade20k")
    assert torch.equal(policy_labels(reduced, rules), reference_policy_gt(premapped, rules))


def test_batch_and_2d_inputs_agree():
    lab = _random_block_maps(4, 3, 4, seed=2)
    rules = rules_for("ade20k")
    batched = policy_labels(lab, rules)
    assert batched.shape == (4, 3, 4)
    for i in range(4):
        assert torch.equal(policy_labels(lab[i], rules), batched[i])
    assert set(batched.unique().tolist()) <= {0, 1, I}
    # integer dtypes other than long, and non-contiguous input
    assert torch.equal(policy_labels(lab.to(torch.uint8), rules), batched)
    assert torch.equal(policy_labels(lab.transpose(1, 2).contiguous().transpose(1, 2), rules), batched)


def test_runs_on_input_device():
    lab = torch.zeros(2, 64, 96, dtype=torch.long, device="meta")
    out = policy_labels(lab, rules_for("ade20k"))
    assert out.device.type == "meta" and out.shape == (2, 2, 3) and out.dtype == torch.long


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        policy_labels(torch.zeros(2, 48, 64, dtype=torch.long), rules_for("cityscapes"))
    with pytest.raises(ValueError, match="multiple of 32"):
        policy_labels(torch.zeros(64, 40, dtype=torch.long), rules_for("cityscapes"))
    with pytest.raises(TypeError, match="integer"):
        policy_labels(torch.zeros(64, 64), rules_for("cityscapes"))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        policy_labels(torch.zeros(1, 1, 64, 64, dtype=torch.long), rules_for("cityscapes"))
