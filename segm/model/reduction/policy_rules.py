"""CTS's policy-network rules, without torch: the reference's token budgets, the policy's patch
size, and the record (`config.json`) that `policynet.train` writes beside a policy checkpoint —
this module is its only reader (docs/DESIGN.md, "Policies")."""
from __future__ import annotations

import json
from pathlib import Path

from segm.model.reduction.rules import ModelConfigError, TokenBudgetError

POLICY_NET = "policy_net"
# The policy network scores 2×2 groups of 16-px patches (its output stride is 32).
POLICY_PATCH_SIZE = 16
POLICY_RECORD = "config.json"


# The reference's token budgets S at its crops (U = N − 4S): 612/103 on ADE20K at 512, 540/90
# on Pascal-Context at 480, 960/336 on Cityscapes at 768. Elsewhere S = round(ρ·N/3) with the
# reference's reduction ρ: 30 %, and Cityscapes' 44 % (3·336/2304).
REFERENCE_NUM_SHARED = {("ade20k", 512): 103, ("pascal_context", 480): 90, ("cityscapes", 768): 336}
REFERENCE_REDUCTION = {"cityscapes": 0.4375}
DEFAULT_TOKEN_REDUCTION = 0.3


def reference_num_shared(crop: int, dataset: str = "ade20k", patch_size: int = POLICY_PATCH_SIZE) -> int:
    """The reference's token budget S for a square crop of a dataset (ADE20K's recipe when no
    dataset is named)."""
    if (dataset, crop) in REFERENCE_NUM_SHARED:
        return REFERENCE_NUM_SHARED[(dataset, crop)]
    n = (crop // patch_size) ** 2
    return round(REFERENCE_REDUCTION.get(dataset, DEFAULT_TOKEN_REDUCTION) * n / 3)


# --------------------------------------------------------------------------- policy record
def read_policy_record(ckpt) -> dict | None:
    """The `config.json` that `policynet.train` writes beside its model.pth, or None when there
    is none (reference checkpoints). A record that exists but cannot be read is an error: a
    silent fallback would run the policy as a backbone it was not trained as."""
    record = Path(ckpt).with_name(POLICY_RECORD)
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelConfigError(
            f"cannot read {record} (the record of the policy checkpoint {ckpt}): {e}. Restore it from the "
            "policy's run folder, or delete it and pass --policy-backbone explicitly"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("backbone", ""), str):
        raise ModelConfigError(f"{record} is not a policy-run record (expected a JSON object with a 'backbone' name)")
    return data


def recorded_policy_backbone(ckpt) -> str | None:
    """The backbone a policy checkpoint was trained with, as recorded beside it (None: no record)."""
    record = read_policy_record(ckpt)
    return record.get("backbone") if record else None


def check_policy_backbone(ckpt, backbone: str) -> None:
    """efficientnet_lite0 and tf_efficientnet_lite0 share every state-dict key but pad
    differently: a checkpoint loaded into the other one loads cleanly and scores superpatches
    almost at random. The recorded backbone must therefore match the one built."""
    trained = recorded_policy_backbone(ckpt)
    if trained is not None and trained != backbone:
        raise ModelConfigError(
            f"policy-network checkpoint {ckpt} was trained with backbone {trained!r} "
            f"({Path(ckpt).with_name(POLICY_RECORD)}), but the policy network here is {backbone!r}: "
            f"drop --policy-backbone or pass --policy-backbone {trained} (net_kwargs `policy_backbone`)"
        )


def check_policy_checkpoint(ckpt) -> None:
    if not ckpt:
        raise ModelConfigError(
            "--policy-method policy_net needs --policynet-ckpt PATH/model.pth (train one with "
            "`python -m policynet.train`), or use --policy-method no_sharing"
        )
    if not Path(ckpt).is_file():
        raise ModelConfigError(
            f"policy-network checkpoint not found: {ckpt} (--policynet-ckpt). Train one with "
            "`python -m policynet.train --dataset DATASET --exp_name NAME` and pass its model.pth"
        )



def uses_policy_net(policy_method: str) -> bool:
    return policy_method == POLICY_NET


def check_policy_options(policy_method: str, policynet_ckpt, policy_backbone) -> None:
    if not uses_policy_net(policy_method) and (policynet_ckpt or policy_backbone):
        raise ModelConfigError(
            f"--policynet-ckpt and --policy-backbone are only used with --policy-method policy_net, not {policy_method}"
        )


def resolve_policy_backbone(policy_method: str, patch_size: int, net: dict, *, policy_ckpt_required: bool) -> str | None:
    """The policy backbone a description builds (None: no policy network, or nothing records
    one), after the policy network's rules: patch size 16, a checkpoint that exists (when
    required) and a backbone that agrees with the one recorded beside it."""
    if not uses_policy_net(policy_method):
        return None
    if patch_size != POLICY_PATCH_SIZE:
        raise TokenBudgetError(
            f"the policy network scores 32-px superpatches, which needs patch size {POLICY_PATCH_SIZE} "
            f"(got {patch_size}); use --policy-method content, random or oracle, or a /16 backbone"
        )
    ckpt = net.get("policynet_ckpt")
    if policy_ckpt_required:
        check_policy_checkpoint(ckpt)
    recorded = recorded_policy_backbone(ckpt) if ckpt and Path(ckpt).is_file() else None
    backbone = net.get("policy_backbone") or recorded
    if recorded is not None:
        check_policy_backbone(ckpt, backbone)
    return backbone
