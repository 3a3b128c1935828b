"""styletune: teach a small language model to write in someone's style.

The public API; the CLI is a thin layer over these functions.  Modules are named
so that none shadows a function here (``styletune.train`` is the function, its
loop lives in ``styletune.training``).
"""

from .config import DataConfig, DecodingConfig, TrainConfig
from .errors import StyletuneError

__version__ = "0.1.0"

__all__ = ["DataConfig", "DecodingConfig", "TrainConfig", "StyletuneError", "load_model", "generate", "probe",
           "train", "compare", "evaluate", "export", "serve", "__version__"]

# Imported lazily, so `import styletune` and `styletune --help` do not import torch.
_LAZY = {
    "load_model": ("models", "load_model"),
    "generate": ("decoding.engine", "generate"),
    "probe": ("probing", "probe"),
    "train": ("training", "train"),
    "compare": ("comparison", "compare"),
    "evaluate": ("evaluation", "evaluate"),
    "export": ("exporting", "export"),
    "serve": ("server", "serve"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'styletune' has no attribute {name!r}")
