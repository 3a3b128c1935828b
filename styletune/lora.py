"""A leaner forward for peft's LoRA layers in training.

peft computes a LoRA layer as ``result + lora_B(lora_A(dropout(x))) * scaling``.
On a CPU two parts of that cost more than the low-rank products themselves
(measured on SmolLM2-135M, batch 8 x 256, one thread; bench/README.md):

- Dropout. ``nn.Dropout`` draws one Bernoulli number per input element (about
  6.5 ns each with torch's CPU generator), and a LoRA model has a dropout on the
  input of every adapted matrix: ~300 M draws per step, ~2.4 s of an ~18 s step.
  :func:`sparse_dropout` draws only the positions that are dropped, as gaps
  between them (a geometric distribution), so at p = 0.05 it draws ~20x fewer
  numbers. The mask has exactly nn.Dropout's distribution: independent
  Bernoulli(p) drops, kept values scaled by 1 / (1 - p).
- The low-rank update is written three times (``lora_B`` output, ``* scaling``,
  ``result +``) over a tokens x out_features tensor. Here it is one in-place
  ``addmm_`` into the base layer's output: 0.95 ms against 6.3 ms for a
  576 -> 1536 projection at 2048 tokens.

Everything else (the base layer, ``lora_A``/``lora_B``, their weights, saving
and loading) stays peft's. Layers in any other state (adapters disabled or
merged, several active adapters, DoRA and other variants, mixed-batch
``adapter_names``) go through peft's own forward.
"""

from __future__ import annotations

import math
import types

import torch

# Above this rate drawing every element is cheaper than drawing the gaps between drops.
SPARSE_DROPOUT_MAX_P = 0.2
# Draw this many standard deviations more gaps than the expected number of drops: the
# chance that a tensor has more drops than were drawn is below 1e-15.
_SIGMAS = 8


def sparse_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p, training=True)`` drawing only the dropped positions.

    Positions are the partial sums of independent Geometric(p) gaps, which is exactly
    the set of successes of independent Bernoulli(p) trials. Uses torch's generator, so
    ``torch.manual_seed`` and saved RNG states reproduce the masks (compiled or not).
    """
    if p <= 0.0:
        return x
    n = x.numel()
    draws = math.ceil(n * p + _SIGMAS * math.sqrt(n * p * (1 - p)) + 16)
    gaps = torch.empty(draws, dtype=torch.int64, device=x.device).geometric_(p)
    dropped = gaps.cumsum_(0).sub_(1).clamp_(max=n)  # index n: past the end, a spare slot
    mask = torch.full((n + 1,), 1.0 / (1.0 - p), dtype=x.dtype, device=x.device)
    mask.index_fill_(0, dropped, 0.0)
    return x * mask[:n].view_as(x)


def _dropout(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    module = layer.lora_dropout[adapter]
    if not isinstance(module, torch.nn.Dropout):  # nn.Identity when lora_dropout = 0
        return module(x)
    if module.training and 0.0 < module.p <= SPARSE_DROPOUT_MAX_P and x.device.type == "cpu":
        return sparse_dropout(x, module.p)
    return module(x)


def _is_vanilla(layer, args, kwargs) -> bool:
    active = layer.active_adapters
    return (not args and not kwargs and not layer.disable_adapters and not layer.merged
            and len(active) == 1 and active[0] in layer.lora_A and active[0] not in layer.lora_variant
            and layer.lora_B[active[0]].bias is None)


def _base_product(base, x2d: torch.Tensor) -> torch.Tensor:
    """The base layer on a (tokens, in) input, as a fresh (tokens, out) tensor that is not a view
    (an in-place update of a view would make autograd copy the whole gradient in backward)."""
    if type(base) is torch.nn.Linear:
        return torch.nn.functional.linear(x2d, base.weight, base.bias)
    # transformers' Conv1D (GPT-2): weight is (in, out)
    return torch.addmm(base.bias, x2d, base.weight) if base.bias is not None else x2d @ base.weight


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not _is_vanilla(self, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    adapter = self.active_adapters[0]
    a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight  # (r, in), (out, r)
    x2d = x.reshape(-1, x.shape[-1])
    result = _base_product(self.get_base_layer(), x2d)
    h = torch.nn.functional.linear(_dropout(self, adapter, self._cast_input_dtype(x2d, a.dtype)), a)
    # In place: a linear layer's backward needs its input and weight, never its output.
    # Explicit casts, because autocast does not cover in-place products.
    result.addmm_(h.to(result.dtype), b.t().to(result.dtype), alpha=self.scaling[adapter])
    return result.view(*x.shape[:-1], result.shape[-1])


def lean_lora(model) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` whose base is a plain linear layer (torch's
    ``nn.Linear`` or transformers' GPT-2 ``Conv1D``) the lean forward; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.pytorch_utils import Conv1D

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.get_base_layer()) in (torch.nn.Linear, Conv1D):
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
