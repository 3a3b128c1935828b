"""What styletune knows about each model architecture, in one record per architecture.

Training (LoRA targets, which layers form the stack), the loss (whether the chunked
head + cross-entropy applies), decoding (whether the lean decode step exists) and export
(the GGUF architecture name) all read these records, keyed by ``config.model_type``.
An architecture not listed here still trains and generates through transformers' own
code (LoRA on every linear layer, the model's own loss and forward); it just gets none of
the fast paths and cannot be exported as GGUF.

No torch import: this module is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass

_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    """``config.model_type`` as transformers writes it."""
    layers: str
    """Attribute path from the ``*ForCausalLM`` model to its stack of transformer blocks."""
    lora_targets: tuple[str, ...] | None = None
    """Module names LoRA adapts (attention and MLP projections); None: every linear layer."""
    plain_head: bool = True
    """The forward is ``lm_head(final hidden states)`` with a plain ``nn.Linear`` head, so the chunked
    loss gives the same loss and gradients (checked against transformers 5.x sources)."""
    fast_decode: bool = False
    """:mod:`styletune.decoding.fast` has a lean decode step for it (exact against transformers)."""
    gguf: str | None = None
    """llama.cpp's name for the architecture, when ``styletune export --format gguf`` writes it."""


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "model.layers", _LLAMA_PROJECTIONS, fast_decode=True, gguf="llama"),
    # GPT-2's projections are Conv1D layers (peft sets fan_in_fan_out for them).
    Architecture("gpt2", "transformer.h", ("c_attn", "c_proj", "c_fc"), fast_decode=True, gguf="gpt2"),
    Architecture("mistral", "model.layers", _LLAMA_PROJECTIONS),
    Architecture("qwen2", "model.layers", _LLAMA_PROJECTIONS),
    Architecture("qwen3", "model.layers", _LLAMA_PROJECTIONS),
    Architecture("phi3", "model.layers"),
    Architecture("olmo", "model.layers"),
    Architecture("olmo2", "model.layers"),
    Architecture("smollm3", "model.layers", _LLAMA_PROJECTIONS),
    Architecture("gpt_neox", "gpt_neox.layers", ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    Architecture("gptj", "transformer.h"),
    Architecture("gpt_bigcode", "transformer.h"),
    Architecture("stablelm", "model.layers"),
    Architecture("starcoder2", "model.layers"),
)}


def architecture_of(model_or_config) -> Architecture | None:
    """The record for a transformers model or config (a peft wrapper is looked through), or None."""
    config = getattr(model_or_config, "config", model_or_config)
    return ARCHITECTURES.get(getattr(config, "model_type", None))


def default_lora_targets(model) -> list[str] | str:
    """The modules LoRA adapts by default: the architecture's projections, else every linear layer
    (peft's ``"all-linear"``)."""
    arch = architecture_of(model)
    return list(arch.lora_targets) if arch and arch.lora_targets else "all-linear"


def exportable() -> list[str]:
    """Model types ``styletune export --format gguf`` supports."""
    return sorted(a.model_type for a in ARCHITECTURES.values() if a.gguf)
