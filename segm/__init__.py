"""Segmenter with Content-aware Token Sharing (CTS)."""
from segm.config import load_config
from segm.model.factory import create_segmenter, load_model

__version__ = "0.1.0"


def predict(model, image, **kwargs):
    """Label map of an image (PIL or numpy HWC uint8) at its own size; see segm.inference."""
    from segm.inference import predict as _predict

    return _predict(model, image, **kwargs)


__all__ = ["create_segmenter", "load_model", "load_config", "predict"]
