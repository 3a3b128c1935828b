"""Next-token loss without materialising the whole batch's logits.

A causal LM's loss goes through a (tokens x vocabulary) logit matrix: for SmolLM2
at batch 8 x 256 that is 2048 x 49152 floats, 400 MB in fp32, written once by the
head, read and written again by log-softmax, and twice more in backward. The
chunked loss here computes the head and the cross-entropy a few hundred rows at a
time and produces the gradient of the hidden states (and of the head's weight, if
it is trained) in the same pass, so only one chunk of logits ever exists. The
result is the same loss and the same gradients as ``model(input_ids, labels=...)``
up to floating-point summation order (tests/test_losses.py checks both).

Used for the model families whose forward is exactly ``lm_head(final hidden
states)``; anything else (logit soft-capping, logit scaling, a LoRA-wrapped head)
falls back to transformers' own loss.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

# Model types whose CausalLM forward is `lm_head(base_model(...).last_hidden_state)`
# with a plain nn.Linear head, checked against transformers 5.x sources.
PLAIN_HEAD_TYPES = frozenset({"llama", "gpt2", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2",
                              "smollm3", "gpt_neox", "gptj", "gpt_bigcode", "stablelm", "starcoder2"})


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``,
    computed ``chunk`` rows at a time; gradients are made during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        n = hidden.shape[0]
        valid_all = targets != IGNORE_INDEX
        count = valid_all.sum().clamp(min=1).to(torch.float32)
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]
            t = targets[s:s + chunk]
            valid = valid_all[s:s + chunk]
            safe_t = t.clamp(min=0)
            # Under autocast the matmul runs in bf16, like the model's own head; the loss is fp32.
            logits = torch.nn.functional.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_t[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot, zero on ignored rows; in place.
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t), device=g.device), safe_t] -= 1.0
            g *= valid[:, None]
            g_low = g.to(h.dtype) if h.dtype != torch.float32 else g
            if need_h:
                grad_h[s:s + chunk] = (g_low @ weight.to(g_low.dtype)).to(hidden.dtype)
            if need_w:
                grad_w += g.t() @ h.float()
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(*(x / count if x is not None else torch.empty(0) for x in (grad_h, grad_w, grad_b)))
        ctx.needs = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        out = []
        for x, need, dtype in zip(saved, ctx.needs, ctx.dtypes):
            out.append((x * grad_out).to(dtype) if need else None)
        return out[0], out[1], out[2], None, None


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                          chunk: int = 512) -> torch.Tensor:
    """Mean next-token loss for flattened ``hidden`` (N, d) and ``targets`` (N,)."""
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)


def _hf_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_chunked_loss(model) -> bool:
    inner = _hf_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    # type() rather than isinstance: a peft LoRA layer on the head is not a plain Linear.
    return (getattr(inner.config, "model_type", None) in PLAIN_HEAD_TYPES and head is not None
            and type(head) is torch.nn.Linear and inner.base_model is not inner)


def causal_lm_loss(model, input_ids: torch.Tensor, chunked: bool | None = None) -> torch.Tensor:
    """Mean next-token loss of ``input_ids`` (B, T) under ``model``, every position a target.

    ``chunked=None`` uses the chunked head + loss where the model allows it.
    """
    if chunked is None:
        chunked = supports_chunked_loss(model)
    if not chunked:
        return model(input_ids=input_ids, labels=input_ids).loss
    inner = _hf_model(model)
    hidden = inner.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    d = hidden.shape[-1]
    return chunked_cross_entropy(hidden[:, :-1].reshape(-1, d), inner.get_output_embeddings(),
                                 input_ids[:, 1:].reshape(-1))
