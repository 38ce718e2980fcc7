"""The CTS policy network (`net`: the model, its checkpoints, its ImageNet initialisation) and
the CPU fast paths of the frozen policy (`fastpath`: chunking, BatchNorm folding, oneDNN)."""
from segm.model.policy.fastpath import (CPU_CHUNK_BYTES, FoldedConvAct, fuse_batchnorm, onednn_layers,
                                        peak_activation_ratio, policy_logits)
from segm.model.policy.net import (PolicyNet, build_policy, default_lite0_weights, load_lite0_imagenet,
                                   load_policy_checkpoint, pretrained_path)

__all__ = ["CPU_CHUNK_BYTES", "FoldedConvAct", "PolicyNet", "build_policy", "default_lite0_weights",
           "fuse_batchnorm", "load_lite0_imagenet", "load_policy_checkpoint", "onednn_layers",
           "peak_activation_ratio", "policy_logits", "pretrained_path"]
