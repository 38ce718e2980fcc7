"""Prepare Cityscapes (fine annotations, 19 trainIds) under `$DATASET/cityscapes`.

    python -m segm.scripts.prepare_cityscapes $DATASET --username U --password P [--nproc N]
    python -m segm.scripts.prepare_cityscapes $DATASET --download-dir DIR   # offline

Result:
    cityscapes/leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png
    cityscapes/gtFine/{train,val,test}/<city>/*_gtFine_{polygons.json,labelTrainIds.png,...}
    cityscapes/{train,val,test}.txt   (`<city>/<city>_<seq>_<frame>`, sorted)
    cityscapes/downloads/             (downloaded archives, kept)

Label conversion: this module's own re-implementation of the official
`cityscapesscripts.preparation.json2labelImg.json2labelImg(json, png, "trainIds")`
(cityscapesscripts 2.3.0) with PIL ImageDraw and the official label table. The package
itself is not used: it pulls in pyquaternion, coloredlogs, appdirs, requests and the
obsolete `typing` backport for this 40-line function. Same rules: background
'unlabeled' (255), polygons drawn in file order, deleted objects skipped, an unknown
'...group' label retried without 'group', labels with a negative id not drawn.

Downloads need a Cityscapes account; archives are checked against the MD5 the website
publishes for each package (no SHA-1 is known for them).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import urllib.error
from pathlib import Path
from typing import Iterable

import click
from PIL import Image, ImageDraw
from tqdm import tqdm

from segm.data.cityscapes_labels import LABELS
from segm.data.names import (CITYSCAPES_IMAGE_DIR, CITYSCAPES_LABEL_DIR, CITYSCAPES_LABEL_SUFFIX, DATASET_SPLITS,
                             ROOT_DIRS)
from segm.utils.cli import CONTEXT_SETTINGS
from segm.scripts._prepare_common import (
    cli_errors,
    local_file_options,
    PrepareError,
    Resource,
    extract,
    is_downloaded,
    require_layout,
    run_prepare,
)
from segm.utils.download import CITYSCAPES_URL, Checksum, cityscapes_login, download

PACKAGES = {"gtFine_trainvaltest.zip": 1, "leftImg8bit_trainvaltest.zip": 3}
SPLITS = DATASET_SPLITS["cityscapes"]
POLYGONS_SUFFIX = "_gtFine_polygons.json"

def resources(base_url: str = CITYSCAPES_URL) -> tuple[Resource, ...]:
    return tuple(
        Resource(name, f"{base_url}/file-handling/?packageID={pid}", None,
                 f"log in at {CITYSCAPES_URL}/downloads/ and download package '{name}'")
        for name, pid in PACKAGES.items()
    )


def polygons_to_train_ids(annotation: dict, source: str = "annotation") -> Image.Image:
    """Rasterise a gtFine polygon annotation to an 8-bit trainId image (json2labelImg rules)."""
    size = (int(annotation["imgWidth"]), int(annotation["imgHeight"]))
    image = Image.new("L", size, LABELS["unlabeled"][1])
    draw = ImageDraw.Draw(image)
    for obj in annotation["objects"]:
        if obj.get("deleted", 0):
            continue
        label = str(obj["label"])
        if label not in LABELS and label.endswith("group"):
            label = label[: -len("group")]
        if label not in LABELS:
            raise PrepareError(f"{source}: unknown Cityscapes label {obj['label']!r}")
        label_id, train_id = LABELS[label]
        if label_id < 0:
            continue
        draw.polygon([(p[0], p[1]) for p in obj["polygon"]], fill=train_id)
    return image


def convert_polygons(json_path) -> Path:
    """`*_gtFine_polygons.json` → `*_gtFine_labelTrainIds.png` beside it; returns the PNG."""
    json_path = Path(json_path)
    try:
        with open(json_path) as f:
            annotation = json.load(f)
        image = polygons_to_train_ids(annotation, str(json_path))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise PrepareError(f"{json_path}: not a valid Cityscapes polygon file ({type(e).__name__}: {e})") from None
    out = json_path.with_name(json_path.name[: -len(POLYGONS_SUFFIX)] + CITYSCAPES_LABEL_SUFFIX)
    image.save(out)
    return out


def convert_all(gt_root, nproc: int = 1) -> int:
    """Convert every `<gt_root>/<split>/<city>/*_gtFine_polygons.json`; returns the count."""
    jsons = sorted(Path(gt_root).glob(f"*/*/*{POLYGONS_SUFFIX}"))
    bar = dict(total=len(jsons), desc="polygons -> labelTrainIds", unit="file", leave=False)
    if nproc <= 1:
        for j in tqdm(jsons, **bar):
            convert_polygons(j)
    else:
        with multiprocessing.Pool(nproc) as pool:
            for _ in tqdm(pool.imap_unordered(convert_polygons, jsons, chunksize=16), **bar):
                pass
    return len(jsons)


def write_split_lists(root, out_dir) -> None:
    """`<split>.txt`: one `<city>/<city>_<seq>_<frame>` per annotated image, sorted."""
    for split in SPLITS:
        names = sorted(
            str(p.relative_to(Path(root) / CITYSCAPES_LABEL_DIR / split))[: -len(POLYGONS_SUFFIX)]
            for p in (Path(root) / CITYSCAPES_LABEL_DIR / split).glob(f"*/*{POLYGONS_SUFFIX}")
        )
        (Path(out_dir) / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def _official_md5(opener, md5_url: str) -> Checksum | None:
    try:
        with opener.open(md5_url, timeout=60) as r:
            token = r.read(4096).decode("ascii", "replace").split()
    except (urllib.error.URLError, OSError):
        token = []
    if token and len(token[0]) == 32 and all(c in "0123456789abcdef" for c in token[0].lower()):
        return Checksum("md5", token[0].lower())
    print(f"warning: could not read the MD5 of {md5_url}; relying on the zip CRCs")
    return None


def _fetcher(username, password, base_url):
    opener = None

    def fetch(resource: Resource, dest: Path) -> Path:
        nonlocal opener
        if not username or not password:
            raise PrepareError(
                f"{resource.filename} must be downloaded and that needs a Cityscapes account: pass "
                f"--username/--password, or download it at {CITYSCAPES_URL}/downloads/ and pass "
                "--archive PATH or --download-dir DIR"
            )
        if opener is None:
            opener = cityscapes_login(username, password, base_url=base_url)
        checksum = _official_md5(opener, resource.url.replace("/file-handling/", "/md5-sum/"))
        return download(resource.url, dest, checksum=checksum, opener=opener, reject_html=True)

    return fetch


def prepare_cityscapes(
    dataset_dir,
    *,
    username: str | None = None,
    password: str | None = None,
    nproc: int = 1,
    download_dir=None,
    archives: Iterable = (),
    force: bool = False,
    base_url: str = CITYSCAPES_URL,
) -> bool:
    """Prepare `<dataset_dir>/cityscapes`; False if it was already prepared (nothing done)."""
    root = Path(dataset_dir) / ROOT_DIRS["cityscapes"]
    res = resources(base_url)

    def build(files, tmp):
        for r in res:
            extract(files[r.filename], tmp, quarantine=is_downloaded(files[r.filename], root))
        require_layout(
            tmp, [f"{d}/{s}" for d in (CITYSCAPES_LABEL_DIR, CITYSCAPES_IMAGE_DIR) for s in SPLITS],
            " / ".join(PACKAGES)
        )
        convert_all(tmp / CITYSCAPES_LABEL_DIR, nproc)
        write_split_lists(tmp, tmp)

    return run_prepare(
        root, name="cityscapes", resources=res, build=build, force=force,
        download_dir=download_dir, archives=archives, fetch=_fetcher(username, password, base_url),
    )


@click.command(context_settings=CONTEXT_SETTINGS, help=(
    "Download (with a Cityscapes account) or take local copies of gtFine_trainvaltest.zip and "
    "leftImg8bit_trainvaltest.zip, unpack them into DATASET/cityscapes and convert the polygons "
    "to *_gtFine_labelTrainIds.png."
))
@click.argument("dataset", type=click.Path(file_okay=False))
@click.option("--username", envvar="CITYSCAPES_USERNAME", help="Cityscapes account (or $CITYSCAPES_USERNAME).")
@click.option("--password", envvar="CITYSCAPES_PASSWORD", help="Cityscapes password (or $CITYSCAPES_PASSWORD).")
@click.option("--nproc", type=click.IntRange(min=1), default=min(10, os.cpu_count() or 1), show_default=True,
              help="Processes for the label conversion.")
@local_file_options("archive")
def main(dataset, username, password, nproc, download_dir, archives, force):
    with cli_errors():
        prepare_cityscapes(dataset, username=username, password=password, nproc=nproc,
                           download_dir=download_dir, archives=archives, force=force)


if __name__ == "__main__":
    main()
