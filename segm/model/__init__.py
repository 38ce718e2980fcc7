from segm.model.cts import TokenBudgetError, TokenLayout
from segm.model.factory import build_net_kwargs, create_segmenter, load_model, save_model
from segm.model.segmenter import Segmenter, SegmenterOutput

__all__ = [
    "Segmenter", "SegmenterOutput", "TokenBudgetError", "TokenLayout",
    "build_net_kwargs", "create_segmenter", "load_model", "save_model",
]
