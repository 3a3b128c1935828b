"""The layout of a run directory, in one place: what is a run, where its weights are.

A run (``runs/NAME``, made by ``styletune train``) holds ``config.yaml``,
``metrics.jsonl`` and three kinds of weights directory: ``final/`` (the last step),
``best/`` (the step with the lowest validation loss) and ``checkpoints/step-N/``. Every
weights directory holds a ``styletune.json`` naming its base model, method and step,
plus either a peft adapter (LoRA) or a complete transformers model (full
fine-tuning), and the tokenizer.

``--model runs/NAME`` means ``best/`` when the run has one (as transformers'
``load_best_model_at_end`` would keep), else ``final/``; ``--model runs/NAME/final``
or ``runs/NAME/checkpoints/step-N`` picks another. Nothing here loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoints import WEIGHTS_INFO
from .errors import StyletuneError

RUN_CONFIG = "config.yaml"


def is_weights_dir(path: Path) -> bool:
    return (path / WEIGHTS_INFO).is_file()


def is_run_dir(path: Path) -> bool:
    """A training run (``runs/NAME``) or one of its weights directories."""
    return is_weights_dir(path) or (path / RUN_CONFIG).is_file()


def has_run(out: Path) -> bool:
    """Whether ``out`` already holds (part of) a run that a new one would overwrite."""
    return any((out / name).exists() for name in (RUN_CONFIG, "metrics.jsonl", "checkpoints", "final"))


def run_root(path: Path) -> Path | None:
    """The run directory a path belongs to (``runs/NAME`` for ``runs/NAME/checkpoints/step-N``)."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / RUN_CONFIG).is_file():
            return candidate
    return None


def weights_dir(path: Path) -> Path:
    """The weights a ``--model`` path means: the directory itself if it is one, else the run's
    ``best/`` (or ``final/`` when training kept no best, e.g. without a validation split)."""
    path = Path(path)
    if is_weights_dir(path):
        return path
    if not is_weights_dir(path / "final"):
        raise StyletuneError(f"{path} is not a complete styletune run (no final/ weights); was training interrupted? "
                             f"resume it with `styletune train --resume --out {path}`")
    return path / "best" if is_weights_dir(path / "best") else path / "final"


def read_info(path: Path) -> dict:
    """``styletune.json`` of the weights ``path`` means: base model, method, step."""
    wdir = weights_dir(path)
    try:
        info = json.loads((wdir / WEIGHTS_INFO).read_text(encoding="utf-8"))
        if not {"base_model", "method"} <= set(info):
            raise ValueError("base_model or method missing")
    except (ValueError, AttributeError, TypeError, UnicodeDecodeError) as exc:
        raise StyletuneError(f"{wdir / WEIGHTS_INFO} is damaged ({str(exc).splitlines()[0]}); "
                             "use another weights directory of the run, or re-run training") from None
    return info


def write_info(path: Path, base_model: str, method: str, step: int) -> None:
    (path / WEIGHTS_INFO).write_text(json.dumps({"base_model": base_model, "method": method, "step": step}, indent=1))


def check_weight_files(wdir: Path) -> None:
    """Refuse a weights directory whose safetensors files are truncated or damaged, naming the file
    (safetensors checks that the header is whole and that the file covers every tensor)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(wdir).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            reason = str(exc).splitlines()[0].removeprefix("Error while deserializing header: ")
            root = run_root(Path(wdir))
            hint = (f"use another weights directory of {root} (best/, final/ or checkpoints/step-N) or re-run training"
                    if root is not None else "restore or re-create it")
            raise StyletuneError(f"{file} is damaged ({reason}); {hint}") from None
