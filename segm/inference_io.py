"""The files of `segm.inference`: which inputs a folder tree holds, where each result goes, and
what a picture holds. No torch import.

A folder is walked recursively (a Cityscapes split has one folder per city); each result is
written under the same relative path below the output folder, `<stem>.png`. A file with an
image extension that cannot be opened (a broken link) is listed like any other image, so the
reader reports it; a symbolic-link loop and a folder that links back to one of its own parents
are reported as problems of their own. Both end the run with exit status 1 after the other images.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

from segm.data.base import IMAGE_EXTENSIONS as DATASET_IMAGE_EXTENSIONS
from segm.data.io import pixel_limit
from segm.utils.writable import NotWritableError, check_writable, write_error_message

IMAGE_EXTENSIONS = (*DATASET_IMAGE_EXTENSIONS, ".gif")  # a dataset's image kinds, and GIF pictures


def check_options(window_batch_size, max_pixels, native_size, im_size, onnx_path, amp, output_dir) -> None:
    """The options' ranges, before a model is loaded or an image read."""
    if window_batch_size < 1:
        raise ValueError(f"--window-batch-size must be >= 1, got {window_batch_size}")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"--max-pixels must be ≥ 1, got {max_pixels}")
    pixel_limit(max_pixels)  # $SEGM_MAX_PIXELS: one error now, not one per image
    if native_size and im_size is not None:
        raise ValueError("--native-size segments images at their own size: drop --im-size")
    if onnx_path is not None and amp is not None:
        raise ValueError("--amp does not apply to an ONNX model (ONNX Runtime runs the exported fp32 graph); drop it")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a folder")
    check_writable(output_dir, "-o/--output")


def list_inputs(input_path: Path, output_dir: Path | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """(images, problems): the image files of `input_path` (itself when it is a file; else every
    one below it, sorted, as paths relative to it, the output folder left out: a second run
    does not segment the first one's results) and (name, line) of each entry that could not be
    walked. Two images of one folder that would give the same result file are an error."""
    if not input_path.is_dir():
        return [Path(input_path.name)], []
    images, problems = [], []
    real = Path(os.path.realpath(input_path))
    skip = os.path.realpath(output_dir) if output_dir is not None else None
    _walk(input_path, Path(), {str(real), *map(str, real.parents)}, skip, images, problems)  # a link up holds it
    if not images and not problems:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {input_path} or its sub-folders")
    _check_unique_results(images)
    return images, problems


def _walk(root: Path, rel: Path, parents: set, skip: str | None, images: list, problems: list) -> None:
    folder = root / rel
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        problems.append((str(rel), f"cannot list folder {folder}: {e.strerror or e}"))
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:  # pathlib's is_dir/is_file would answer False and skip it
                problems.append((str(rel / entry.name), f"cannot read {path}: a symbolic-link loop ({e.strerror})"))
                continue
        if path.is_dir():
            real = os.path.realpath(path)
            if real in parents:
                problems.append((str(rel / entry.name), f"folder {path} links back to {real}, a folder above it "
                                 "(a symbolic-link loop)"))
                continue
            if real != skip:
                _walk(root, rel / entry.name, parents | {real}, skip, images, problems)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(rel / entry.name)  # an unopenable link too: the reader names it


def _check_unique_results(images: list[Path]) -> None:
    seen = {}
    for rel in images:
        key = rel.with_suffix("")
        if key in seen:
            raise ValueError(f"{seen[key]} and {rel} would both be written as {key}.png: rename one")
        seen[key] = rel


def source_path(input_path: Path, rel: Path) -> Path:
    """The file of an input listed by `list_inputs`."""
    return input_path / rel if input_path.is_dir() else input_path


def result_path(output_dir: Path, rel: Path, suffix: str = "") -> Path:
    """Where the result of input `rel` goes: the same relative folder, `<stem><suffix>.png`."""
    return output_dir / rel.parent / f"{rel.stem}{suffix}.png"


def check_no_overwrite(input_path: Path, output_dir: Path, images: list[Path]) -> None:
    for rel in images:
        if result_path(output_dir, rel).resolve() == source_path(input_path, rel).resolve():
            raise ValueError(f"the output {result_path(output_dir, rel)} would overwrite its input: choose another -o")


def write_picture(array: np.ndarray, path: Path) -> None:
    """`save_png`, its failure (a full disk, a folder turned read-only) naming the file."""
    from segm.visualize import save_png

    try:
        save_png(array, path)
    except OSError as e:
        raise NotWritableError(write_error_message(e, path)) from None


def result_picture(out_format: str, dataset: str | None, palette, class_names, blend: bool, legend: bool):
    """`picture(image, label)`, what `<name>.png` holds: the index map in the label space of
    `dataset` (8-bit, one channel), or the coloured labels, blended with the image and with a
    legend of the classes present as asked."""
    from segm.data.label_space import to_label_space
    from segm.visualize import blend_images, colorize, with_legend

    def picture(image, label):
        if out_format == "index":
            return to_label_space(label, dataset)
        seg = colorize(label, palette)
        seg = blend_images(image, seg) if blend else seg
        return with_legend(seg, label, palette, class_names) if legend else seg

    return picture
