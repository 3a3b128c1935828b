"""styletune: teach a small language model to write in someone's style.

The public API; the CLI is a thin layer over these functions.
"""

from .config import DataConfig, DecodingConfig
from .errors import StyletuneError

__version__ = "0.1.0"

__all__ = ["DataConfig", "DecodingConfig", "StyletuneError", "load_model", "generate", "probe", "__version__"]


def __getattr__(name):
    # Lazy, so `import styletune` and `styletune --help` do not import torch.
    if name == "load_model":
        from .models import load_model

        return load_model
    if name == "generate":
        from .decoding.engine import generate

        return generate
    if name == "probe":
        from .probe import probe

        return probe
    raise AttributeError(name)
