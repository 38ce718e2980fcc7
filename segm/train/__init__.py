"""Segmentation training, the reference recipe (docs/DESIGN.md, "Training recipe"):
`python -m segm.train`.

One GPU, ADE20K, ViT-S with CTS (30 % fewer tokens):

    python -m segm.train --log-dir runs/ade20k_segmenter_small_patch16_cts_612_103 \
        --dataset ade20k --backbone vit_small_patch16_384 --decoder mask_transformer \
        --policy-method policy_net --num-tokens-notshared 612 --num-tokens-shared 103 \
        --policynet-ckpt runs/policynet/policynet_efficientnet_ade20k/model.pth

Several GPUs or nodes: the same arguments under `torchrun --nproc_per_node 8 -m segm.train`
or `srun python -m segm.train` (one task per GPU). `--batch-size` is the global batch.

Recipe: SGD (Nesterov, momentum 0.9), polynomial LR (power 0.9) stepped per iteration with
optional warm-up and a floor, cross-entropy (ignore 255) on full-resolution logits, drop path
0.1, single-scale sliding-window evaluation every `--eval-freq` epochs and at the end.

--log-dir receives `checkpoint.pth` (reference keys `model`, `optimizer`, `n_cls`,
`lr_scheduler`, `epoch`, `loss_scaler`; plus `variant`, `format`, `iteration` and
`train_state`: data position, meters and every rank's RNG state), `variant.yml`, `log.txt`
(one JSON line per epoch) and TensorBoard events. Checkpoints are written atomically at every
epoch end and every `--ckpt-every` iterations; running the same command again resumes from
the last one and ends with the weights an uninterrupted run would have produced.

Reading order: `cli` (the command) → `options` (`TrainOptions`, resolved once) → `run`
(`train`: the phases) → `context` (`Run`) → `process`, `data`, `model`, `variant`, `run_dir`
(set-up) → `state` (`TrainState`: what a checkpoint holds) → `loop` (`train_one_epoch`,
`evaluate`) → `loss`. The policy trainer (`policynet.train`) runs on `context`, `state`
(`CheckpointedState`), `loop` (`apply_update`, `make_progress`), `loss` and `run_dir`.

Exports are imported lazily, so the policy trainer can use those modules without loading
the segmentation trainer.
"""
from segm.utils.lazy import lazy_exports

_EXPORTS = {
    "ConfigError": "segm.train.options",
    "PRETRAINED_TAGS": "segm.train.model",
    "TrainOptions": "segm.train.options",
    "main": "segm.train.cli",
    "resolve_options": "segm.train.options",
    "train": "segm.train.run",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
