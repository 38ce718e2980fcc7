"""An int8 graph against its fp32 twin on a validation set: the mIoU of each (single scale, the
evaluation's sliding windows) and the share of pixels whose label they agree on.

    python -m segm.export CKPT fp32.onnx
    python -m segm.export CKPT int8.onnx --quantize int8
    python scripts/quantization_parity.py fp32.onnx int8.onnx synthetic --data-root $DATASET/synthetic

Both graphs must have been exported for the same batch (the window batch here).
"""
from __future__ import annotations

import click
import torch

from segm.utils.cli import CONTEXT_SETTINGS


def _labels(model, item: dict, settings: dict) -> torch.Tensor:
    from segm.eval.evaluate import predict_labels

    views, metas = item["im"], item["im_metas"]
    ori_shape = tuple(int(s) for s in metas[0]["ori_shape"][:2])
    return predict_labels(model, views, metas, ori_shape, window_size=settings["window_size"],
                          window_stride=settings["window_stride"], window_batch_size=model.batch_size or 4,
                          n_cls=model.n_cls)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("fp32_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("int8_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("dataset")
@click.option("--data-root", default=None, type=click.Path(file_okay=False), help="The dataset's folder.")
def main(fp32_path, int8_path, dataset, data_root):
    """mIoU of FP32_PATH and INT8_PATH on DATASET's validation split, and their label agreement."""
    from tqdm import tqdm

    from segm.data import build_dataset
    from segm.eval.miou import resolve_settings
    from segm.metrics import IoUAccumulator
    from segm.onnx_runtime import OnnxSegmenter

    models = {"fp32": OnnxSegmenter(fp32_path), "int8": OnnxSegmenter(int8_path)}
    ref = models["fp32"]
    settings = resolve_settings(ref.variant, ref, dataset, data_root=data_root)
    db = build_dataset(dataset, "val", im_size=settings["im_size"], crop_size=settings["window_size"],
                       normalization=settings["normalization"], data_root=settings["data_root"])
    acc = {name: IoUAccumulator(ref.n_cls) for name in models}
    same = labelled_same = total = labelled = 0
    for i in tqdm(range(len(db)), desc="parity"):
        item = db[i]
        label = item["segmentation"]
        preds = {name: _labels(m, item, settings) for name, m in models.items()}
        for name, pred in preds.items():
            acc[name].update(pred, label)
        agree, keep = preds["fp32"] == preds["int8"], label != 255
        same += int(agree.sum())
        labelled_same += int((agree & keep).sum())
        total += agree.numel()
        labelled += int(keep.sum())
    miou = {name: a.compute()["mean_iou"] for name, a in acc.items()}
    click.echo(f"mIoU fp32 {miou['fp32']:.2f}, int8 {miou['int8']:.2f} (Δ {miou['int8'] - miou['fp32']:+.2f}); "
               f"labels agree on {100 * same / total:.3f} % of pixels ({100 * labelled_same / labelled:.3f} % "
               f"of labelled ones), {len(db)} images")


if __name__ == "__main__":
    main()
