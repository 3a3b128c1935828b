"""Writing a run where other tools can use it: a plain transformers directory."""

from __future__ import annotations

from pathlib import Path

from .errors import StyletuneError


def merge_run(run: str, out: str) -> Path:
    """Write RUN (base + merged adapter, or full weights) as a transformers directory that loads with no styletune."""
    import torch

    from .models import load_run_model

    src = Path(run)
    if not src.is_dir():
        raise StyletuneError(f"no such run directory: {run}")
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise StyletuneError(f"{out} already exists and is not empty")
    model, tokenizer, _ = load_run_model(src, torch.float32)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
