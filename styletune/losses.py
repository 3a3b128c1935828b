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

from .architectures import architecture_of

IGNORE_INDEX = -100



class LossBuffers:
    """The chunked loss's (chunk, vocab) work buffers, kept from one call to the next: fp32 logits,
    their log-softmax (which becomes the gradient in place), and the low-precision product under
    autocast. Fresh 100 MB tensors per call cost a CPU as much as the arithmetic: in a SmolLM2
    training step (batch 8 x 256, one EPYC core) a log-softmax into a freshly allocated buffer
    took 50-300 ms, 19 ms into one already in use (page faults)."""

    def __init__(self):
        self._held: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
        held = self._held.get(name)
        if held is None or held.shape[0] < rows or held.shape[1] != cols or held.dtype != dtype or held.device != device:
            held = self._held[name] = torch.empty(rows, cols, dtype=dtype, device=device)
        return held


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``,
    computed ``chunk`` rows at a time; gradients are made during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, buffers: LossBuffers | None = None):
        n, vocab = hidden.shape[0], weight.shape[0]
        valid_all = targets != IGNORE_INDEX
        count = valid_all.sum().clamp(min=1).to(torch.float32)
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Two fp32 (chunk, vocab) buffers, reused by every chunk (and, given ``buffers``, every call):
        # the logits and their log-softmax, which becomes the gradient in place.
        buffers = buffers or LossBuffers()
        rows = min(chunk, n)
        logits_buf = buffers.get("logits", rows, vocab, torch.float32, hidden.device)
        logp_buf = buffers.get("logp", rows, vocab, torch.float32, hidden.device)
        # The head's product runs in the autocast (or the hidden states') dtype, as the model's own head
        # would, on a copy of the weight cast once here: autocast caches only the casts of weights that
        # need gradients, so a frozen head (LoRA) would be cast again by every chunk's product and
        # gradient (a 49152x576 matrix: ~8 casts per micro-batch of 2048 rows).
        autocast = torch.is_autocast_enabled(hidden.device.type)
        low = torch.get_autocast_dtype(hidden.device.type) if autocast else hidden.dtype
        weight_low = weight.detach().to(low)
        bias_low = None if bias is None else bias.detach().to(low)
        # In low precision the product goes to a third buffer, which then holds the gradient cast down
        # for its own product.
        low_buf = None if low == torch.float32 else buffers.get("low", rows, vocab, low, hidden.device)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]
            m = h.shape[0]
            safe_t = targets[s:s + chunk].clamp(min=0)[:, None]
            invalid = ~valid_all[s:s + chunk]
            logits = logits_buf[:m]
            product = logits if low_buf is None else low_buf[:m]
            with torch.autocast(hidden.device.type, enabled=False):
                torch.mm(h.to(low), weight_low.t(), out=product)
            if bias_low is not None:
                product += bias_low
            if low_buf is not None:
                logits.copy_(product)  # the loss is fp32
            logp = torch.log_softmax(logits, dim=-1, out=logp_buf[:m])
            total -= logp.gather(1, safe_t)[:, 0].masked_fill(invalid, 0.0).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot, zero on ignored rows; in place.
            g = logp.exp_()
            g[torch.arange(m, device=g.device), safe_t[:, 0]] -= 1.0
            if invalid.any():  # a full pass over g, so only when some row is ignored
                g[invalid] = 0.0
            if need_h:
                # In the product's dtype (bf16 under autocast, as autocast's own backward would be),
                # accumulated in fp32 inside the matrix product.
                g_low = g if low_buf is None else low_buf[:m].copy_(g)
                grad_h[s:s + chunk] = (g_low @ weight_low).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.t(), h.float())
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
        return out[0], out[1], out[2], None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                          chunk: int = 512, buffers: LossBuffers | None = None) -> torch.Tensor:
    """Mean next-token loss for flattened ``hidden`` (N, d) and ``targets`` (N,)."""
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk, buffers)


def _hf_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_chunked_loss(model) -> bool:
    inner = _hf_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    # type() rather than isinstance: a peft LoRA layer on the head is not a plain Linear.
    arch = architecture_of(inner)
    return (arch is not None and arch.plain_head and head is not None
            and type(head) is torch.nn.Linear and inner.base_model is not inner)


def causal_lm_loss(model, input_ids: torch.Tensor, chunked: bool | None = None,
                   buffers: LossBuffers | None = None) -> torch.Tensor:
    """Mean next-token loss of ``input_ids`` (B, T) under ``model``, every position a target.

    ``chunked=None`` uses the chunked head + loss where the model allows it; ``buffers`` keeps its
    work buffers for the next call.
    """
    if chunked is None:
        chunked = supports_chunked_loss(model)
    if not chunked:
        return model(input_ids=input_ids, labels=input_ids).loss
    inner = _hf_model(model)
    hidden = inner.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    d = hidden.shape[-1]
    return chunked_cross_entropy(hidden[:, :-1].reshape(-1, d), inner.get_output_embeddings(),
                                 input_ids[:, 1:].reshape(-1), buffers=buffers)


class LossOf(torch.nn.Module):
    """``model``'s mean next-token loss as a module: what DDP wraps, so that the forward the loop
    calls is the wrapper's (which prepares its gradient all-reduce), not the inner model's. It
    keeps the chunked loss's work buffers from one micro-batch to the next."""

    def __init__(self, model, chunked: bool | None = None):
        super().__init__()
        self.model = model
        self.chunked = chunked
        self.buffers = LossBuffers()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model, input_ids, self.chunked, self.buffers)
