"""Writing a tuned run where other tools run it: GGUF for llama.cpp and Ollama, or a plain
transformers directory.

``export(run, out, format="gguf", quant="q8_0")`` merges the run's LoRA adapter into its base
(or takes the fully fine-tuned weights), then:

- ``hf``: ``save_pretrained`` (safetensors, config, ``generation_config.json`` with the run's
  decoding defaults, tokenizer, a model card): loads with ``AutoModelForCausalLM`` and no
  styletune.
- ``gguf``: one ``NAME.gguf`` written in Python with the ``gguf`` package's ``GGUFWriter`` (no
  llama.cpp build), with the architecture's metadata, the byte-level BPE tokenizer (tokens,
  types, merges, special ids, pre-tokenizer, chat template) and the tensors named, laid out and
  permuted as llama.cpp's ``convert_hf_to_gguf.py`` writes them, in F32, F16 or Q8_0 (quantised
  by ``gguf.quants``); plus an Ollama ``Modelfile`` and a README saying how to run it.

The whole output directory is filled under a temporary name and renamed when complete, so an
interrupted export never leaves a file that looks finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .architectures import architecture_of, exportable
from .errors import StyletuneError

FORMATS = ("gguf", "hf")
QUANTS = ("f32", "f16", "q8_0")

GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1}
"""The decoding settings written with an export (``generation_config.json``, Modelfile ``PARAMETER``
lines): those of ``styletune write`` and of the samples training logs."""


@dataclass
class ExportResult:
    out: Path
    files: list[str] = field(default_factory=list)
    weights: str = ""
    """Which weights of the run were exported (``best``, ``final``, ``checkpoints/step-N``)."""


def export(run: str, out: str, format: str = "gguf", quant: str = "q8_0", overwrite: bool = False) -> ExportResult:
    """Export the run (or one of its weights directories) ``run`` to the directory ``out``."""
    import torch

    from . import checkpoints as ckpt
    from .models import load_run_model
    from .runs import is_run_dir, read_info, run_root, weights_dir

    if format not in FORMATS:
        raise StyletuneError(f"--format must be {' or '.join(FORMATS)}, got {format}")
    if quant not in QUANTS:
        raise StyletuneError(f"--quant must be one of {', '.join(QUANTS)}, got {quant}")
    src = Path(run)
    if not src.is_dir() or not is_run_dir(src):
        raise StyletuneError(f"no such run directory: {run}")
    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise StyletuneError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    wdir = weights_dir(src)
    info = read_info(wdir)
    model, tokenizer, base = load_run_model(src, torch.float32)
    arch = architecture_of(model)
    if format == "gguf" and (arch is None or arch.gguf is None):
        raise StyletuneError(f"GGUF export supports the {', '.join(exportable())} architectures; this run's "
                             f"model is {model.config.model_type} (use --format hf)")
    root = run_root(wdir) or wdir
    which = str(wdir.relative_to(root)) if wdir != root else wdir.name
    name = _export_name(root)
    result = ExportResult(out=dest, weights=which)

    def fill(tmp: Path) -> None:
        if format == "hf":
            _write_hf(model, tokenizer, tmp, base, info, which)
        else:
            _write_gguf(model, tokenizer, tmp / f"{name}.gguf", quant, arch.gguf, name, base)
            _write_modelfile(tmp, name, tokenizer)
            _write_gguf_readme(tmp, name, quant, base, which)
        result.files = sorted(p.name for p in tmp.iterdir())

    if dest.exists() and dest.is_file():
        dest.unlink()  # --overwrite of a file by a directory
    ckpt.write_atomically(dest, fill)
    return result


def _export_name(root: Path) -> str:
    stem = root.resolve().name or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem)


# ---------------------------------------------------------------------------------------- hf


def _write_hf(model, tokenizer, out: Path, base: str, info: dict, which: str) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        **GENERATION_DEFAULTS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(f"""---
library_name: transformers
base_model: {base}
tags: [styletune, text-generation]
---
# {out.name}

