"""CPU speed for the frozen policy network: batch chunking, BatchNorm folding and oneDNN's
fused conv + activation. See docs/DESIGN.md, "CPU fast paths".

Nothing here changes what the policy computes (beyond float rounding), and every fast path
falls back to the plain one: on the GPU, under autocast or torch.compile, under a dispatch
mode (FLOP/memory counters), or when this torch build lacks the private oneDNN op. This is
the only module that touches private torch APIs (`torch._C`, `torch.ops.mkldnn`).
"""
from __future__ import annotations

import copy
import weakref

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from segm.utils.host_memory import MMAP_THRESHOLD_MAX

__all__ = ["CPU_CHUNK_BYTES", "peak_activation_ratio", "policy_logits", "FoldedConvAct", "fuse_batchnorm",
           "onednn_layers"]

# glibc serves every allocation above its mmap threshold (32 MiB at most on 64-bit Linux) with
# fresh pages and unmaps it again on free, so each call page-faults its large activations back
# in. For two 512-px images the policy network's 96-channel half-resolution maps are 50 MB, and
# re-faulting them took about 40 % of its CPU time (BENCHMARKS.md). On the CPU it therefore runs
# on as many images at a time as keep its largest activation under that size.
CPU_CHUNK_BYTES = MMAP_THRESHOLD_MAX

_ONEDNN_FUSED_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")

_MAX_PACKED_SHAPES = 8  # a sharing model sees one crop size, in at most two chunk sizes

_peak_ratios: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _under_dispatch_mode() -> bool:
    """True under a torch dispatch mode (FLOP/memory counters): they must see the plain ops."""
    return torch._C._len_torch_dispatch_stack() > 0


def peak_activation_ratio(policy: nn.Module) -> float:
    """Elements of the policy's largest activation per input element (8 for efficientnet_lite0:
    96 channels at half resolution from 3 channels). Measured once per module on a small input."""
    if policy not in _peak_ratios:
        peak = [0]

        def record(_module, _inputs, out):
            if isinstance(out, torch.Tensor):
                peak[0] = max(peak[0], out.numel())

        hooks = [m.register_forward_hook(record) for m in policy.modules() if not list(m.children())]
        probe = torch.zeros(1, 3, 64, 64, dtype=policy.head.weight.dtype, device=policy.head.weight.device)
        try:
            with torch.no_grad():
                policy(probe)
        finally:
            for h in hooks:
                h.remove()
        _peak_ratios[policy] = peak[0] / probe.numel()
    return _peak_ratios[policy]


