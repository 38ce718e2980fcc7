"""FLOP and token counts per image, from `torch.utils.flop_counter` (2 FLOPs per multiply-add)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from segm.bench.variants import Variant, policy_network, restore_fused_attention, set_fused_attention
from segm.model.segmenter import Segmenter


def count_flops(variant: Variant, x: torch.Tensor) -> dict:
    """Forward FLOPs per image (and of the policy network alone, when the reducer runs one) on
    eager fp32, and the token count the forward's token map reports.

    Attention is counted with timm's explicit path: the flop counter does not see the fused CPU
    kernel, and both compute the same products."""
    model = variant.model
    saved = set_fused_attention(model, False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            out = model.forward_all(x)
        total = fc.get_total_flops()
        policy = 0
        scorer = policy_network(model)
        if scorer is not None:  # as the forward runs it
            with torch.no_grad(), FlopCounterMode(display=False) as fp:
                scorer(x, None)
            policy = fp.get_total_flops()
    finally:
        restore_fused_attention(saved)
    b = x.shape[0]
    prefix = model.encoder.num_prefix_tokens
    t = out.token_map.num_tokens
    stages = getattr(out.token_map.record, "stage_tokens", None)  # a reducer that merges in stages (ALGM)
    return {"gflops": total / b / 1e9, "policy_gflops": policy / b / 1e9,
            "tokens": t + prefix, "patch_tokens": t, "prefix_tokens": prefix,
            "stage_tokens": None if stages is None else list(stages)}


def count_train_flops(model: Segmenter, x: torch.Tensor, labels: torch.Tensor) -> float:
    saved = set_fused_attention(model, False)
    try:
        with FlopCounterMode(display=False) as fc:
            F.cross_entropy(model(x), labels, ignore_index=255).backward()
    finally:
        restore_fused_attention(saved)
        model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / x.shape[0] / 1e9
