"""``--compile``: the lean decode step compiled ahead of time, once per shape, and kept on disk.

``torch.compile`` recompiles the step in every new process (30-40 s here, seconds with a warm
inductor cache) and then still runs Python per token: its guard check alone took ~0.9 ms of a
~10 ms SmolLM2 step, measured here. AOTInductor (``torch.export`` then
``torch._inductor.aoti_compile_and_package``) turns the same step into one C++ function in a
``.pt2`` package that loads in ~0.2 s and runs without Python between its kernels: on SmolLM2 with
the default ``--quantize auto``, 129 tokens/s against 78 for ``torch.compile`` of the same step (one
thread, an AMD EPYC, in two probes an hour apart; ``make bench``'s ``styletune_generate_b1_compile``
row measures it against llama.cpp).

An fp16 output head (``--quantize auto``'s, off the 4-bit grid) runs after the package, on the final
norm's output: FBGEMM's packed weight is not a tensor, and a package takes only tensors.

The weights and the KV cache are inputs of the compiled step, not constants inside it, and the
filled length is a dynamic dimension (each step attends only to the filled positions), so a package
depends only on shapes: every model of one architecture and size (the base model and each run
tuned from it), the weight format, the batch size and the cache's length bucket. It lives in the styletune
cache under ``decode-steps/``, keyed by all of that plus torch's version, this code and the CPU.
Anything that goes wrong (no C++ compiler, an operation export cannot take) falls back to
``torch.compile``, and from there to the eager step, with a warning.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

# Packages kept: each is one (architecture, size, format, batch, cache length); the least recently
# used beyond this many are deleted.
KEEP_PACKAGES = 8

# Loaded packages, by key: ``generate`` makes a decoder per call, and loading costs ~0.2 s.
_LOADED: dict = {}
_LOADED_LOCK = threading.Lock()


def _is_function(obj) -> bool:
    """An activation the step calls: a Python function or lambda (``__code__``) or a builtin (no
    ``__dict__``). Neither holds tensors, so neither is walked into or copied."""
    return hasattr(obj, "__code__") or callable(obj) and not hasattr(obj, "__dict__")


def _flatten(obj, tensors: list, sig: list) -> None:
    """Every tensor reachable from ``obj`` (the decoder's layers, head and architecture object) into
    ``tensors``; into ``sig``, everything else the traced step depends on: types, sizes, flags."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        sig.append(("tensor", tuple(obj.shape), str(obj.dtype), obj.stride(), obj.device.type))
    elif isinstance(obj, (list, tuple)):
        sig.append((type(obj).__name__, len(obj)))
        for x in obj:
            _flatten(x, tensors, sig)
    elif isinstance(obj, dict):
        sig.append(("dict", tuple(obj)))
        for x in obj.values():
            _flatten(x, tensors, sig)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        sig.append(repr(obj))
    elif _is_function(obj):
        code = getattr(obj, "__code__", None)  # a lambda's name says nothing: its code does
        sig.append(("function", getattr(obj, "__module__", ""), obj.__qualname__)
                   + (() if code is None else (code.co_code.hex(), repr(code.co_consts), repr(code.co_names))))
    else:
        sig.append(("object", type(obj).__module__, type(obj).__qualname__))
        for name, value in sorted(vars(obj).items()):
            sig.append(name)
            _flatten(value, tensors, sig)


def _rebind(obj, tensors):
    """A copy of ``obj`` with its tensors, in :func:`_flatten`'s order, taken from the iterator
    ``tensors`` (during export: the step's inputs). The original is left as it was."""
    if isinstance(obj, torch.Tensor):
        return next(tensors)
    if isinstance(obj, list):
        return [_rebind(x, tensors) for x in obj]
    if isinstance(obj, tuple):
        return tuple(_rebind(x, tensors) for x in obj)
    if isinstance(obj, dict):
        return {k: _rebind(v, tensors) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)) or _is_function(obj):
        return obj
    clone = copy.copy(obj)
    for name, value in sorted(vars(obj).items()):
        setattr(clone, name, _rebind(value, tensors))
    return clone


def _state(decoder):
    return decoder.arch, decoder.layers, decoder.head


