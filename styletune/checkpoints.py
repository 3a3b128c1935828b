"""Checkpoints that are complete or absent, and finding the newest complete one.

A checkpoint is written into ``checkpoints/.tmp-step-NNNNNN-PID`` and renamed to
``checkpoints/step-NNNNNN`` only when every file is on disk, so a crash or a kill
mid-save leaves a temporary directory that lookup ignores (and the next save
removes), never a checkpoint that looks complete but is not.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import StyletuneError

STATE_FILE = "trainer_state.json"
"""The loop state (step, tokens, best loss...), the optimizer's hyperparameters and the Python RNG, as JSON."""
TENSORS_FILE = "trainer_state.safetensors"
"""The optimizer's moment tensors and torch's RNG states. Nothing in a checkpoint is unpickled."""
LEGACY_TENSORS_FILE = "trainer_state.pt"
"""What checkpoints written before safetensors held; read with ``torch.load(weights_only=True)``."""
WEIGHTS_INFO = "styletune.json"
"""Written into every weights directory (final/, best/, checkpoints): what base it needs."""


def step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step-{step:06d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``target`` by filling a temporary sibling and renaming it.

    An existing ``target`` is replaced only after the new one is complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_state(optimizer, model, full: bool = False) -> dict:
    """The optimizer's state keyed by parameter name (not position), so that a checkpoint resumes
    whether the model is trained alone, in DDP or sharded (``full``: FSDP, every rank gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if full else StateDictOptions()
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer(optimizer, model, state: dict, full: bool = False) -> None:
    """Restore :func:`optimizer_state`'s output (or, from older checkpoints, a plain positional
    ``optimizer.state_dict()``) into ``optimizer``."""
    if all(isinstance(k, int) for k in state["state"]):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True) if full else StateDictOptions()
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)


def _flatten(optimizer_state: dict, rng: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict and an RNG state as (named tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict] = {}
    for index, per_param in optimizer_state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = rng["torch"]
    for i, cuda_state in enumerate(rng.get("cuda") or []):
        tensors[f"rng.cuda.{i}"] = cuda_state
    version, internal, gauss = rng["python"]
    meta = {"param_groups": optimizer_state["param_groups"], "plain_state": plain_state,
            "python_rng": [version, list(internal), gauss]}
    return tensors, meta


def _unflatten(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int | str, dict] = {}

    def param(name: str):  # a parameter's name; a position in checkpoints written before names
        return int(name) if name.isdigit() else name

    for name, value in tensors.items():
        if name.startswith("optimizer."):
            index, key = name.removeprefix("optimizer.").rsplit(".", 1)
            state.setdefault(param(index), {})[key] = value
    for index, plain in meta.get("plain_state", {}).items():
        state.setdefault(param(index), {}).update(plain)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len([n for n in tensors if n.startswith("rng.cuda.")]))]
    version, internal, gauss = meta["python_rng"]
    rng = {"torch": tensors["rng.torch"], "python": (version, tuple(internal), gauss), "cuda": cuda or None}
    return {"optimizer": {"state": state, "param_groups": groups}, "rng": rng}


def save_checkpoint(root: Path, step: int, save_weights: Callable[[Path], None], optimizer: dict,
                    state: dict) -> Path:
    """Weights, optimizer state (:func:`optimizer_state`), RNG and loop state for exact resume;
    ``state`` is JSON-able.

    Tensors go to safetensors and everything else to JSON, so loading a checkpoint never
    unpickles anything (a pickle can run arbitrary code, and checkpoints get shared)."""

    def fill(tmp: Path) -> None:
        save_weights(tmp)
        tensors, meta = _flatten(optimizer, rng_state())
        save_file(tensors, str(tmp / TENSORS_FILE))
        # Written last: a directory with this file has everything.
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "trainer": meta}, indent=1))

    return write_atomically(step_dir(root, step), fill)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    base = root / "checkpoints"
    if not base.is_dir():
        return []
    found = [p for p in base.glob("step-*") if (p / STATE_FILE).is_file()
             and ((p / TENSORS_FILE).is_file() or (p / LEGACY_TENSORS_FILE).is_file())]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def newest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(loop state, {"optimizer": state dict, "rng": RNG state}) of a complete checkpoint.

    A damaged file is a :class:`StyletuneError` naming it; a legacy ``trainer_state.pt`` is read
    with ``weights_only=True``, so one that carries a pickled object is refused, not run."""
    damaged = f"; resume from an earlier checkpoint by deleting {path}, or start over with --overwrite"
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step number")
    except (ValueError, UnicodeDecodeError) as exc:
        raise StyletuneError(f"{path / STATE_FILE} is damaged ({str(exc).splitlines()[0]}){damaged}") from None
    if "trainer" in state:
        try:
            return state, _unflatten(load_file(str(path / TENSORS_FILE)), state.pop("trainer"))
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
            raise StyletuneError(f"{path / TENSORS_FILE} is damaged ({str(exc).splitlines()[0]}){damaged}") from None
    legacy = path / LEGACY_TENSORS_FILE
    try:
        tensors = torch.load(legacy, weights_only=True)
    except pickle.UnpicklingError:
        raise StyletuneError(f"refusing to load {legacy}: it holds pickled Python objects, which could run code; "
                             "only optimizer tensors and plain data are accepted") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise StyletuneError(f"{legacy} is damaged ({str(exc).splitlines()[0]}){damaged}") from None
    return state, tensors


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints, and leftover temporaries."""
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        # Rename first (atomic), then delete: a kill mid-delete must not leave a
        # step-N directory that still looks complete with some of its files gone.
        trash = old.parent / f".tmp-deleting-{old.name}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for tmp in (root / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