Fine-tuned with [styletune](https://pypi.org/project/styletune/) ({info['method']}, the run's `{which}`
weights, step {info.get('step')}) from `{base}`{', LoRA merged into the base weights' if info['method'] == 'lora' else ''}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
ids = tokenizer("Once upon a time", return_tensors="pt")
print(tokenizer.decode(model.generate(**ids, max_new_tokens=60)[0]))
```

`generation_config.json` holds the decoding defaults ({_settings_text()}).
""", encoding="utf-8")


def _settings_text() -> str:
    return ", ".join(f"{k} {v}" for k, v in GENERATION_DEFAULTS.items() if k != "do_sample")


# -------------------------------------------------------------------------------------- gguf


def _write_gguf(model, tokenizer, path: Path, quant: str, gguf_arch: str, name: str, base: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if gguf_arch == "llama":
        _llama_metadata(writer, model.config)
    else:
        _gpt2_metadata(writer, model.config)
    _tokenizer_metadata(writer, tokenizer, model.config.vocab_size, base)
    for gguf_name, array in _gguf_tensors(model, gguf_arch):
        _add_tensor(writer, gguf_name, array, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _llama_metadata(writer, config) -> None:
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise StyletuneError(f"GGUF export supports Llama models without RoPE scaling; this one uses "
                             f"{rope.get('rope_type')}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _gpt2_metadata(writer, config) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _pre_tokenizer(spec: dict, base: str) -> str:
    """llama.cpp's name for how text is split before BPE. A base that came from a GGUF file says it
    itself; otherwise it is read from the pre-tokenizer in the tokenizer's JSON ``spec``."""
    from .models import REGISTRY, bundled_gguf

    gguf_file = bundled_gguf() if REGISTRY.get(base, {}).get("source") == "bundled" else (
        Path(base) if base.endswith(".gguf") else None)
    if gguf_file is not None:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf_file)).get_field("tokenizer.ggml.pre")
        if field is not None:
            return field.contents()
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    raise StyletuneError(f"GGUF export supports byte-level BPE tokenizers split as GPT-2 or SmolLM split text; "
                         f"this one's pre-tokenizer is {' + '.join(map(str, kinds)) or 'none'}")


def _tokenizer_metadata(writer, tokenizer, vocab_size: int, base: str) -> None:
    """Tokens by id with their types, the merges, special ids and the chat template, as llama.cpp's
    converter writes a byte-level BPE ("gpt2") vocabulary."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())  # tokenizer.json, as the tokenizers library has it
    if spec["model"]["type"] != "BPE":
        raise StyletuneError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM); this "
                             "model's tokenizer is not one")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec, base))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = spec["model"].get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and 0 <= token_id < vocab_size:
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                             "pad": "add_pad_token_id"}[kind])(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _permute(weight, heads: int):
    """llama.cpp's layout for Q and K projections: the two halves of each head's rotary pairs
    interleaved (transformers' GGUF loader and llama.cpp's converter undo/apply the same)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _gguf_tensors(model, gguf_arch: str):
    """(GGUF name, float32 numpy array) for every tensor, in the model's order, laid out for llama.cpp."""
    import gguf

    config = model.config
    arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}[gguf_arch]
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if gguf_arch == "gpt2" and hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers, not weights
        if hf_name == "lm_head.weight" and tied and gguf_arch == "llama":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise StyletuneError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
        data = tensor.detach().float().cpu().numpy()
        if gguf_arch == "llama" and ".self_attn.q_proj." in hf_name:
            data = _permute(data, config.num_attention_heads)
        elif gguf_arch == "llama" and ".self_attn.k_proj." in hf_name:
            data = _permute(data, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        elif gguf_arch == "gpt2" and hf_name.endswith((".attn.c_attn.weight", ".attn.c_proj.weight",
                                                       ".mlp.c_fc.weight", ".mlp.c_proj.weight")):
            data = data.T.copy()  # Conv1D keeps (in, out); llama.cpp wants (out, in)
        yield new, data
        if gguf_arch == "gpt2" and new == "token_embd.weight" and "lm_head.weight" not in state:
            yield "output.weight", data  # GPT-2's head is the embedding; llama.cpp reads it as output


def _add_tensor(writer, name: str, data, quant: str) -> None:
    import gguf
    import numpy as np

    # As llama.cpp's converter does: 1-D tensors (norms, biases) stay F32 whatever the file type.
    if data.ndim <= 1 or quant == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif quant == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    elif data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    else:  # rows that do not fill whole 32-value blocks cannot be Q8_0
        writer.add_tensor(name, data.astype(np.float16))


# ----------------------------------------------------------------------------- Ollama, README

CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def _write_modelfile(out: Path, name: str, tokenizer) -> None:
    lines = [f"FROM ./{name}.gguf", ""]
    template = getattr(tokenizer, "chat_template", None) or ""
    stops = []
    if "<|im_start|>" in template:  # ChatML (SmolLM2-Instruct and others): Ollama's own Go template for it
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', ""]
        stops.append("<|im_end|>")
    elif template:
        lines += ["# The model's chat template is a Jinja template, which Ollama reads from the GGUF file itself.", ""]
    ollama_names = {"temperature": "temperature", "top_p": "top_p", "repetition_penalty": "repeat_penalty"}
    for key, value in GENERATION_DEFAULTS.items():
        if key in ollama_names:
            lines.append(f"PARAMETER {ollama_names[key]} {value}")
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    (out / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_gguf_readme(out: Path, name: str, quant: str, base: str, which: str) -> None:
    (out / "README.md").write_text(f"""# {name}.gguf

A styletune run (the `{which}` weights, base model `{base}`) as one GGUF file, {quant.upper()},
for llama.cpp, Ollama, LM Studio and everything else that reads GGUF.

llama.cpp:

```
llama-cli -m {name}.gguf -p "Once upon a time" -n 100 --temp 0.8 --top-p 0.95 --repeat-penalty 1.1
llama-server -m {name}.gguf --port 8080      # OpenAI-compatible API on http://127.0.0.1:8080/v1
```

Ollama (the `Modelfile` here holds the decoding defaults, and the chat template when the model has one):

```
ollama create {name} -f Modelfile
ollama run {name} "Once upon a time"
```

Python, with llama-cpp-python:

```python
from llama_cpp import Llama
llm = Llama(model_path="{name}.gguf")
print(llm("Once upon a time", max_tokens=100, temperature=0.8, top_p=0.95)["choices"][0]["text"])
```
""", encoding="utf-8")


def merge_run(run: str, out: str) -> Path:
    """``styletune merge RUN OUT``: the same as ``styletune export RUN OUT --format hf``."""
    return export(run, out, format="hf").out


__all__ = ["FORMATS", "QUANTS", "ExportResult", "export", "merge_run"]