class _Step(torch.nn.Module):
    """What is exported: the decoder's step with its weights and KV cache as inputs."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, pos, where, mask, kv, weights):
        d = copy.copy(self.decoder)
        d.arch, d.layers, d.head = _rebind(_state(self.decoder), iter(weights))
        d.kv = list(kv)
        # Attend to the first mask.shape[-1] positions: a length the package takes at run time.
        return type(self.decoder)._step(d, input_ids, pos, where, mask, mask.shape[-1])


@functools.cache
def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return model + "|" + " ".join(sorted(flags))


@functools.cache
def _environment() -> bytes:
    """What every key shares, read once per process: torch, styletune, the CPU, and the code that
    the package was traced from (this module and the step's)."""
    from .. import __version__

    code = Path(__file__).read_bytes() + Path(__file__).with_name("fast.py").read_bytes()
    return b"\0".join(part.encode() for part in (torch.__version__, __version__, _cpu())) + b"\0" + code


def _key(decoder, sig: list, batch: int) -> str:
    h = hashlib.sha256(_environment())
    for part in (repr(sig), str(batch), str(decoder.max_len)):
        h.update(b"\0")
        h.update(part.encode())
    return h.hexdigest()[:24]


def _directory() -> Path:
    from ..models import cache_root

    return cache_root() / "decode-steps"


def _prune(directory: Path, keep: int) -> None:
    packages = sorted((p for p in directory.glob("*.pt2") if not p.name.startswith("building-")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    for old in packages[keep:]:
        try:
            old.unlink()
        except OSError:
            pass


def _build(decoder, tensors: list, path: Path, batch: int) -> None:
    from torch._inductor import aoti_compile_and_package

    ids = torch.zeros(batch, 1, dtype=torch.long, device=decoder.device)
    pos = torch.zeros(batch, dtype=torch.long, device=decoder.device)
    where = torch.zeros(1, dtype=torch.long, device=decoder.device)
    kv = tuple(decoder.kv)
    # On a terminal the streamed prompt may be waiting on its line: start a new one.
    lead = "\n" if sys.stdout.isatty() and sys.stderr.isatty() else ""
    print(f"{lead}compiling the decode step for this model's shape (once, up to a minute; kept in {path.parent})",
          file=sys.stderr, flush=True)
    # The filled length is dynamic (2 .. cache length - 1): one package for every step of a generation,
    # each attending only to the filled positions. Everything else has a fixed shape.
    filled = torch.export.Dim("filled", min=2, max=decoder.max_len - 1)
    mask = decoder.mask[..., :2].contiguous()
    shapes = (None, None, None, {3: filled}, tuple(None for _ in kv), tuple(None for _ in tensors))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, inside export
        program = torch.export.export(_Step(decoder), (ids, pos, where, mask, kv, tuple(tensors)),
                                      dynamic_shapes=shapes, strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="building-", suffix=".pt2")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, path)  # whole or not at all: another process may be loading the same key
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _flat_runner(runner, n_kv: int):
    """``run(tensors) -> logits``: the package called on its inputs already flat, in the order of
    ``_Step.forward``'s arguments (``n_kv`` KV buffers after the first four). The package's own
    ``__call__`` flattens its arguments with pytree on every call (SmolLM2's ~350 tensors); its
    loader's ``boxed_run``, which that call ends in, takes them flat: in an interleaved A/B here the
    step took 7.08 against 7.26 ms a token (best of twelve 128-token runs each)."""
    loader = getattr(runner, "loader", None)
    if loader is None or not hasattr(loader, "boxed_run"):  # another torch: the public call
        return lambda flat: runner(*flat[:4], tuple(flat[4:4 + n_kv]), tuple(flat[4 + n_kv:]))
    return lambda flat: loader.boxed_run(flat)[0]


def compile_step(decoder, fallback):
    """The decoder's fixed-shape step, ``(input_ids, pos, where, mask, upto) -> logits``, as an
    AOTInductor package from the cache (built and stored on first use). ``fallback()`` gives the
    step to use where that fails."""
    from .fast import split_head

    # The package is built from ``body``: the decoder itself, or (an fp16 head) the same without its head.
    body, head = split_head(decoder)
    tensors, sig = [], []
    _flatten(_state(body), tensors, sig)
    batch = decoder.mask.shape[0]
    key = _key(decoder, sig, batch)
    path = _directory() / f"{key}.pt2"
    try:
        with _LOADED_LOCK:
            runner = _LOADED.get(key)
            if runner is None:
                if not path.is_file():
                    _build(body, tensors, path, batch)
                    _prune(path.parent, KEEP_PACKAGES)
                else:
                    os.utime(path)  # recently used
                runner = _LOADED[key] = torch._inductor.aoti_load_package(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure of export or the compiler: compile it another way
        warnings.warn(f"ahead-of-time compilation of the decode step failed ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); using torch.compile",
                      stacklevel=3)
        return fallback()
    weights = tuple(tensors)
    run = _flat_runner(runner, len(decoder.kv))

    def step(input_ids, pos, where, mask, upto):
        # ``mask`` is the decoder's whole fixed-shape mask (what torch.compile's step takes); the
        # package takes its filled prefix: the positions before this token, and this one.
        n = decoder.length + 1
        if n < 2:  # the package takes two positions or more (export specialises 0 and 1): eager
            return decoder._step(input_ids, pos, where, mask, None)
        filled = mask[..., :n].contiguous()
        out = run([input_ids, pos, where, filled, *decoder.kv, *weights])
        return out if head is None else head(out)

    step.package = path
    return step
