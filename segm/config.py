"""The one place where configuration YAML is read.

`load_config()` returns the presets of `configs/config.yml` (model, decoder, dataset);
`load_yaml()` reads any YAML file the project deals with, including a reference
`variant.yml` whose tuples carry `!!python/tuple` tags, without an unsafe loader.
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import yaml

from segm.utils.atomic import atomic_write_text


class _TupleSafeLoader(yaml.SafeLoader):
    """SafeLoader that also accepts PyYAML's `!!python/tuple` tag (reference variant.yml)."""


def _construct_tuple(loader, node):
    return tuple(loader.construct_sequence(node, deep=True))


_TupleSafeLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)


class _TupleDumper(yaml.SafeDumper):
    """Writes tuples with `!!python/tuple` so reference tools read variant.yml back unchanged."""


def _represent_tuple(dumper, data):
    return dumper.represent_sequence("tag:yaml.org,2002:python/tuple", list(data))


_TupleDumper.add_representer(tuple, _represent_tuple)


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"YAML file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_TupleSafeLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse YAML file {path}: {e}") from None
    return {} if data is None else data


def dump_yaml(data, path) -> None:
    """Atomic write: temporary file, then rename."""
    atomic_write_text(path, yaml.dump(data, Dumper=_TupleDumper, sort_keys=False))


def _config_path() -> Path:
    here = Path(__file__).resolve().parent
    # a checkout / editable install reads configs/ at the repository root; a wheel install
    # carries the same file as segm/configs/config.yml (setup.py package_dir)
    for path in (here.parent / "configs" / "config.yml", here / "configs" / "config.yml"):
        if path.is_file():
            return path
    raise FileNotFoundError("configs/config.yml not found: reinstall the package (make install)")


@functools.lru_cache(maxsize=1)
def _load_config_cached() -> dict:
    return load_yaml(_config_path())


def load_config() -> dict:
    """Presets: {'model': {...}, 'decoder': {...}, 'dataset': {...}} (a fresh copy)."""
    return copy.deepcopy(_load_config_cached())


def dataset_preset(name: str) -> dict:
    """The `dataset:` preset of configs/config.yml for `name` ({} for a dataset without one)."""
    return load_config()["dataset"].get(name, {})


class DatasetRootError(ValueError, RuntimeError):
    """`$DATASET` is not set and no folder was given: a usage error (ValueError: one line on
    every command), and a RuntimeError for callers that catch it as such."""


def dataset_dir() -> Path:
    """The datasets root, `$DATASET`; unset, DatasetRootError."""
    root = os.environ.get("DATASET")
    if not root:
        raise DatasetRootError(
            "the datasets root is not set: export DATASET=/path/to/datasets "
            "or pass --data-root DIR"
        )
    return Path(root)


def pair(x) -> tuple[int, int]:
    """(h, w) from one size or a pair (a crop, an image size, a grid)."""
    if isinstance(x, (tuple, list)):
        return int(x[0]), int(x[1])
    return int(x), int(x)
