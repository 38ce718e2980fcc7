"""Prepare ADE20K (SceneParsing / ADEChallengeData2016) under `$DATASET/ade20k`.

    python -m segm.scripts.prepare_ade20k $DATASET [--download-dir DIR | --archive PATH ...]

Result:
    ade20k/ADEChallengeData2016/{images,annotations}/{training,validation}/*.{jpg,png}
    ade20k/release_test/testing/*.jpg
    ade20k/downloads/            (downloaded archives, kept)
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import click

from segm.data.names import ADE20K_DIR, ADE20K_TEST_DIR, FOLDER_SPLITS, IMAGE_DIR, LABEL_DIR, ROOT_DIRS
from segm.utils.cli import CONTEXT_SETTINGS
from segm.scripts._prepare_common import (
    cli_errors,
    local_file_options,
    Fetch,
    Resource,
    extract,
    is_downloaded,
    require_layout,
    run_prepare,
)
from segm.utils.download import Checksum

_URL = "http://data.csail.mit.edu/places/ADEchallenge"
# SHA-1 digests as published with PyTorch-Encoding's and the reference's prepare scripts.
RESOURCES = (
    Resource("ADEChallengeData2016.zip", f"{_URL}/ADEChallengeData2016.zip",
             Checksum("sha1", "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"), "see http://sceneparsing.csail.mit.edu/"),
    Resource("release_test.zip", f"{_URL}/release_test.zip",
             Checksum("sha1", "e05747892219d10e9243933371a497e905a4860c"), "see http://sceneparsing.csail.mit.edu/"),
)

LAYOUT = [
    f"{ADE20K_DIR}/{kind}/{folder}"
    for kind in (IMAGE_DIR, LABEL_DIR)
    for folder in FOLDER_SPLITS.values()
] + [ADE20K_TEST_DIR]


def prepare_ade20k(
    dataset_dir,
    *,
    download_dir=None,
    archives: Iterable = (),
    force: bool = False,
    fetch: Fetch | None = None,
    resources: Sequence[Resource] | None = None,
) -> bool:
    """Prepare `<dataset_dir>/ade20k`; False if it was already prepared (nothing done)."""
    root = Path(dataset_dir) / ROOT_DIRS["ade20k"]

    def build(files, tmp):
        for r in resources or RESOURCES:
            extract(files[r.filename], tmp, quarantine=is_downloaded(files[r.filename], root))
        require_layout(tmp, LAYOUT, "ADEChallengeData2016.zip / release_test.zip")

    return run_prepare(
        root, name="ade20k", resources=resources or RESOURCES, build=build, force=force,
        download_dir=download_dir, archives=archives, fetch=fetch,
    )


@click.command(context_settings=CONTEXT_SETTINGS, help="Download (or take local archives of) ADE20K and unpack it into DATASET/ade20k.")
@click.argument("dataset", type=click.Path(file_okay=False))
@local_file_options("archive")
def main(dataset, download_dir, archives, force):
    with cli_errors():
        prepare_ade20k(dataset, download_dir=download_dir, archives=archives, force=force)


if __name__ == "__main__":
    main()
