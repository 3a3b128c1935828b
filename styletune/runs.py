"""Reading what training wrote: weights directories and run directories.

Every weights directory (``final/``, ``best/``, ``checkpoints/step-N/``) holds a
``styletune.json`` naming its base model and method, plus either a peft adapter
(LoRA) or a complete transformers model (full fine-tuning), and the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoints import WEIGHTS_INFO
from .errors import StyletuneError


def weights_dir(path: Path) -> Path:
    """The weights a ``--model`` path means: a run's ``final/``, or the directory itself."""
    if (path / WEIGHTS_INFO).is_file():
        return path
    if (path / "final" / WEIGHTS_INFO).is_file():
        return path / "final"
    raise StyletuneError(f"{path} is not a complete styletune run (no final/ weights); was training interrupted? "
                         "resume it with `styletune train --resume --out {path}`")


def read_info(path: Path) -> dict:
    return json.loads((weights_dir(path) / WEIGHTS_INFO).read_text())


def write_info(path: Path, base_model: str, method: str, step: int) -> None:
    (path / WEIGHTS_INFO).write_text(json.dumps({"base_model": base_model, "method": method, "step": step}, indent=1))


def load_run_model(path: Path, torch_dtype, merge: bool = True):
    """(model, tokenizer, base model name) for a run or weights directory.

    LoRA adapters are merged into the base weights by default, so generation runs
    at the plain model's speed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import _from_pretrained, load_plain, resolve

    wdir = weights_dir(path)
    info = read_info(wdir)
    source = resolve(str(wdir))
    tokenizer = _from_pretrained(AutoTokenizer, str(wdir), source)
    if info["method"] == "full":
        model = _from_pretrained(AutoModelForCausalLM, str(wdir), source, dtype=torch_dtype)
        return model, tokenizer, info["base_model"]
    from peft import PeftModel

    base, _ = load_plain(resolve(info["base_model"]), torch_dtype)
    model = PeftModel.from_pretrained(base, str(wdir))
    if merge:
        model = model.merge_and_unload()
    return model, tokenizer, info["base_model"]


def merge_run(run: str, out: str) -> Path:
    """Write a plain transformers directory (base + merged adapter) that loads with no styletune."""
    import torch

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
