"""The single import point of mmcv 1.7 / mmsegmentation 0.30 (quiet, and shimmed if needed).

mmcv warns about its 2.0 rename at import, and imports torch's C++-extension builder, which
warns when CUDA_HOME is set without a CUDA runtime; neither says anything actionable for us.
mmseg logs "Loaded N images" through its root logger at INFO for every dataset it builds;
we raise that logger to WARNING.
"""
from __future__ import annotations

import logging
import warnings

_cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
_level = _cpp_extension_log.level
_cpp_extension_log.setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    import mmcv  # noqa: F401
    from mmseg.datasets import ADE20KDataset, CityscapesDataset, CustomDataset, PascalContextDataset
    from mmseg.datasets.builder import PIPELINES
    from mmseg.datasets.pipelines import Compose
    from mmseg.utils import get_root_logger

_cpp_extension_log.setLevel(_level)
get_root_logger()  # initialise it first: mmcv sets the level when a logger is first created
logging.getLogger("mmseg").setLevel(logging.WARNING)

__all__ = [
    "ADE20KDataset",
    "CityscapesDataset",
    "CustomDataset",
    "PascalContextDataset",
    "PIPELINES",
    "Compose",
]
