"""Package attributes imported on first use, so that light commands start fast."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module-level `__getattr__` for `package`: `exports` maps a name to the module that
    defines it, imported when the name is first asked for."""

    def __getattr__(name):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
