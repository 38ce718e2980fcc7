"""The model: ViT encoder, decoders, token reduction (`reduction`: the seam, CTS), Segmenter,
policy network, factory.

Exports are imported lazily (timm costs seconds), so command-line tools that only need
`segm.model.spec` or `segm.model.reduction.rules` start fast.
"""
from segm.utils.lazy import lazy_exports

_EXPORTS = {
    "Segmenter": "segm.model.segmenter",
    "SegmenterOutput": "segm.model.segmenter",
    "Reducer": "segm.model.reduction.base",
    "TokenBudgetError": "segm.model.reduction.rules",
    "TokenLayout": "segm.model.reduction.cts",
    "TokenMap": "segm.model.reduction.base",
    "register_reducer": "segm.model.reduction.rules",
    "build_net_kwargs": "segm.model.spec",
    "create_segmenter": "segm.model.factory",
    "load_model": "segm.model.factory",
    "save_model": "segm.model.factory",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
