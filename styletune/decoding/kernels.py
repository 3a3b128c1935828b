"""styletune's own CPU kernels (``kernels.c``) for the decode step's work between its products.

At one token per row the eager step spends more time dispatching PyTorch operations than reading
weights: on the bundled SmolLM2, about 35 small operations per layer (norms, rotation, attention, the
SwiGLU gate, dtype casts), a few microseconds each, around four matrix products. ``kernels.c`` does
each group of them in one call over the step's own preallocated buffers (for GPT-2 too: LayerNorm,
attention without rotation, the tanh GELU). Where the CPU has AVX-512
VNNI or AVX2, it also has products of int4 and int8 matrices in styletune's own layout (``st_q4_mm``,
``st_q8_mm``, with int8 activations; ``fast._int_kernels``); elsewhere (Arm, x86-64 before AVX2) the
products stay PyTorch's (int4, fp16, int8). See ``fast._KernelStep`` for where the step uses them, and the bench
(``styletune_generate_b1_no_kernels``, ``decode_floor_b1``) for what they buy.

The file is compiled on first use by the system's C compiler (``$CC``, else Python's, ``cc``, ``gcc``
or ``clang``), for this machine's CPU (``-march=native``) and with OpenMP (``-fopenmp``: GCC's libgomp,
which resolves to the copy PyTorch has already loaded, so the products share PyTorch's threads and
follow ``torch.set_num_threads``), into ``<cache>/kernels/``, keyed by the
source, the command and the CPU, and loaded with ctypes; later processes load it in milliseconds.
Where there is no compiler, or ``STYLETUNE_KERNELS=0``, the step runs on PyTorch operations alone:
slower, the same arithmetic to float rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-fopenmp-simd", "-fPIC", "-shared"]

_LOCK = threading.Lock()
_LOADED: dict[str, ctypes.CDLL | None] = {}

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "st_add_rms": [_P, _P, _I, _P, _P, _I, _I, _I, _F, _P],
    "st_add_layer_norm": [_P, _P, _I, _P, _P, _P, _I, _I, _I, _F, _P],
    "st_silu_mul": [_P, _I, _P, _I, _I, _I, _P],
    "st_gelu_tanh": [_P, _I, _P, _I, _I, _I, _P],
    "st_rope_attend": [_P, _I, _P, _P, _P, _P, _I, _I, _P, _P, _I, _P, _I, _P, _I, _I, _I, _I, _I, _F, _P],
    "st_low_rank": [_P, _I, _P, _P, _P, _I, _P, _I, _I, _I, _I, _P],
    "st_q4_mm": [_P, _I, _P, _P, _P, _I, _I, _I, _P, _I, _I],
    "st_q8_mm": [_P, _I, _P, _P, _P, _I, _I, _I, _P, _I, _I],
    "st_int_products": [],
}
_RETURNS = {"st_int_products": _I}


def enabled() -> bool:
    return os.environ.get("STYLETUNE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> list[str]:
    """``$CC`` where set; else the first of Python's own compiler, ``cc``, ``gcc`` and ``clang`` that is
    installed (Python's may name one this machine lacks, as Debian's ``x86_64-linux-gnu-gcc``)."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for cc in (sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(shlex.split(cc)[0]):
            return shlex.split(cc)
    raise OSError("no C compiler found (set CC, or install one: Debian's gcc)")


def _cpu() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build(cache: Path) -> Path:
    source = SOURCE.read_bytes()
    cc = _compiler()
    # some compilers take no -march=native (Apple's on arm64) or no -fopenmp (Apple's clang): then without
    for arch in (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []):
        command = [*cc, *FLAGS, *arch]
        key = hashlib.sha256(b"\0".join([source, " ".join(command).encode(), _cpu().encode()])).hexdigest()[:20]
        target = cache / f"styletune-kernels-{key}.so"
        if target.exists():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
        try:
            done = subprocess.run([*command, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: a process building beside this one never reads half a file
                return target
            error = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError(f"{' '.join(cc)} could not build {SOURCE.name}: {error}")


def loaded() -> ctypes.CDLL | None:
    """The library as this process loaded it, if it has, whatever ``STYLETUNE_KERNELS`` says now: for the
    weight copies made for its kernels while it was on."""
    return _LOADED.get("lib")


def library() -> ctypes.CDLL | None:
    """The kernels, built and loaded once per process; None where disabled or not buildable (with a
    warning saying why)."""
    if not enabled():
        return None
    with _LOCK:
        if "lib" not in _LOADED:
            from ..models import cache_root

            try:
                lib = ctypes.CDLL(str(_build(cache_root() / "kernels")))
                for name, argtypes in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = argtypes, _RETURNS.get(name)
            except (OSError, subprocess.SubprocessError) as exc:
                warnings.warn(f"styletune's decode kernels are not available ({exc}); decoding with PyTorch "
                              "operations alone (slower)", stacklevel=2)
                lib = None
            _LOADED["lib"] = lib
        return _LOADED["lib"]
