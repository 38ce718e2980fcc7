"""Segmenter with Content-aware Token Sharing (CTS).

The public API is imported lazily so that light commands (dataset preparation) start fast.
"""
__version__ = "0.1.0"
__all__ = ["create_segmenter", "load_model", "load_config", "predict"]


def __getattr__(name):
    if name in ("create_segmenter", "load_model"):
        from segm.model import factory

        return getattr(factory, name)
    if name == "load_config":
        from segm.config import load_config

        return load_config
    if name == "predict":
        from segm.inference import predict

        return predict
    raise AttributeError(f"module 'segm' has no attribute {name!r}")
