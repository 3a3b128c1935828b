"""A leaner forward for peft's LoRA layers in training.

peft computes a LoRA layer as ``result + lora_B(lora_A(dropout(x))) * scaling``:
five autograd nodes, a Bernoulli mask and a dropped copy of the input per
adapted matrix. On a CPU the parts around the low-rank products cost more than
the products themselves (measured on SmolLM2-135M, batch 8 x 256, one thread;
bench/README.md). Here the whole layer is one autograd function,
:class:`_LoraLinear`:

- Dropout draws only the positions it drops (:func:`dropped_positions`), as
  gaps between them (a geometric distribution), not one Bernoulli number per
  element (about 6.5 ns each with torch's CPU generator; ~300 M per step for
  SmolLM2, ~2.4 s of an ~18 s step). At p = 0.05 that is ~20x fewer numbers, with
  exactly nn.Dropout's distribution: independent Bernoulli(p) drops, kept values
  scaled by 1 / (1 - p). No mask tensor is made: the input is scaled and the drawn
  positions zeroed, and backward zeroes the same positions of the gradient (~0.7
  GB less memory per step than a mask per layer).
- The low-rank update is added into the base product with one in-place
  ``addmm_`` instead of being written three times (``lora_B`` output,
  ``* scaling``, ``result +``): 0.95 ms against 6.3 ms for a 576 -> 1536
  projection at 2048 tokens. Its input gradient goes into the base's.

The weights stay peft's modules and parameters, so saving and loading are
unchanged. Layers in any other state (adapters disabled or merged, several
active adapters, DoRA and other variants, mixed-batch ``adapter_names``, a LoRA
bias) go through peft's own forward.

For inference, :func:`merge_keeping_updates` merges the adapters as peft does and
keeps each merged layer's update in its low-rank form beside it, for the decode
step (:mod:`styletune.decoding.fast`) to read the base weights in a compact
format that only they fit.
"""

from __future__ import annotations

import math
import types

import torch

# Draw this many standard deviations more gaps than the expected number of drops: the
# chance that a tensor has more drops than were drawn is below 1e-15.
_SIGMAS = 8


def dropped_positions(n: int, p: float, device=None) -> torch.Tensor:
    """Flat positions (increasing) that a dropout of rate ``p`` drops from ``n`` elements.

    They are the partial sums of independent Geometric(p) gaps: exactly the successes of
    ``n`` independent Bernoulli(p) trials, ``nn.Dropout``'s distribution. A fixed number of
    gaps is drawn (the expectation + 8 sigma), so the result has a fixed length; entries
    equal to ``n`` are spares that drop nothing. Uses torch's generator, so
    ``torch.manual_seed`` and saved RNG states reproduce the masks, compiled or not.
    """
    draws = math.ceil(n * p + _SIGMAS * math.sqrt(n * p * (1 - p)) + 16)
    gaps = torch.empty(draws, dtype=torch.int64, device=device).geometric_(p)
    return gaps.cumsum_(0).sub_(1).clamp_(max=n)


@torch.library.custom_op("styletune::addmm_into", mutates_args=("out",))
def _addmm_into(out: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, alpha: float) -> None:
    """``out += alpha * m1 @ m2`` in place. An op of its own so that torch.compile keeps it in
    place: it turns ``Tensor.addmm_`` into an out-of-place ``addmm`` that first copies ``out``
    (~0.4 s of a compiled SmolLM2 step, 2048 tokens, went to such copies)."""
    out.addmm_(m1, m2, alpha=alpha)


