"""Causal self-attention for training and evaluation on a CPU, registered with transformers.

transformers' default, ``sdpa``, runs PyTorch's CPU flash-attention kernel. At the short
blocks styletune trains on, its backward in bf16 is slow: for SmolLM2's layer shape (batch 8,
9 query heads on 3 key/value heads, head size 64) on one EPYC core, forward + backward took
29 ms per layer at 128 positions and 65 ms at 256. Two matrix products with an fp32 softmax
between them, as transformers' ``eager`` attention computes it but with the query heads of
each key/value head stacked into one product (no ``repeat_kv`` copy), took 9 ms and 35 ms
(with :func:`styletune.training.keep_freed_memory`; without it the fresh score matrices'
page faults took most of the gain at 256). At 384 positions the two were level, and the
product form keeps a (heads, T, T) matrix per layer for backward, so it is used up to
:data:`PRODUCTS_MAX_LEN` positions. In fp32 the two were level at every length. Every other
case (fp32, CUDA, a padding mask, a cache with earlier positions, longer blocks,
soft-capping) goes to transformers' ``sdpa``.
"""

from __future__ import annotations

import torch

NAME = "styletune"
"""The ``attn_implementation`` name this module registers."""

PRODUCTS_MAX_LEN = 256
"""Longest block that takes the two-product path (see the module docstring)."""

_masks: dict[tuple[int, torch.device], torch.Tensor] = {}


def _causal_mask(t: int, device: torch.device) -> torch.Tensor:
    """(T, T) additive fp32 mask: 0 on and below the diagonal, -inf above it."""
    key = (t, device)
    if key not in _masks:
        _masks[key] = torch.full((t, t), float("-inf"), device=device).triu_(1)
    return _masks[key]


def causal_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, T, D), key and value (B, KV, T, D)
    -> ((B, T, H, D), None). :func:`grouped_attention` where it is the faster, else ``sdpa``."""
    t = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Under autocast the products run in its dtype even where rotary embeddings made the query fp32.
    low = (torch.bfloat16, torch.float16)
    products_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    if (query.device.type == "cpu" and products_dtype in low and attention_mask is None
            and causal and 1 < t <= PRODUCTS_MAX_LEN and key.shape[2] == t and query.shape[1] % key.shape[1] == 0
            and not any(kwargs.get(k) for k in ("softcap", "position_bias", "output_attentions"))):
        return grouped_attention(query, key, value, scaling, dropout if module.training else 0.0), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None = None,
                      dropout: float = 0.0) -> torch.Tensor:
    """Causal attention as two products: query (B, H, T, D) on key and value (B, KV, T, D), H a
    multiple of KV -> (B, T, H, D). Scores in the inputs' dtype, softmax in fp32 (as transformers'
    ``eager``); ``dropout`` on the probabilities."""
    b, h, t, d = query.shape
    kv = key.shape[1]
    # Query head i uses key/value head i // (H / KV) (transformers' repeat_kv order), so each key/value
    # head's query heads are consecutive and stack into one (H / KV * T, D) operand. The scale goes on
    # the (smaller) query; for head size 64 (1/8) that is exact.
    q = query.reshape(b, kv, h // kv * t, d) * (d ** -0.5 if scaling is None else scaling)
    scores = (q @ key.transpose(-1, -2)).view(b, kv, h // kv, t, t)
    # Adding the fp32 mask makes the scores fp32 in the same pass.
    probs = torch.softmax(scores + _causal_mask(t, query.device), dim=-1).to(scores.dtype)
    if dropout > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = probs.view(b, kv, h // kv * t, t) @ value  # (B, KV, H / KV * T, D)
    return out.view(b, h, t, d).transpose(1, 2).contiguous()


def register() -> str:
    """Make :func:`causal_attention` available as ``attn_implementation="styletune"`` (its masks are
    built as ``sdpa``'s: none for a causal block without padding). Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(NAME, causal_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_for_training(model) -> bool:
    """Switch ``model`` (a transformers model, or a peft model around one) to this attention where
    it uses ``sdpa`` now; True if it did. Models on ``eager``, ``flash_attention_2`` or others keep theirs."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "_attn_implementation", None) != "sdpa":
        return False
    if not inner._can_set_attn_implementation():  # a model class not written on the AttentionInterface
        return False
    inner.set_attn_implementation(register())
    return inner.config._attn_implementation == NAME
