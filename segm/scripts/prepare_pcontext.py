"""Prepare Pascal-Context (59 classes + background) under `$DATASET/pcontext`.

    python -m segm.scripts.prepare_pcontext $DATASET [--download-dir DIR | --archive PATH ...]

Result:
    pcontext/VOCdevkit/VOC2010/JPEGImages/*.jpg                 (from the VOC 2010 tar)
    pcontext/VOCdevkit/VOC2010/SegmentationClassContext/<id>.png (labels 0..59, 0 = background)
    pcontext/VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt (sorted ids)
    pcontext/VOCdevkit/VOC2010/{trainval_merged.json,train.pth,val.pth}
    pcontext/downloads/                                          (downloaded files, kept)

Trusted-file exception: the labels come from PyTorch-Encoding's `train.pth`/`val.pth`,
pickled {int id: label image} dicts that can only be read by unpickling
(`torch.load(..., weights_only=False)`), which can run arbitrary code. This is the one
place the project unpickles; use only the published files (their full SHA-1 is checked before
unpickling).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from segm.data.names import (DATASET_SPLITS, PCONTEXT_IMAGE_DIR, PCONTEXT_LABEL_DIR, PCONTEXT_SPLIT_DIR, ROOT_DIRS,
                             VOC_DIR)
from segm.utils.cli import CONTEXT_SETTINGS
from segm.scripts._prepare_common import (
    cli_errors,
    local_file_options,
    Fetch,
    PrepareError,
    Resource,
    extract,
    is_downloaded,
    link_or_copy,
    require_layout,
    run_prepare,
)
from segm.utils.download import Checksum

_PTH_URL = "https://hangzh.s3.amazonaws.com/encoding/data/pcontext"
_PTH_NOTE = "the label files of PyTorch-Encoding (https://github.com/zhanghang1989/PyTorch-Encoding)"
# SHA-1 digests as published with PyTorch-Encoding's and the reference's prepare scripts.
RESOURCES = (
    Resource("VOCtrainval_03-May-2010.tar",
             "https://www.dropbox.com/s/wtdibo9lb2fur70/VOCtrainval_03-May-2010.tar?dl=1",
             Checksum("sha1", "bf9985e9f2b064752bf6bd654d89f017c76c395a"),
             "also at http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar"),
    Resource("trainval_merged.json", "https://codalabuser.blob.core.windows.net/public/trainval_merged.json",
             Checksum("sha1", "169325d9f7e9047537fedca7b04de4dddf10b881"),
             "the Pascal-Context annotations in Detail-API format"),
    Resource("train.pth", f"{_PTH_URL}/train.pth", Checksum("sha1", "4bfb49e8c1cefe352df876c9b5434e655c9c1d07"),
             _PTH_NOTE),
    Resource("val.pth", f"{_PTH_URL}/val.pth", Checksum("sha1", "ebedc94247ec616c57b9a2df15091784826a7b0c"),
             _PTH_NOTE),
)
SPLITS = DATASET_SPLITS["pascal_context"]
VOC = Path(VOC_DIR)


def context_id(key) -> str:
    """PyTorch-Encoding key → VOC image id: 2008000002 → '2008_000002'."""
    s = str(key)
    if not s.isdigit() or len(s) < 5:
        raise PrepareError(f"unexpected image id {key!r} in a Pascal-Context .pth file (expected e.g. 2008000002)")
    return f"{s[:4]}_{s[4:]}"


def _label_array(value, image_id: str) -> np.ndarray:
    if isinstance(value, Image.Image):
        arr = np.asarray(value)
    elif hasattr(value, "numpy"):  # a torch tensor
        arr = value.numpy()
    else:
        arr = np.asarray(value)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise PrepareError(f"label of {image_id}: expected a 2-D integer image, got {arr.dtype} {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise PrepareError(f"label of {image_id}: values {arr.min()}..{arr.max()} do not fit in 8 bits")
    return arr.astype(np.uint8)


def load_context_labels(pth_path) -> dict:
    """Unpickle a PyTorch-Encoding `.pth` label file (trusted-file exception, see module doc)."""
    import torch  # only needed here

    try:
        labels = torch.load(pth_path, map_location="cpu", weights_only=False)  # trusted file, checked SHA-1
    except Exception as e:  # a truncated or foreign pickle surfaces as many exception types
        raise PrepareError(f"{pth_path} is corrupt or not a Pascal-Context label file ({type(e).__name__}: {e})") from None
    if not isinstance(labels, dict):
        raise PrepareError(f"{pth_path}: expected a pickled dict {{id: label}}, got {type(labels).__name__}")
    return labels


def convert_context_labels(pth_path, out_dir) -> list[str]:
    """Write `<out_dir>/<id>.png` (8-bit, values kept) for every label in `pth_path`; return the sorted ids."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = []
    for key, value in tqdm(load_context_labels(pth_path).items(), desc=f"labels {Path(pth_path).name}", leave=False):
        image_id = context_id(key)
        Image.fromarray(_label_array(value, image_id)).save(out_dir / f"{image_id}.png")
        ids.append(image_id)
    return sorted(ids)


def prepare_pcontext(
    dataset_dir,
    *,
    download_dir=None,
    archives: Iterable = (),
    force: bool = False,
    fetch: Fetch | None = None,
    resources: Sequence[Resource] | None = None,
) -> bool:
    """Prepare `<dataset_dir>/pcontext`; False if it was already prepared (nothing done)."""
    root = Path(dataset_dir) / ROOT_DIRS["pascal_context"]
    resources = resources or RESOURCES

    def build(files, tmp):
        tar = files[resources[0].filename]
        extract(tar, tmp, quarantine=is_downloaded(tar, root))
        require_layout(tmp, [str(VOC / PCONTEXT_IMAGE_DIR)], tar.name)
        voc = tmp / VOC
        for r in resources[1:]:
            link_or_copy(files[r.filename], voc / r.filename)
        images = {p.stem for p in (voc / PCONTEXT_IMAGE_DIR).glob("*.jpg")}
        imagesets = voc / PCONTEXT_SPLIT_DIR
        imagesets.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            ids = convert_context_labels(voc / f"{split}.pth", voc / PCONTEXT_LABEL_DIR)
            absent = [i for i in ids if i not in images]
            if absent:
                raise PrepareError(
                    f"{split}.pth labels {len(absent)} image(s) missing from {tar.name}, e.g. {absent[0]}.jpg "
                    "(wrong VOC release?)"
                )
            (imagesets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))

    return run_prepare(
        root, name="pcontext", resources=resources, build=build, force=force,
        download_dir=download_dir, archives=archives, fetch=fetch,
    )


@click.command(context_settings=CONTEXT_SETTINGS, help=(
    "Download (or take local copies of) Pascal-Context and build DATASET/pcontext. "
    "Trusted-file exception: train.pth/val.pth (PyTorch-Encoding) are unpickled "
    "(torch.load weights_only=False), which can run code; only use the published files "
    "(their full SHA-1 is checked)."
))
@click.argument("dataset", type=click.Path(file_okay=False))
@local_file_options("file")
def main(dataset, download_dir, archives, force):
    with cli_errors():
        prepare_pcontext(dataset, download_dir=download_dir, archives=archives, force=force)


if __name__ == "__main__":
    main()