class _LoraLinear(torch.autograd.Function):
    """``base(x) + scaling * dropout(x) @ A.T @ B.T`` on a 2-D ``x``, with one autograd node.

    The dropout is ``x * c`` (``c = 1 / (1 - p)``) with the dropped positions then set to
    zero: no mask tensor is built or read, and backward zeroes the same positions of the
    update's input gradient. The low-rank update is added into the base product in place,
    and the update's input gradient into the base's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, p: float, conv1d: bool):
        # conv1d: transformers' GPT-2 Conv1D, weight stored (in, out)
        if conv1d:
            y = torch.addmm(bias, x, weight) if bias is not None else x @ weight
        else:
            y = torch.nn.functional.linear(x, weight, bias)
        pos = None
        if p > 0.0:
            pos = dropped_positions(x.numel(), p, x.device)
            xd = _scaled_with_zeros(x, 1.0 / (1.0 - p), pos)
        else:
            xd = x
        h = xd @ a.t()  # (tokens, r)
        _addmm_into(y, h, b.t(), scaling)
        ctx.save_for_backward(x, xd, weight, a, b, h, pos)
        ctx.args = (scaling, p, conv1d, bias is not None and bias.requires_grad)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, xd, weight, a, b, h, pos = ctx.saved_tensors
        scaling, p, conv1d, need_bias = ctx.args
        need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
        gh = (gy @ b).mul_(scaling)  # (tokens, r)
        gx = gw = None
        if need_x:
            gx = gy @ (weight.t() if conv1d else weight)
            if pos is None:
                _addmm_into(gx, gh, a, 1.0)
            else:
                gx += _scaled_with_zeros(gh @ a, 1.0 / (1.0 - p), pos)
        if need_w:
            gw = x.t() @ gy if conv1d else gy.t() @ x
        ga = gh.t() @ xd if need_a else None
        gb = (gy.t() @ h).mul_(scaling) if need_b else None
        return gx, gw, gy.sum(0) if need_bias else None, ga, gb, None, None, None


def _scaled_with_zeros(x: torch.Tensor, c: float, pos: torch.Tensor) -> torch.Tensor:
    """``x * c`` with the flat positions ``pos`` zeroed (positions equal to ``x.numel()`` are spares)."""
    n = x.numel()
    flat = torch.empty(n + 1, dtype=x.dtype, device=x.device)  # one spare slot at the end
    torch.mul(x.reshape(-1), c, out=flat[:n])
    flat.index_fill_(0, pos, 0.0)
    return flat[:n].view_as(x)


def _is_vanilla(layer, args, kwargs) -> bool:
    active = layer.active_adapters
    return (not args and not kwargs and not layer.disable_adapters and not layer.merged
            and len(active) == 1 and active[0] in layer.lora_A and active[0] not in layer.lora_variant
            and layer.lora_B[active[0]].bias is None)


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not _is_vanilla(self, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    adapter = self.active_adapters[0]
    base = self.get_base_layer()
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    # One dtype for every operand: autocast's, when it is on (it does not reach inside the
    # Function), else the input's.
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    cast = [t.to(dtype) if t is not None and t.dtype != dtype else t
            for t in (x.reshape(-1, x.shape[-1]), base.weight, base.bias,
                      self.lora_A[adapter].weight, self.lora_B[adapter].weight)]
    with torch.autocast(device, enabled=False):
        y = _LoraLinear.apply(*cast, self.scaling[adapter], p, type(base) is not torch.nn.Linear)
    return y.view(*x.shape[:-1], y.shape[-1])


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


# The attribute :func:`merge_keeping_updates` sets on each layer it merged an update into:
# ``(a, b)``, ``a`` (r, in) and ``b`` (out, r) with LoRA's scaling folded in, so that the layer's
# weight, as an (out, in) matrix, is its base weight plus ``b @ a``.
LOW_RANK_UPDATE = "styletune_low_rank_update"


def merge_keeping_updates(model):
    """peft's ``merge_and_unload`` (the plain model, every adapter merged into its base layer), with
    the update merged into each plain LoRA layer (those :func:`lean_lora` takes) kept on the merged
    layer as :data:`LOW_RANK_UPDATE`.

    The merged weights are what every forward uses. The update is for the decode step: a base
    dequantised from a 4-bit GGUF (the bundled SmolLM2) is on a 4-bit grid that the merged weights
    are off, and the step reads such a layer as its base in int4, losslessly, plus the update in low
    rank (:func:`styletune.decoding.fast._splitting_low_rank`). It costs r x (in + out) numbers a layer.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    updates = []
    for module in model.modules():
        if type(module) is LoraLinear and _is_vanilla(module, (), {}):
            adapter = module.active_adapters[0]
            a = module.lora_A[adapter].weight.detach()
            b = module.lora_B[adapter].weight.detach() * module.scaling[adapter]
            updates.append((module.get_base_layer(), (a, b)))
    merged = model.merge_and_unload()
    for layer, update in updates:
        setattr(layer, LOW_RANK_UPDATE, update)
    return merged
