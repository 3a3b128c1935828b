"""Checkpoints that are complete or absent, and finding the newest complete one.

A checkpoint is written into ``checkpoints/.tmp-step-NNNNNN-PID`` and renamed to
``checkpoints/step-NNNNNN`` only when every file is on disk, so a crash or a kill
mid-save leaves a temporary directory that lookup ignores (and the next save
removes), never a checkpoint that looks complete but is not.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import torch

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_state.pt"
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


def save_checkpoint(root: Path, step: int, save_weights: Callable[[Path], None], optimizer, state: dict) -> Path:
    """Weights, optimizer, RNG and loop state for exact resume; ``state`` is JSON-able."""

    def fill(tmp: Path) -> None:
        save_weights(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / TENSORS_FILE)
        # Written last: a directory with this file has everything.
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))

    return write_atomically(step_dir(root, step), fill)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    base = root / "checkpoints"
    if not base.is_dir():
        return []
    found = [p for p in base.glob("step-*") if (p / STATE_FILE).is_file() and (p / TENSORS_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def newest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(loop state, tensors: optimizer and rng)."""
    state = json.loads((path / STATE_FILE).read_text())
    tensors = torch.load(path / TENSORS_FILE, weights_only=False)
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