def policy_logits(policy: nn.Module, im: torch.Tensor) -> torch.Tensor:
    """(B, 2, H/32, W/32) logits of a frozen policy; channels-last, chunked over the batch on CPU."""
    im = im.contiguous(memory_format=torch.channels_last)
    # one call when there is nothing to split, and under FLOP/memory counters (the probe that
    # sizes the chunks would be counted too)
    if im.device.type != "cpu" or im.shape[0] == 1 or torch.compiler.is_compiling() or _under_dispatch_mode():
        return policy(im)["logits"]
    per_image = peak_activation_ratio(policy) * im[0].numel() * im.element_size()
    chunk = max(1, int(CPU_CHUNK_BYTES // per_image))
    if chunk >= im.shape[0]:
        return policy(im)["logits"]
    return torch.cat([policy(part)["logits"] for part in im.split(chunk)])


class FoldedConvAct(nn.Module):
    """Inference-only: a conv with BatchNorm folded in, then its activation (ReLU6 or none).

    On the CPU in plain fp32 it runs oneDNN's convolution with the activation fused and the
    weight pre-packed once per input shape (the kernel inductor emits for frozen graphs), which
    saves a pass over every feature map and a weight reorder per call. The packing must know
    the input shape: without it oneDNN chose a layout that made the widest 1×1 convs 12× slower
    and the whole network twice as slow (BENCHMARKS.md). Anywhere else (GPU, autocast, compile,
    under a dispatch mode such as the FLOP counter) it runs conv, then activation.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module):
        super().__init__()
        from timm.layers import Conv2dSame

        self.conv, self.act = conv, act
        self._relu6 = isinstance(act, nn.ReLU6)
        # timm's Conv2dSame (the tf_ models' stride-2 convs) pads each input TensorFlow's "same"
        # way, one more at the end than at the start where the total is odd
        self._pad_same = type(conv) is Conv2dSame and tuple(conv.dilation) == (1, 1)
        self._fusable = type(conv) is nn.Conv2d or self._pad_same
        # (pre-packed oneDNN weight, padding) by input shape, for the weight version packed from
        self._packed: dict = {}
        self._packed_version = -1

    def _onednn(self, x: torch.Tensor) -> bool:
        w = self.conv.weight
        return (
            _ONEDNN_FUSED_CONV
            and x.device.type == "cpu"
            and x.dtype == w.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and not _under_dispatch_mode()
            and x.is_contiguous(memory_format=torch.channels_last)
            and self._fusable
        )

    def _weight_and_padding(self, shape: tuple) -> tuple[torch.Tensor, list]:
        """The weight and symmetric padding oneDNN runs for this input shape. A "same" conv whose
        padding is one larger at the end gets a zero tap at the start of its kernel and the end's
        padding on both sides: the same sums, without copying a padded input (for the 96-channel
        stride-2 depthwise conv at 512 px, 0.6 ms against 2.1–6.6 ms)."""
        c = self.conv
        if not self._pad_same:
            return c.weight.detach(), list(c.padding)
        from timm.layers.padding import get_same_padding

        weight, padding = c.weight.detach(), []
        for dim, (size, k, stride) in enumerate(zip(shape[-2:], c.kernel_size, c.stride)):
            total = get_same_padding(size, k, stride, 1)
            start, end = total // 2, total - total // 2
            if end > start:
                weight = torch.nn.functional.pad(weight, (1, 0) if dim == 1 else (0, 0, 1, 0))
            padding.append(end)
        return weight, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._onednn(x):
            return self.act(self.conv(x))
        c = self.conv
        if self._packed_version != c.weight._version:
            self._packed, self._packed_version = {}, c.weight._version
        shape = tuple(x.shape)
        if shape not in self._packed:
            if len(self._packed) >= _MAX_PACKED_SHAPES:
                self._packed.clear()
            weight, padding = self._weight_and_padding(shape)
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.contiguous().to_mkldnn(), padding, list(c.stride), list(c.dilation), c.groups, list(shape)
            )
            self._packed[shape] = (packed, padding)
        weight, padding = self._packed[shape]
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, c.bias, padding, list(c.stride), list(c.dilation), c.groups,
            "hardtanh" if self._relu6 else "none", [0.0, 6.0] if self._relu6 else [], None,
        )


def fuse_batchnorm(policy: nn.Module) -> nn.Module:
    """An inference copy of a frozen policy with every BatchNorm folded into the conv before it.

    The policy is always used in eval mode, where BN is an affine map per channel, so folding
    it is exact up to float rounding and removes a full pass over every feature map; each
    folded conv then carries its activation (`FoldedConvAct`). Only timm EfficientNet-family
    blocks are folded (their child order is their forward order); other backbones are returned
    as an unfused copy.
    """
    from timm.layers import BatchNormAct2d, Conv2dSame
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
            with torch.no_grad():
                conv.weight, conv.bias = fuse_conv_bn_weights(
                    conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
                )
            # exact types only: a subclass may compute something else in its forward
            if type(conv) in (nn.Conv2d, Conv2dSame) and isinstance(bn.drop, nn.Identity) \
                    and type(bn.act) in (nn.ReLU6, nn.Identity):
                setattr(module, conv_name, FoldedConvAct(conv, bn.act))
                setattr(module, bn_name, nn.Identity())
            else:
                setattr(module, bn_name, nn.Sequential(bn.drop, bn.act))
    return fused.requires_grad_(False)


def onednn_layers(policy: nn.Module) -> dict:
    """How many of a folded policy's convs have run oneDNN's fused path (for the benchmark's
    report: on a CPU where this is 0 of 48, the policy runs conv, then activation)."""
    layers = [m for m in policy.modules() if isinstance(m, FoldedConvAct)]
    return {"available": _ONEDNN_FUSED_CONV, "taken": sum(bool(m._packed) for m in layers), "layers": len(layers)}

