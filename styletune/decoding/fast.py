"""A lean decode step for Llama-architecture models (SmolLM2, Llama, ...) and GPT-2.

At batch 1 a 135M model spends most of each token in per-operation overhead, not
arithmetic: transformers' generic forward builds masks, walks hooks and output
wrappers, and grows its KV cache with a ``torch.cat`` per layer per token.  This
module runs the same arithmetic on the same weight tensors (shared, not copied)
with a preallocated KV cache and nothing else, so greedy decoding gives the same
tokens as transformers (tested).  The prompt itself still goes through the
transformers model in one pass; its cache is copied in once.

The decoders (KV cache, slots, batching, masks, packed and int8 weights) are shared; what differs
between architectures is the arithmetic of one layer, in a small class per architecture
(:class:`_Llama`: RMSNorm, rotary positions, grouped-query attention, SwiGLU; :class:`_GPT2`:
learned positions, LayerNorm, one fused QKV projection, GELU, biases everywhere).

Batches of ``PACK_MIN_ROWS`` (4) rows or more, in fp32 on CPU, use a copy of the
weights packed once by MKL for that batch size: the plain product re-packs each
weight on every call, which at 8 rows costs more than the arithmetic (8 prompts
at once went from ~3.5x to ~5x the tokens/s of one prompt here). The copy costs
the model's size in memory again, and is rebuilt when the weights change.

``quantize="int8"`` stores weight-only int8 copies and fuses q/k/v and gate/up into single
matrices (GPT-2's are fused already): about 4x less memory traffic per token than fp32, at the price
of exact parity. Where styletune's int kernels run (:func:`_int8`), the copies are llama.cpp's Q8_0
(one fp16 scale per group of 32 inputs) read by styletune's int8 kernel; elsewhere, and in a
compiled step, one scale per output row (``torch._weight_int8pack_mm``: the int8 rounding changes
logits by ~1%). ``quantize="int8-dynamic"`` also quantises the
activations, per token, so that the products run as int8 x int8 (``torch._int_mm``):
faster again, and less exact (measured on SmolLM2: perplexity +2.4% against +0.4%
for ``int8``; see the README's performance section).

``quantize="int4"`` stores group-wise int4 copies (``INT4_GROUP`` inputs per scale and offset,
``torch._weight_int4pack_mm_for_cpu``): half the bytes of int8 again, lossy for weights that were
trained in floating point. ``quantize="fp16"`` stores fp16 copies for FBGEMM's fp16 GEMM (fp16
weights, fp32 activations): half the bytes of fp32, and nothing lost but the weights' rounding.
``quantize="auto"`` (the command line's default) is the fastest format within 1% of exact perplexity
(:func:`auto_format`). It takes int4 for matrices already on a 4-bit grid (a model dequantised from a
Q4 GGUF, as the bundled SmolLM2 is: nothing lost but float rounding). Where the kernel step runs
styletune's int kernels, it takes llama.cpp's Q8_0 for every other matrix in steps of at most
``FEW_ROWS`` rows (perplexity within 0.1% of exact on the bench's models, top-1 agreement ~98%), where
the products wait on memory and Q8_0 reads half fp16's bytes, and fp16 in larger steps (int8 for a
matrix on Q8_0's own grid), where the integer multiply-adds cost more; elsewhere fp16. Where torch's
CPU kernels run at AVX2 only and styletune's int kernels do not run (a bf16 model, no compiler),
PyTorch's int kernels are slower than fp16, and it takes fp16 throughout. A LoRA run's merged weights
are off the grid its base is on: the formats that store grid matrices in int4 read each adapted matrix as its base in
int4 plus the LoRA update in low rank (:class:`_Int4LowRank`), the update kept beside the merged
weights when the run was loaded, in decode steps of up to ``FEW_ROWS`` rows (beyond, the
merged weights are faster).

Every format but exact runs the step's work between its products (norms, rotation, the KV cache
write, attention, the SwiGLU gate; for GPT-2, LayerNorm, attention and the tanh GELU) in styletune's
own C kernels (:mod:`.kernels`, :class:`_KernelStep`): four calls a layer where PyTorch makes about
35 operations (15 for GPT-2), each costing more to dispatch than to compute at one token per row.
Where those kernels are built with AVX-512 VNNI or AVX2 (:func:`_int_kernels`), the kernel step also
runs the int4 products and, for ``auto``, the output head on Q8_0's 8-bit grid (:class:`_Int8Grid`;
``--quantize int8``: every matrix, quantised to that grid) in styletune's own integer kernels: the
input quantised to int8 per group of 32 in two passes (the second, the first's remainder: about 15
bits, finer than the bf16 input of PyTorch's int4 kernel), multiply-adds of 64 int8 pairs an
instruction (AVX2: 32 in two), over 3x PyTorch's int4 kernel on a matrix in cache, and bound by
memory once the weights stream (the bench's ``decode_floor_b1``). On a 2-core AMD EPYC with AVX2
only, one thread, one row, the bundled model's products cycled through memory: the 210 int4 layer
matrices in 4.1 ms against PyTorch's int4 kernel's 17.2 ms and FBGEMM fp16's 9.0 ms, the int8 head
in 1.3-1.5 ms against fp16's 3.2 ms; at eight rows 35 ms against fp16's 31 ms (there the products
wait on the integer multiplies; a whole decode step of eight rows is about as fast as fp16's). The
exact step stays on PyTorch's operations, transformers' own arithmetic, token for token.
"""

from __future__ import annotations

import copy
import threading
import weakref

import torch
import torch.nn.functional as F

from ..architectures import architecture_of
from ..config import check_quantize
from ..errors import StyletuneError


def supports(model) -> bool:
    """Models whose forward the lean step reproduces exactly: a plain (not peft-wrapped) model of an
    architecture with ``fast_decode`` whose config uses only options implemented here."""
    arch = architecture_of(model)
    if arch is None or not arch.fast_decode or not hasattr(model, "lm_head") or hasattr(model, "get_base_model"):
        return False
    family = _FAMILIES.get(arch.model_type)
    return family is not None and getattr(model.lm_head, "bias", None) is None and family.supports(model)


def _family(model) -> type:
    return _FAMILIES[architecture_of(model).model_type]


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per output row: (int8 (out, in) contiguous, scale (out,))."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale


# Every projection below takes its weight as (out, in), as nn.Linear stores it (for GPT-2's Conv1D,
# whose weight is (in, out), a transposed view of it), and an optional bias (out,). Each returns its
# product in the dtype its kernel computes in (bf16 for the int8 and int4 kernels): the step casts only
# where it needs to (adding into the residual stream casts for free). Inputs are (rows, in): the step
# keeps its activations two-dimensional, so no projection reshapes.

class _Int8Linear:
    """Weight-only int8 with one scale per output row: y = (x @ Wq^T) * scale (+ bias).

    The activations go through the kernel in bf16: on CPU its bf16 path is the fast one
    (measured here for a 576x1536 matrix: ~60 us with bf16 inputs, ~1 ms with fp32 inputs,
    ~140 us for the fp32 matrix product it replaces).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, scale = _int8_rows(weight)
        self.scale = scale.to(torch.bfloat16)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale)
        return y if self.bias is None else y + self.bias


class _Int8DynamicLinear:
    """int8 weights (one scale per output row) times int8 activations (one scale per
    token, computed on the fly): ``y = (xq @ Wq^T) * x_scale * w_scale (+ bias)``, the product in
    ``torch._int_mm`` (oneDNN's s8s8 kernel, VNNI where the CPU has it).

    Measured here for the 49152x576 output head at batch 1: ~1.1 ms, against ~3.6 ms for
    the weight-only kernel above and ~9 ms for fp32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        # Kept (out, in) row-major and used through its transpose: _int_mm's fastest layout here.
        self.weight, self.scale = _int8_rows(weight)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.float()
        x_scale = torch.linalg.vector_norm(x2, float("inf"), dim=-1, keepdim=True).clamp_(min=1e-8).div_(127.0)
        xq = torch.div(x2, x_scale).round_().to(torch.int8)
        y = torch.mul(torch._int_mm(xq, self.weight.t()), x_scale * self.scale)  # int32 * fp32 -> fp32
        return y if self.bias is None else y + self.bias


# Group-wise int4: every run of ``INT4_GROUP`` consecutive inputs of a row has its own scale and
# offset, w = (q - 8) * scale + zero with q in 0..15 (torch's CPU int4 kernel's convention, as in
# torchao's int4 weight-only layout). 32 is llama.cpp's Q4_0/Q4_1 block.
INT4_GROUP = 32


def _per_input(t: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group figures (out, in/group) repeated for each input (out, in). The arithmetic of the codes
    below runs on such full-size operands: broadcast against a trailing dimension of one, PyTorch's CPU
    loops are several times slower (a division of GPT-2's 3072x768 groups by their scales: 6.9 ms
    against 1.3 for a product with full-size reciprocals)."""
    return t.repeat_interleave(group, dim=-1)


def _group_max(t: torch.Tensor, group: int) -> torch.Tensor:
    """The largest magnitude in each group of ``group`` inputs of ``t`` (out, in): (out, in/group). (As
    the larger of max and -min: ``abs().amax`` took 4.9 ms where this took 1.2 on GPT-2's 3072x768.)"""
    g = t.reshape(t.shape[0], -1, group)
    return torch.maximum(g.amax(-1), g.amin(-1).neg_())


_SLICE = 1 << 16  # numbers in one slice of ``_in_slices``


def _in_slices(codes):
    """``codes(weight, ...)`` computed over slices of ``_SLICE`` of the weight's numbers, its outputs (per
    row) joined. A temporary of a whole matrix is a fresh allocation that the CPU faults in page by page
    (one element-wise operation over GPT-2's 50257x768 head: 120-130 ms; a product of two 1365x768
    matrices into a new tensor 1.27 ms, into an existing one 0.31 ms); slices this small are reused
    by the allocator."""
    def sliced(weight: torch.Tensor, *args, **kwargs):
        step = max(1, _SLICE // weight.shape[1])
        if weight.shape[0] <= step:
            return codes(weight, *args, **kwargs)
        parts = [codes(weight[i:i + step], *args, **kwargs) for i in range(0, weight.shape[0], step)]
        return tuple(torch.cat(p) for p in zip(*parts))
    return sliced


@_in_slices
def _int4_groups(weight: torch.Tensor, group: int = INT4_GROUP):
    """Asymmetric 4-bit codes per group of ``group`` inputs: (q int32 (out, in) in 0..15, scale and
    zero (out, in/group) fp32, the largest reconstruction error of each group in units of its scale)."""
    w = weight.detach().float()
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    lo_in, scale_in = _per_input(lo, group), _per_input(scale, group)
    q = torch.round((w - lo_in).div_(scale_in)).clamp_(0, 15)
    err = _group_max(q.mul(scale_in).add_(lo_in).sub_(w), group).div_(scale)
    return q.to(torch.int32), scale, lo + 8 * scale, err


def int4_fits(weight: torch.Tensor) -> bool:
    """Whether the int4 kernel takes this (out, in) matrix: whole groups along the input."""
    return weight.shape[-1] % INT4_GROUP == 0


# A matrix is on a 4-bit grid when every group's values are q * scale + offset to within this
# fraction of its step (fp32 rounding leaves ~1e-6; weights not on a grid miss by up to 0.5).
_ON_GRID = 1e-3


def _grid_groups(weight: torch.Tensor):
    """The int4 codes, scales and offsets of a matrix that is on a 4-bit grid (see
    :func:`on_int4_grid`), or None for one that is not."""
    return _on_grid(weight, _int4_groups)


def _on_grid(weight: torch.Tensor, groups):
    """``groups(weight)`` without its last part (each group's largest error in units of its scale) where
    every group of ``INT4_GROUP`` inputs is on the grid that ``groups`` reads, else None."""
    if not int4_fits(weight):
        return None
    if float(groups(weight[:16])[-1].max()) > _ON_GRID:  # most matrices are off: a few rows tell
        return None
    *codes, err = groups(weight)  # (in slices: the temporaries stay small)
    return None if float(err.max()) > _ON_GRID else tuple(codes)


def on_int4_grid(weight: torch.Tensor) -> bool:
    """True when int4 storage loses nothing but float rounding: the matrix holds at most 16 evenly
    spaced values per group of ``INT4_GROUP`` inputs, as the weights of a model dequantised from a
    Q4_0/Q4_1 GGUF (the bundled SmolLM2) do."""
    return _grid_groups(weight) is not None


class _Int4Linear:
    """Weight-only int4, group-wise (``INT4_GROUP`` inputs share a bf16 scale and offset), through
    ``torch._weight_int4pack_mm_for_cpu`` with bf16 activations, as ``_Int8Linear``.

    Measured here (1 thread, one row): 30 us for a 1536x576 matrix against 37 us int8 and 60 us fp32;
    ~0.9 ms for SmolLM2's 49152x576 output head against 1.6 ms int8 and 7.7 ms fp32. The kernel takes
    a multiple of 16 output rows: others are padded with zero rows and cut off the result.

    Where styletune's int kernels are built (:func:`_int_kernels`), the same codes are also kept in their
    layout (``packed``, :func:`_pack_int4`, fp16 scales and centers), and the kernel step reads that
    copy: measured on a 2-core AMD EPYC, one thread, one row, a matrix in cache, 3072x576 in 29 us (23 with
    one pass of int8 input) against PyTorch's 97 us. PyTorch's copy stays for the steps that cannot
    call a C function (``--compile``'s package, GPT-2's and bf16 models' PyTorch step): about 66 MB more
    for the bundled model.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, groups=None):
        n = weight.shape[0]
        self.rows = n
        self.on_grid = groups is not None  # the matrix's own grid: nothing lost
        q, scale, zero = groups if groups is not None else _int4_groups(weight)[:3]
        pad = -n % 16
        if pad:  # rows whose outputs are cut off: any codes do
            q, scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (q, scale, zero))
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # (in/group, out, 2): the layout the kernel reads
        self.scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)
        self.bias = bias
        # the same codes laid out for styletune's int4 kernel, which the kernel step calls
        self.packed = _pack_int4(q, scale, zero) if _int_copy(weight) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, INT4_GROUP, self.scale_zero)
        if y.shape[-1] != self.rows:
            y = y[:, :self.rows]
        return y if self.bias is None else y + self.bias


# Passes of int8 activation codes in styletune's int products: one (llama.cpp's Q8 activations) moved the
# bundled model's perplexity on the tests' passage by +1.1%, two (the first's remainder quantised again:
# about 15 bits) by less than 0.01%, at about 4% more time a token at one row, where the products wait on
# memory, and twice the products' time at eight rows, where they wait on the multiply-adds.
INT_PASSES = 2


def _int_kernels():
    """styletune's int4 and int8 products (``st_q4_mm``, ``st_q8_mm`` in kernels.c), or None where the
    kernels are off or not built, or built for a CPU with neither AVX-512 VNNI nor AVX2 (then PyTorch's
    int4 kernel and FBGEMM's fp16 run)."""
    from . import kernels

    lib = kernels.library()
    return lib if lib is not None and lib.st_int_products() else None


def _int_copy(weight: torch.Tensor) -> bool:
    """Whether a matrix gets a copy for styletune's int kernels: one of an fp32 model on CPU (the kernel step's
    models), where the kernels are built with their int products."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and _int_kernels() is not None


def _pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """int4 codes q (out, in) in 0..15 with their group scales and centers (out, in/32), w = (q - 8) *
    scale + zero, in the layout of ``st_q4_mm``: (codes uint8 (out/16, in/8, 64), where byte 4i + e of
    load c holds inputs 8c + e (low nibble) and 8c + 4 + e (high nibble) of row i of the block; scales
    and centers fp16 (out/16, in/32, 2, 16))."""
    n, k = q.shape
    g = k // INT4_GROUP
    q = q.to(torch.uint8).view(n // 16, 16, k // 8, 2, 4)
    codes = (q[..., 0, :] | (q[..., 1, :] << 4)).permute(0, 2, 1, 3).contiguous()
    sc = torch.stack([t.reshape(n // 16, 16, g).transpose(1, 2) for t in (scale, zero)], dim=2)
    return codes, sc.to(torch.float16).contiguous()


@_in_slices
def _int8_groups(weight: torch.Tensor, group: int = INT4_GROUP, fp16_scales: bool = False):
    """Symmetric 8-bit codes per group of ``group`` inputs, as Q8_0's: (q int8 (out, in) in -127..127,
    scale (out, in/group) = max|w| / 127, the largest reconstruction error of each group in units of
    its scale). ``fp16_scales``: the scales rounded to fp16 (as Q8_0 stores them) before the codes are
    taken, so each code is the nearest to its weight for the scale stored."""
    w = weight.detach().float()
    scale = _group_max(w, group) / 127
    if fp16_scales:
        scale = scale.half().float()
    safe = scale.clamp(min=1e-30)
    scale_in = _per_input(safe, group)
    q = torch.round(w / scale_in).clamp_(-127, 127)  # (a scale rounded down can put a code at 128)
    err = _group_max(q.mul(_per_input(scale, group)).sub_(w), group).div_(safe)
    return q.to(torch.int8), scale, err


def _int8_grid(weight: torch.Tensor):
    """(codes int8 (out, in) in -127..127, scales (out, in/32)) for a matrix on Q8_0's grid (every group of
    32 inputs is q * scale with scale = max|w| / 127: the weights of a model dequantised from a Q8_0 GGUF,
    as the bundled SmolLM2's tied embedding), or None for one that is not."""
    return _on_grid(weight, _int8_groups) if weight.dim() == 2 else None


def _pack_int8(q: torch.Tensor, scale: torch.Tensor):
    """int8 codes (out, in) and group scales (out, in/32) in the layout of ``st_q8_mm``: (codes + 128 as
    uint8 (out/16, in/4, 64), byte 4i + e of load c holding input 4c + e of row i of the block; scales
    fp16 (out/16, in/32, 16))."""
    n, k = q.shape
    codes = (q.to(torch.int16) + 128).to(torch.uint8).view(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return codes, scale.reshape(n // 16, 16, -1).transpose(1, 2).to(torch.float16).contiguous()


def _int_scratch(rows: int, n_in: int) -> torch.Tensor:
    """The scratch ``st_q4_mm``/``st_q8_mm`` take: the input's int8 codes and per-group figures."""
    return torch.empty(4 * (5 * rows * n_in // INT4_GROUP + n_in) + 2 * rows * n_in, dtype=torch.uint8)


class _Int8Grid:
    """A matrix on Q8_0's 8-bit grid (:func:`_int8_grid`) in int8 with fp16 group scales, nothing lost but
    the scales' rounding (to the fp16 they were in the GGUF), through styletune's int8 kernel
    (``st_q8_mm``) with the input quantised to int8 per group of 32 (``INT_PASSES`` times), as llama.cpp
    computes a Q8_0 product (once). Built only where that kernel is (:func:`_int_kernels`): AVX-512 VNNI
    or AVX2.

    SmolLM2's 49152x576 output head, the largest matrix of the bundled model: half fp16's bytes
    (measured on a 2-core AMD EPYC, one thread, one row, one pass: 1.48 ms against FBGEMM fp16's 2.79 ms).

    The kernel reads blocks of 16 rows: a matrix of other row counts (GPT-2's 50257-token head) is
    padded with zero rows, whose outputs are cut off."""

    def __init__(self, grid, bias: torch.Tensor | None = None, on_grid: bool = True):
        q, scale = grid
        self.on_grid = on_grid  # the matrix's own grid (False: quantised to it)
        self.rows, self.n_in = q.shape
        pad = -self.rows % 16
        if pad:
            q, scale = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (q, scale))
        self.packed = _pack_int8(q, scale)
        self.bias = bias
        self._product = None  # the kernel step's product function (_int_product), made on first call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._product is None:
            from . import kernels

            self._product = _int_product(self, self, kernels.loaded(), reuse=False)[1]
        return self._product(x.float().contiguous())


class _Int4LowRank:
    """A tuned layer whose base weights are on the 4-bit grid: the base through the int4 kernel
    (``base``, an :class:`_Int4Linear`: nothing lost but float rounding), plus the LoRA update merged
    into the layer, in its low-rank form, in the model's dtype: ``y = base(x) + (x @ a.T) @ b.T``, the
    merged layer's product.

    A LoRA run of the bundled SmolLM2 has merged weights off the grid, so ``--quantize auto`` would
    read them in fp16, at twice int4's bytes; this reads the base in int4 and two products of rank r.
    """

    def __init__(self, base: _Int4Linear, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
        self.base = base
        self.a_t = a.detach().t().to(dtype).contiguous()  # (in, r)
        self.b_t = b.detach().t().to(dtype).contiguous()  # (r, out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # in place into the base's output (the kernel's, or its copy in the model's dtype)
        y = _cast(self.base(x), self.a_t.dtype)
        return y.addmm_(torch.mm(_cast(x, self.a_t.dtype), self.a_t), self.b_t)


def _splitting_low_rank(Proj, split: bool):  # noqa: N803 - a constructor, as the step's others
    """``Proj`` taking the modules whose weights ``weight`` is (``parts``, in the order it joins them),
    for the LoRA updates merged into them (:func:`_low_rank`). Where ``split`` (a format with int4 for
    matrices on the 4-bit grid) and the weight minus the update is on the grid, the projection is
    :class:`_Int4LowRank`; any other is ``Proj`` of the weight as it is."""
    def make(weight: torch.Tensor, bias: torch.Tensor | None = None, parts=()):
        low_rank = _low_rank(parts) if split else None  # (not built where it would not be used)
        if low_rank is not None:
            a, b = low_rank
            base = weight.detach().float() - b.float() @ a.float()
            groups = _grid_groups(base)
            if groups is not None:
                return _Int4LowRank(_Int4Linear(base, bias, groups), a, b, weight.dtype)
        return Proj(weight, bias)
    return make


def _has_low_rank(model) -> bool:
    """Whether any layer of ``model`` keeps a merged LoRA update (:func:`_low_rank`)."""
    from ..lora import LOW_RANK_UPDATE

    return any(hasattr(m, LOW_RANK_UPDATE) for m in model.modules())


def _low_rank(modules):
    """The LoRA updates merged into ``modules`` (:data:`styletune.lora.LOW_RANK_UPDATE`), joined as
    the update of their weights concatenated along the outputs, as the step fuses them: ``(a, b)``
    with ``b @ a`` that update ((out, in), zero for a module without one), or None where none has one."""
    from ..lora import LOW_RANK_UPDATE

    updates = [getattr(m, LOW_RANK_UPDATE, None) for m in modules]
    if all(u is None for u in updates):
        return None
    # outputs per module: nn.Linear's weight is (out, in), GPT-2's Conv1D's (in, out)
    outs = [m.weight.shape[0] if isinstance(m, torch.nn.Linear) else m.weight.shape[1] for m in modules]
    a = torch.cat([u[0].float() for u in updates if u is not None])
    b = a.new_zeros(sum(outs), a.shape[0])
    row = col = 0
    for u, n in zip(updates, outs):
        if u is not None:
            r = u[0].shape[0]
            b[row:row + n, col:col + r] = u[1]
            col += r
        row += n
    return a, b


def _int4(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``--quantize int4``: int4 where the kernel takes the matrix, else int8."""
    return (_Int4Linear if int4_fits(weight) else _Int8Linear)(weight, bias)


def _lossless_int4(weight: torch.Tensor, bias: torch.Tensor | None = None, other=None):
    """``"int4-grid"`` (``--quantize auto`` with ``--compile`` or without FBGEMM): int4 for a matrix
    already on a 4-bit grid (nothing lost but float rounding), ``other`` for any other: weight-only
    int8 by default (perplexity within ~0.5% of exact, measured by ``make bench``)."""
    groups = _grid_groups(weight)
    return (other or _Int8Linear)(weight, bias) if groups is None else _Int4Linear(weight, bias, groups)


def _int4_grid_fp16(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``--quantize auto`` (``"int4-fp16"``, :func:`auto_format`): int4 on the 4-bit grid, fp16 (or int8
    on Q8_0's grid) for the rest, so nothing is lost but float rounding. There fp16 reads a matrix as
    fast as int8 at one row and the output head faster (measured on a 2-core AMD EPYC with avx512_bf16,
    one thread, matrices cycled through memory: 3072x576 129 us fp16, 128 us int8, 73 us int4; SmolLM2's
    49152x576 head 1.73 ms fp16, 1.99 ms int8; at eight rows the head 2.63 ms fp16, 4.09 ms int8)."""
    return _lossless_int4(weight, bias, other=_int8_grid_fp16)


def _int8(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``--quantize int8``: llama.cpp's Q8_0 format (int8 codes, one fp16 scale per group of 32 inputs, the
    format ``styletune export`` writes by default) through styletune's int8 kernel (:class:`_Int8Grid`),
    where that kernel is built and the matrix fits its groups (inputs a multiple of 32); elsewhere
    PyTorch's weight-only int8, one scale per output row (:class:`_Int8Linear`). The scales are rounded
    to fp16 before the codes are taken (llama.cpp takes them against the unrounded scale), so each code
    is the nearest to its weight for the scale stored."""
    if not (_int_copy(weight) and int4_fits(weight)):
        return _Int8Linear(weight, bias)
    q, scale, _ = _int8_groups(weight, fp16_scales=True)
    return _Int8Grid((q, scale), bias, on_grid=False)


def _int8_grid_fp16(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``--quantize auto`` for a matrix off the 4-bit grid: int8 (:class:`_Int8Grid`) for one on Q8_0's
    grid where styletune's int8 kernel is built, else fp16."""
    grid = _int8_grid(weight) if _int_copy(weight) else None
    return _Fp16Linear(weight, bias) if grid is None else _Int8Grid(grid, bias)


def _q8(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``--quantize auto`` in decode steps of few rows, for a matrix off the 4-bit grid: Q8_0 in styletune's
    int8 kernel (:class:`_Int8Grid`), its own grid kept where it is on Q8_0's, else quantised as
    ``--quantize int8`` does (:func:`_int8`); fp16 for a matrix that kernel does not take."""
    if not (_int_copy(weight) and int4_fits(weight)):
        return _Fp16Linear(weight, bias)
    grid = _int8_grid(weight)
    return _int8(weight, bias) if grid is None else _Int8Grid(grid, bias)


def _int4_grid_q8(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``--quantize auto`` in decode steps of at most ``FEW_ROWS`` rows where the kernel step runs styletune's
    int products (``"int4-q8"``, :func:`auto_format`): int4 on the 4-bit grid, Q8_0 (:func:`_q8`) for the
    rest. At one row the products wait on memory, and Q8_0 reads half fp16's bytes (measured on a 2-core
    AMD EPYC with AVX2 only, one thread, every product of a step cycled through memory: GPT-2 small's
    6.8 ms against FBGEMM fp16's 15.3, SmolLM2's 12.3 against 21.4); at two rows 12.0 against 16.7 and
    25.0 against 24.4; from three rows on the integer multiply-adds cost more than fp16's (3 rows 19.4-26.7
    against 17.8 and 36.1 against 26.4; 8 rows 45-61 against 32-35 and 50-84 against 46-47)."""
    return _lossless_int4(weight, bias, other=_q8)


class _Fp16Linear:
    """fp16 weights, fp32 activations and fp32 accumulation, through FBGEMM's fp16 GEMM
    (``quantized::linear_dynamic_fp16``, the kernel behind torch.ao's dynamic fp16 ``Linear``): half
    the bytes of fp32, and nothing lost but the weights' rounding to fp16 (~5e-4 relative).

    Where torch's CPU kernels run at AVX2 (no AVX-512), the int8 and int4 weight-only kernels above
    are bound by their dequantisation, not by memory, and this is the fastest of them (measured on a
    2-core AMD EPYC with AVX2 only, one thread, matrices cycled through memory as in a decode step):
    a 3072x576 matrix 245 us against 302 us int4, 336 us int8 and 553 us fp32; SmolLM2's 49152x576
    head 3.8 ms against 4.2, 5.3 and 8.3 ms.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if not has_fp16_kernel():
            raise StyletuneError("--quantize fp16 needs PyTorch's FBGEMM kernels (an x86-64 CPU build of torch)")
        self.packed = torch.ops.quantized.linear_prepack_fp16(
            weight.detach().float().contiguous(), None if bias is None else bias.detach().float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(_cast(x, torch.float32), self.packed)


def has_fp16_kernel() -> bool:
    """FBGEMM, and with it the fp16 GEMM, is in torch's x86-64 CPU builds."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def auto_format(compile: bool = False, model=None, rows: int | None = None) -> str:
    """What ``--quantize auto`` stores on this machine (for ``model``, where given, in decode steps of
    ``rows`` rows): the fastest format within 1% of exact perplexity (``make bench``'s ``quant_quality``
    rows). Where the kernel step runs styletune's int products for ``model`` and a step has at most
    ``FEW_ROWS`` rows: ``"int4-q8"``, int4 for matrices already on a 4-bit grid and llama.cpp's Q8_0 for the
    rest (:func:`_int4_grid_q8`). Otherwise it keeps nothing but float rounding from exact where the model
    allows: ``"int4-fp16"``, int4 on the 4-bit grid and fp16 (or int8 on Q8_0's grid,
    :func:`_int8_grid_fp16`) for the rest, on AVX-512 CPUs
    and wherever the kernel step runs styletune's int products (:func:`_int_products_step`: on AVX2
    too); ``"fp16"`` throughout where torch's CPU kernels run at AVX2 and PyTorch's int4 kernel would
    run (slower than FBGEMM's fp16 there, see :class:`_Fp16Linear`). A torch without FBGEMM takes
    ``"int4-grid"``, int8 in place of fp16 (perplexity within 1% of exact, ``make bench``'s
    ``quant_quality`` rows). A compiled step (``compile``) takes ``"int4-grid-fp16-head"``: the layers
    as ``"int4-grid"`` (FBGEMM's packed weights are not tensors, and AOTInductor cannot take them as
    inputs), the output head as ``"int4-fp16"`` stores it, an fp16 one run after the package."""
    if not has_fp16_kernel():
        return "int4-grid"
    if compile:
        return "int4-grid-fp16-head"
    ints = model is not None and _int_products_step(model)
    if ints and rows is not None and rows <= FEW_ROWS:
        return "int4-q8"
    if torch.backends.cpu.get_cpu_capability() != "AVX2" or ints:
        return "int4-fp16"
    return "fp16"


def _int_products_step(model) -> bool:
    """Whether the kernel step (:class:`_KernelStep`) runs styletune's int products for ``model``: a model
    of a family it has kernels for (a Llama, a GPT-2 with the tanh GELU) in fp32 on CPU, with the kernels
    built for a CPU with AVX2 or AVX-512 VNNI (:func:`_int_kernels`)."""
    family = _FAMILIES.get(getattr(architecture_of(model), "model_type", None))
    return (family is not None and family.supports(model) and family.kernel_step(model)
            and model.dtype == torch.float32 and model.device.type == "cpu" and _int_kernels() is not None)


_QUANTIZED = {"int8": _int8, "int8-rows": _Int8Linear, "int8-dynamic": _Int8DynamicLinear, "int4": _int4,
              "int4-grid": _lossless_int4, "int4-fp16": _int4_grid_fp16, "int4-q8": _int4_grid_q8,
              "fp16": _Fp16Linear,
              "int4-grid-fp16-head": _lossless_int4}  # its head: as "int4-fp16" (_derived_weights)

# Formats that store a matrix on the 4-bit grid in int4 (``--quantize int4`` any matrix).
_GRID_FORMATS = ("int4", "int4-grid", "int4-fp16", "int4-q8", "int4-grid-fp16-head")

# A decode step of at most this many rows reads a LoRA run's adapted matrices as the base in int4 plus
# the update (:class:`_Int4LowRank`); one of more rows reads the merged weights, as the format stores
# any matrix off the grid (a SlotDecoder of more slots holds both copies and picks per step).
# Measured on a 2-core AMD EPYC with avx512_bf16 (the demo run, ``generate``, 64 greedy tokens,
# medians of three interleaved calls), tokens/s split against fp16: 1.06x at 1 row, 1.15x at 2, 0.99x
# at 4, 0.85x at 8 on one thread; 1.07x, 1.11x, 0.96x and 0.79x on two. (The base model's own int4
# stays ahead of fp16 at 8 rows: 1.02x and 1.05x.) ``auto`` reads matrices off the grid as Q8_0 in steps
# of as many rows, as fp16 in larger ones (:func:`_int4_grid_q8`).
FEW_ROWS = 2


class _Dense:
    """The model's own tensors. With a bias this is the ``addmm`` GPT-2's Conv1D runs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _PackedDense:
    """An fp32 weight repacked once by MKL for products with exactly ``rows`` rows
    (``cblas_sgemm_pack``, the layout torch.compile's CPU freezing pass uses too).

    At 4 to 16 rows the plain product re-packs the weight on every call; packed once, the
    30 layers and the head of SmolLM2 take about 60-80 ms per decode step at 8 rows instead
    of 100-120 ms (measured here, 1 thread). The same arithmetic in another order: logits
    agree with the plain product to ~1e-5.
    """

    def __init__(self, weight: torch.Tensor, rows: int, bias: torch.Tensor | None = None):
        self.weight, self.rows, self.bias = weight, rows, bias
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().contiguous(), rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # With any other number of rows the op falls back to the plain product on ``weight``.
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)


# Batches of at least this many rows decode through MKL-packed weights. The products of one
# SmolLM2 decode step, plain vs packed, measured here: 43 vs 48 ms at 1 row, 46 vs 46 at 2,
# 56 vs 64 at 3, 80 vs 55 at 4, 100 vs 80 at 8, 116 vs 84 at 16.
PACK_MIN_ROWS = 4


def can_pack(model) -> bool:
    """fp32 CPU weights and a torch built with MKL's packed GEMM."""
    return (model.device.type == "cpu" and model.dtype == torch.float32 and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear"))


class _DenseInOut:
    """A product with the weight stored (in, out) row-major, ``x @ W``: the faster layout for a wide
    output head at one to three rows here (GPT-2's 49152x768 head at batch 1, fp32, 1 thread: 8.8 ms
    against 13.8 ms for nn.Linear's (out, in)); at 8 rows it is the slower one (41 vs 31 ms)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach().t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight)


def can_relayout(model) -> bool:
    """fp32 CPU weights, where the relaid-out copies were measured to be faster."""
    return model.device.type == "cpu" and model.dtype == torch.float32


# Derived copies (int8, packed) are made once per model and kept while its weights are
# unchanged: a second of work for 135M parameters, not to be repeated per call. Keyed by the
# model; each entry records the version counters of the weights it was made from, so weights
# changed in place (an optimizer step, a loaded state dict) are never served stale.
_DERIVED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_DERIVED_LOCK = threading.Lock()  # the server runs one scheduler thread per model, over one cache


def _signature(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def _weights(model, quantize: str | None, rows: int = 1, pack: bool = True):
    with _DERIVED_LOCK:
        return _derived_weights(model, quantize, rows, pack)


def _derived_weights(model, quantize: str | None, rows: int, pack: bool):
    """Per-layer projections and the output head: dense views of the model's own tensors,
    MKL-packed copies (fp32 batches of ``PACK_MIN_ROWS`` rows or more, when ``pack``) or
    int8 copies. Which projections a layer has is the architecture's (its ``weights``)."""
    split = quantize in _GRID_FORMATS and rows <= FEW_ROWS and _has_low_rank(model)
    if quantize:
        kind = f"{quantize}+low-rank" if split else quantize
        if _int_kernels():  # copies for styletune's int kernels too (STYLETUNE_KERNELS=0 derives its own)
            kind += "+int-kernels"
    elif pack and rows >= PACK_MIN_ROWS and can_pack(model):
        kind = ("packed", rows)
    elif _family(model).relayout and can_relayout(model):
        kind = "relayout"
    else:
        kind = None
    entries = _DERIVED.setdefault(model, {})
    sig = _signature(model) if kind else None
    if kind in entries and entries[kind][0] == sig:
        return entries[kind][1]
    # auto's formats for few and many rows differ only in the matrices off both grids: where the other's
    # copies hold none (the bundled model's base), they are this one's too, not built twice
    twin = {"int4-q8": "int4-fp16", "int4-fp16": "int4-q8"}.get(quantize)
    if twin and not split:
        other = entries.get(kind.replace(quantize, twin, 1))
        if other is not None and other[0] == sig and _on_grids(other[1]):
            entries[kind] = other
            return other[1]
    # Drop what is about to be replaced before building, so two copies never coexist: a stale
    # entry of this kind, and any other fp32 copy (one per model: packed for its latest batch size,
    # or relaid out).
    def fp32_copy(k):
        return isinstance(k, tuple) or k == "relayout"

    for k in [k for k in entries if k == kind or (fp32_copy(k) and fp32_copy(kind))]:
        del entries[k]
    if kind is None:
        Proj = _Dense
    elif kind == "relayout":
        def Proj(w, bias=None):  # noqa: N802 - a constructor like the others
            return _Dense(w.detach().contiguous(), bias)
    elif quantize:
        Proj = _QUANTIZED[quantize]
    else:
        def Proj(w, bias=None):  # noqa: N802 - a constructor like the others
            return _PackedDense(w, rows, bias)
    # A layer tuned by LoRA (its update merged, kept in low rank) over a base on the 4-bit grid: the
    # formats that store such matrices in int4 take the base in int4 and the update as it is, in
    # decode steps of few rows.
    Proj = _splitting_low_rank(Proj, split=split)  # noqa: N806
    # int8 copies fuse the projections that read the same input into one matrix each
    layers = _family(model).weights(model, Proj, fused=bool(quantize))
    # the compiled step's auto: the head as auto stores it eagerly (fp16 off the 4-bit grid, run after the package)
    Head = {"relayout": _DenseInOut, "int4-grid-fp16-head": _int4_grid_fp16}.get(quantize or kind, Proj)  # noqa: N806
    weights = layers, Head(model.lm_head.weight)
    if kind:
        entries[kind] = (sig, weights)
    return weights


def _on_grids(weights) -> bool:
    """Whether every projection of ``weights`` (layers, head) holds a matrix on its own grid, int4's or
    Q8_0's: nothing of it lost."""
    layers, head = weights
    projections = [p for L in layers for p in L.values() if not isinstance(p, (torch.Tensor, tuple))]
    return all(getattr(p, "on_grid", False) for p in [*projections, head])


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; a tensor already in it is returned as it is, without dispatching a no-op
    ``to`` (the step would otherwise make a few hundred such calls per token)."""
    return t if t.dtype == dtype else t.to(dtype)


# ---------------------------------------------------------------------------------------------
# The arithmetic of one layer, per architecture. Each class reads its config and the tensors that
# are not projections (norms, embeddings, position tables) once per decoder, and gives the decoder:
# ``n_heads``, ``n_kv``, ``head_dim``, ``scales`` (the attention scale of each layer, or None where ``qkv``
# applies it), ``positions``
# (the most positions the model can encode, or None), ``embed(ids, pos) -> (x, ctx)``,
# ``qkv(layer, x, ctx)`` (B, heads + 2 kv heads, head_dim): the q, k and v heads of the token, in x's
# dtype, normalised and rotated (q already multiplied by the attention scale where ``scales[i]`` is None),
# ``mlp(layer, x)`` (the residual branch, its norm included) and ``final(x)`` (the last norm).
# ``weights(model, Proj, fused)`` builds the per-layer projections (``o`` is the attention output,
# shared code); the head, ``lm_head`` in every family, is built beside them.


class _Llama:
    """RMSNorm, rotary positions, grouped-query attention, SwiGLU; no biases."""

    positions = None  # the rotary table is computed for every position of the cache
    relayout = False  # the model's own (out, in) tensors, shared

    @staticmethod
    def supports(model) -> bool:
        cfg = model.config
        rope = getattr(cfg, "rope_scaling", None) or {}
        return (getattr(cfg, "hidden_act", "silu") == "silu" and not getattr(cfg, "attention_bias", False)
                and not getattr(cfg, "mlp_bias", False) and rope.get("rope_type", "default") == "default"
                and getattr(cfg, "pretraining_tp", 1) == 1)

    @staticmethod
    def kernel_step(model) -> bool:
        """Whether :class:`_KernelStep` has this model's arithmetic: every Llama this step supports."""
        return True

    @staticmethod
    def weights(model, Proj, fused: bool):
        layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            entry = {"ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight}
            if fused:
                qkv, gate_up = (a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)
                entry["qkv"] = Proj(torch.cat([p.weight for p in qkv]), parts=qkv)
                entry["o"] = Proj(a.o_proj.weight, parts=[a.o_proj])
                entry["gate_up"] = Proj(torch.cat([p.weight for p in gate_up]), parts=gate_up)
                entry["down"] = Proj(m.down_proj.weight, parts=[m.down_proj])
            else:
                entry.update(q=Proj(a.q_proj.weight), k=Proj(a.k_proj.weight), v=Proj(a.v_proj.weight),
                             o=Proj(a.o_proj.weight), gate=Proj(m.gate_proj.weight), up=Proj(m.up_proj.weight),
                             down=Proj(m.down_proj.weight))
            layers.append(entry)
        return layers

    def __init__(self, model, max_len: int):
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        dtype, device = model.dtype, model.device
        # The residual stream and the norms' weights are in the model's dtype, on its device.
        self.one_call_rms = dtype == torch.float32 and device.type == "cpu"
        inner = model.model
        self.norm = inner.norm.weight
        self.embed_weight = inner.embed_tokens.weight
        # RoPE table for every position, computed as transformers does (fp32 products, then cos/sin).
        rotary = inner.rotary_emb
        inv_freq = rotary.inv_freq.float().to(device)
        freqs = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_len, head_dim)
        scale = getattr(rotary, "attention_scaling", 1.0)
        self.cos = (emb.cos() * scale).to(dtype)
        # rotate_half(x) * sin == flip(x's two halves) * sin_signed, with the first half's sign folded
        # into the table: the same arithmetic in fewer operations.
        half = self.head_dim // 2
        sin = (emb.sin() * scale).to(dtype)
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        # The q, k and v heads of a token are rotated together, as the rows of one (heads, head_dim)
        # tensor: per row, cos * a + b and sin * a, with a = the attention scale for q (folded in
        # here, so attention does not scale again), 1 for k and 0 for v, and b = 1 for v only
        # (v * 1 + flip(v) * 0 is v exactly).
        rows = self.n_heads + 2 * self.n_kv
        self.row_a = torch.tensor([self.head_dim ** -0.5] * self.n_heads + [1.0] * self.n_kv + [0.0] * self.n_kv,
                                  dtype=dtype, device=device)[:, None]
        self.row_b = (torch.arange(rows, device=device) >= self.n_heads + self.n_kv).to(dtype)[:, None]
        self.scales = [None] * cfg.num_hidden_layers

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' LlamaRMSNorm (in fp32, then back to x's dtype). In fp32 on CPU torch's
        ``rms_norm`` does the same arithmetic in one call (the same bits; ~14 us against ~18 us a call
        here, and the step makes one per layer and sublayer); GPUs have a fused kernel of their own,
        whose rounding is not the written-out formula's."""
        if self.one_call_rms:
            return F.rms_norm(x, weight.shape, weight, self.eps)
        h = _cast(x, torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * _cast(h, x.dtype)

    def embed(self, input_ids, pos):
        c, s = self.cos[pos][:, None, :], self.sin_signed[pos][:, None, :]  # (B, 1, hd)
        halves = (pos.shape[0], -1, 2, self.head_dim // 2)
        rope = torch.addcmul(self.row_b, c, self.row_a).view(halves), (s * self.row_a).view(halves)
        return F.embedding(input_ids, self.embed_weight), rope  # (B, C)

    def qkv(self, L, x, rope):
        b, hd = x.shape[0], self.head_dim
        h = self._rms(x, L["ln1"])
        if "qkv" in L:
            r = _cast(L["qkv"](h), x.dtype)
        else:
            r = torch.cat([L["q"](h), L["k"](h), L["v"](h)], dim=-1)
        r = r.view(b, -1, 2, hd // 2)  # (B, heads, the two halves of each head)
        cos, sin = rope
        # transformers' ``x * cos + rotate_half(x) * sin``
        return torch.addcmul(r * cos, r.flip(2), sin).view(b, -1, hd)

    def mlp(self, L, x):
        h = self._rms(x, L["ln2"])
        if "gate_up" in L:
            gate, up = L["gate_up"](h).chunk(2, dim=-1)
            # the product in x's dtype, rounded once for the next kernel (as with separate projections)
            return L["down"](F.silu(_cast(gate, x.dtype)) * up)
        return L["down"](F.silu(L["gate"](h)) * L["up"](h))

    def final(self, x):
        return self._rms(x, self.norm)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# GPT-2's ``activation_function`` values, as torch's fused kernels. "gelu_new" (GPT-2's own) and
# "gelu_fast" write out the tanh approximation in several operations; torch's kernel computes the same
# formula in one (results agree to float rounding, ~1e-7 relative). The kernel step has the tanh one
# (``st_gelu_tanh``).
_GPT2_ACTIVATIONS = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class _GPT2:
    """Learned absolute positions, pre-LayerNorm, one fused QKV ``Conv1D`` (its weight is (in, out),
    used here through a transposed view), multi-head attention, a GELU MLP, biases everywhere, and
    the head tied to the token embedding.

    In fp32 on CPU below ``PACK_MIN_ROWS`` rows the step runs on relaid-out copies (``relayout``):
    the projections as (out, in) row-major, the head as (in, out). Measured at batch 1, 1 thread, on
    GPT-2 small's 48 projections: 30 ms per token against 41 ms on the Conv1D (in, out) tensors, and
    8.8 against 13.8 ms for the head. The copies cost the model's size in memory again, are made once
    per model and rebuilt when its weights change; ``can_relayout`` False keeps the shared tensors."""

    relayout = True

    @staticmethod
    def supports(model) -> bool:
        cfg = model.config
        # Not implemented here: the eager-only "reorder and upcast" attention, cross-attention, other
        # activations. Such configs decode through transformers' forward.
        return (hasattr(model, "transformer") and hasattr(model.transformer, "wpe")
                and not getattr(cfg, "reorder_and_upcast_attn", False)
                and not getattr(cfg, "add_cross_attention", False)
                and getattr(cfg, "activation_function", "gelu_new") in _GPT2_ACTIVATIONS)

    @staticmethod
    def kernel_step(model) -> bool:
        """Whether :class:`_KernelStep` has this model's activation (the tanh GELU)."""
        return _GPT2_ACTIVATIONS.get(getattr(model.config, "activation_function", "gelu_new")) is _gelu_tanh

    @staticmethod
    def weights(model, Proj, fused: bool):
        layers = []
        for block in model.transformer.h:
            a, m = block.attn, block.mlp
            layers.append({
                "ln1": (block.ln_1.weight, block.ln_1.bias), "ln2": (block.ln_2.weight, block.ln_2.bias),
                # (the copies quantise (out, in) rows: faster from a contiguous matrix than through the view)
                **{key: Proj(c.weight.t().contiguous() if fused else c.weight.t(), c.bias, parts=[c])
                   for key, c in (("qkv", a.c_attn), ("o", a.c_proj), ("fc", m.c_fc), ("proj", m.c_proj))}})
        return layers

    def __init__(self, model, max_len: int):
        cfg = model.config
        self.n_heads = self.n_kv = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.eps = cfg.layer_norm_epsilon
        scale = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        self.scales = [scale / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else scale
                       for i in range(cfg.n_layer)]
        self.positions = cfg.n_positions
        self.act = _GPT2_ACTIVATIONS[cfg.activation_function]
        t = model.transformer
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)

    def _ln(self, x, wb):
        return F.layer_norm(x, (x.shape[-1],), wb[0], wb[1], self.eps)

    def embed(self, input_ids, pos):
        return F.embedding(input_ids, self.wte) + F.embedding(pos, self.wpe), None  # (B, C)

    def qkv(self, L, x, ctx):
        return _cast(L["qkv"](self._ln(x, L["ln1"])), x.dtype).view(x.shape[0], 3 * self.n_heads, self.head_dim)

    def mlp(self, L, x):
        return L["proj"](self.act(L["fc"](self._ln(x, L["ln2"]))))

    def final(self, x):
        return self._ln(x, self.ln_f)


_FAMILIES = {"llama": _Llama, "gpt2": _GPT2}


# Cache lengths are rounded up to this, so that compiled decode steps see few distinct shapes.
COMPILE_BUCKET = 256


class FastDecoder:
    """Decode one token per row per call, with a static KV cache.

    Every tensor the step touches has a fixed shape (the cache holds ``max_len``
    positions and a mask says which are filled), so the step can be compiled once
    and reused for every token.

    Args:
        model: a ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` (see :func:`supports`), already on its
            device and dtype.
        batch: rows decoded together.
        max_len: prompt width + new tokens; the cache is allocated for this many positions (at most
            the model's positions, for GPT-2's learned ones).
        quantize: ``None`` (exact), ``"auto"``, ``"fp16"``, ``"int4"``, ``"int8"`` or ``"int8-dynamic"``
            (the ``--quantize`` values; see the module's docstring). ``auto`` is resolved for this
            machine (:func:`auto_format`); :attr:`quantize` says what it became.
        compile: run the step compiled ahead of time by AOTInductor (:mod:`.compiled`; the
            element-wise work between the products fused, no Python per token), built once per
            shape and kept on disk; ``torch.compile`` where that fails.
    """

    def __init__(self, model, batch: int, max_len: int, quantize: str | None = None, compile: bool = False):
        quantize = check_quantize(quantize, compile)
        if quantize and model.device.type != "cpu":
            quantize = None  # the int8 kernels used here are the CPU ones
        if quantize == "auto":
            quantize = auto_format(compile, model, rows=batch)
        if quantize == "int8" and compile:
            quantize = "int8-rows"  # a compiled step takes tensors only, not styletune's kernel (_int8)
        self.quantize = quantize  # the storage used: ``auto`` (and ``int8`` compiled) resolved for this machine
        if not supports(model):
            raise StyletuneError(f"the lean decode step does not support this model ({type(model).__name__})")
        requested = max_len
        if compile:
            # One position to spare: the compiled step attends to a prefix of the cache whose length
            # varies, and export cannot take a prefix as long as the whole buffer.
            max_len = -(-(max_len + 1) // COMPILE_BUCKET) * COMPILE_BUCKET
        self.arch = arch = _family(model)(model, max_len)
        if arch.positions is not None and requested > arch.positions:
            raise StyletuneError(f"{requested} positions asked for; the model has {arch.positions}")
        # Positions the step may fill: the cache's, and no more than the model can encode (a compiled
        # step's cache, rounded up, may hold more; those are never written).
        usable = max_len - 1 if compile else max_len
        self.limit = usable if arch.positions is None else min(usable, arch.positions)
        self.n_heads, self.n_kv, self.head_dim = arch.n_heads, arch.n_kv, arch.head_dim
        dtype, device = model.dtype, model.device
        self.device = device
        # Inductor cannot lower the packed op outside its own freezing pass: compiled steps use
        # the plain product.
        self.layers, self.head = _weights(model, quantize, batch, pack=not compile)
        self.packed = isinstance(self.head, _PackedDense)
        # One buffer per layer holds its keys and values, (2, batch, kv heads, max_len, head_dim), so that
        # a token's k and v heads are written in one copy; ``k[i]`` and ``v[i]`` are its two halves.
        shape = (2, batch, self.n_kv, max_len, self.head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.k = [t[0] for t in self.kv]
        self.v = [t[1] for t in self.kv]
        self.mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=device)  # filled positions
        self.max_len = max_len
        self.length = 0
        self.compiled = compile
        self._kernels = None if compile else _KernelStep.build(self, model)
        if compile:
            from .compiled import compile_step

            self._forward = compile_step(self, lambda: _compiled_step(self))
        else:
            self._forward = self._step

    def load_cache(self, cache) -> None:
        """Copy a transformers cache (after the prompt pass) into the static buffers."""
        for i, layer in enumerate(cache.layers):
            t = layer.keys.shape[2]
            self.k[i][:, :, :t] = layer.keys
            self.v[i][:, :, :t] = layer.values
        self.length = cache.layers[0].keys.shape[2]

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One new token per row: ``input_ids`` (B, 1), ``attention_mask`` (B, length + 1).
        Returns float32 logits (B, vocab)."""
        t = self.length
        if t >= self.limit:
            raise StyletuneError(f"the decode cache holds {self.limit} positions; all are used")
        pos = (attention_mask.long().sum(-1) - 1).clamp(min=0)  # (B,) position of the new token
        where = torch.tensor([t], device=input_ids.device)
        if self.compiled:
            # Fixed shapes: the whole cache, with a mask of the filled (and unpadded) positions.
            self.mask[:, 0, 0, :t + 1] = attention_mask.bool()
            logits = self._forward(input_ids, pos, where, self.mask, None)
        else:
            # Eager: only the filled positions, and a mask only when some row has padding.
            mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
            logits = self._forward(input_ids, pos, where, mask, t + 1)
        self.length = t + 1
        return logits

    def _step(self, input_ids, pos, where, mask, upto: int | None, slots: torch.Tensor | None = None,
              rows: slice | None = None) -> torch.Tensor:
        """The arithmetic of one token: embedding, layers, head (the architecture's own parts in
        ``self.arch``). ``upto``: attend to the first ``upto`` cache positions (None: all of them, for
        fixed shapes). Row b is the sequence in cache slot b, or in ``slots[b]`` (continuous batching;
        ``rows``, the same slots as a slice where they are consecutive). ``where``: the one position
        every row writes at; None: row b writes at ``pos[b]``."""
        if self._kernels is not None:  # (never for a compiled step, whose shapes are fixed: upto None)
            return self._kernels(self.layers, self.head, input_ids, pos, where, mask, upto, slots)
        arch = self.arch
        b, nq, nkv, hd = input_ids.shape[0], self.n_heads, self.n_kv, self.head_dim
        x, ctx = arch.embed(input_ids.view(b), pos)  # (B, C)
        blocked = None if mask is None else ~mask  # (B, 1, 1, T): True where a row must not look
        gather = slots is not None and rows is None
        for i, L in enumerate(self.layers):
            r = arch.qkv(L, x, ctx)  # (B, nq + 2 nkv, hd): this token's q, k and v heads
            q, new = r.split([nq, 2 * nkv], dim=1)
            kv = self.kv[i]  # (2, slots, nkv, T, hd)
            mine = kv if rows is None else kv[:, rows]  # these rows' slots, as a view
            if where is not None and not gather:
                mine.index_copy_(3, where, new.view(b, 2, nkv, 1, hd).transpose(0, 1))
            else:  # each row into its own slot and position
                kv[:, slots, :, pos] = new.view(b, 2, nkv, hd)
            if gather:  # a copy: of the filled positions only (a server's slots hold thousands)
                mine = kv[:, slots, :, :upto]
            elif upto is not None:
                mine = mine[:, :, :, :upto]
            keys, values = mine.unbind(0)
            att = _attend(q.view(b, nkv, nq // nkv, hd), keys, values, blocked, arch.scales[i])
            x.add_(L["o"](att.view(b, nq * hd)))  # (in place: x keeps its dtype, whatever o's kernel returns)
            x.add_(arch.mlp(L, x))
        return self.head(arch.final(x)).float()


def _attend(q, keys, values, blocked, scale):
    """One token's attention: ``q`` (B, kv heads, group, hd), the query heads that share each KV head
    (transformers' ``repeat_kv`` order), over ``keys`` and ``values`` (B, kv heads, T, hd), without
    positions where ``blocked`` (B, 1, 1, T) is True. Two products and a softmax: at one query per row
    this is cheaper than torch's fused CPU attention (in profiles of the SmolLM2 step on one thread,
    ~34 us per layer against ~45 us), and needs no transposes of q or the output. The softmax runs in
    fp32, as in transformers' eager attention."""
    s = torch.matmul(q, keys.transpose(-1, -2))  # (B, kv heads, group, T)
    if scale is not None:
        s.mul_(scale)
    if blocked is not None:
        s.masked_fill_(blocked, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32)
    return torch.matmul(_cast(p, values.dtype), values)  # (B, kv heads, group, hd)


_INT4_MM = torch._weight_int4pack_mm_for_cpu  # the bound function: no OpOverloadPacket call in Python
_KERNEL_DTYPES = {torch.float32: 1, torch.bfloat16: 2}  # kernels.c's dtype codes


def _kernel_product(P, lib, reuse: bool = True):  # noqa: N803 - a projection, as the step's others
    """(the dtype code of the input ``P``'s kernel reads, ``P`` as a function of an input in that dtype
    returning an fp32 or bf16 product). An int4 matrix is called without its wrapper (the cast of
    its input, a check of its rows): the step writes its input in bf16 directly. A LoRA-tuned one
    (:class:`_Int4LowRank`) takes its input in fp32 and adds its update in one kernel call after the
    base product (in an A/B on the demo run, 128 greedy tokens, medians of eight: 10.5 against 11.1
    ms a token at one thread with the update as PyTorch operations, 8.3 against 9.0 at two). Where a
    matrix has a copy for styletune's int kernels (``packed``), that copy's product runs instead, from
    fp32 input (:func:`_int_product`)."""
    base = P.base if type(P) is _Int4LowRank else P
    if type(base) in (_Int4Linear, _Int8Grid) and base.packed is not None:
        return _int_product(P, base, lib, reuse)
    if not (type(base) is _Int4Linear and base.bias is None and base.rows % 16 == 0):
        def product(x):
            y = P(x)
            return y if y.dtype in _KERNEL_DTYPES and y.is_contiguous() else y.float().contiguous()

        return 1, product
    weight, scale_zero = base.weight, base.scale_zero
    if base is P:
        return 2, lambda x: _INT4_MM(x, weight, INT4_GROUP, scale_zero)
    a, b = P.a_t, P.b_t  # (in, r) and (r, out), fp32: the kernel step runs fp32 models only
    n_in, rank, n_out = a.shape[0], a.shape[1], b.shape[1]
    scratch = torch.empty(n_in + rank)

    def low_rank(x):  # x in fp32: the update's product reads it as the PyTorch step does
        y = _INT4_MM(x.to(torch.bfloat16), weight, INT4_GROUP, scale_zero)
        out = torch.empty(y.shape)
        lib.st_low_rank(x.data_ptr(), 1, a.data_ptr(), b.data_ptr(), y.data_ptr(), 2, out.data_ptr(), x.shape[0],
                        n_in, rank, n_out, scratch.data_ptr())
        return out

    return 1, low_rank


def _int_product(P, base, lib, reuse: bool):  # noqa: N803 - a projection, as the step's others
    """(1, ``P`` as a function of an fp32 input) through styletune's int4 or int8 kernel; where ``reuse``
    (the layers' products, read before the step calls them again), into an output buffer of its own per
    row count. A bias (GPT-2's) is added to the product; a LoRA-tuned one adds its update after the base
    product, in fp32 (``st_low_rank``)."""
    # n: the rows of the packed copy, padded to whole blocks of 16; the product's rows are the first base.rows
    n_in, n = base.packed[0].shape[1] * (8 if type(base) is _Int4Linear else 4), base.packed[0].shape[0] * 16
    codes, scales = (t.data_ptr() for t in base.packed)
    bias, rows = base.bias, base.rows
    mm = lib.st_q4_mm if type(base) is _Int4Linear else lib.st_q8_mm
    low_rank = P is not base
    if low_rank:
        a, b = P.a_t, P.b_t  # (in, r) and (r, out), fp32: the kernel step runs fp32 models only
        rank, factors = a.shape[1], (a.data_ptr(), b.data_ptr())
        update_scratch = torch.empty(n_in + rank)
    buffers: dict[int, tuple] = {}
    threads = torch.get_num_threads  # PyTorch's setting, which OpenMP's threads in the kernel follow

    def product(x):
        b = x.shape[0]
        bufs = buffers.get(b)
        if bufs is None:
            bufs = (torch.empty(b, n), torch.empty(b, rows) if low_rank else None, _int_scratch(b, n_in))
            if reuse:
                buffers[b] = bufs
        y, out, scratch = bufs
        mm(x.data_ptr(), 1, codes, scales, y.data_ptr(), b, n_in, n, scratch.data_ptr(), threads(), INT_PASSES)
        if rows != n:  # a padded matrix (a head of any vocabulary): its rows, contiguous for the next kernel
            y = y[:, :rows].contiguous()
        if bias is not None:
            y.add_(bias)
        if not low_rank:
            return y
        lib.st_low_rank(x.data_ptr(), 1, *factors, y.data_ptr(), 1, out.data_ptr(), b, n_in, rank, rows,
                        update_scratch.data_ptr())
        return out

    product.holds = P, base  # the tensors behind the addresses above live as long as the function
    return 1, product


class _KernelStep:
    """The step of a decoder whose layers are fused (every ``--quantize`` format), in fp32 on CPU, with
    the work between its products done by styletune's kernels (:mod:`.kernels`): per layer four calls
    into ``kernels.c`` (norm, rotation + cache write + attention, residual add + norm, the MLP's
    activation) and the layer's four products, where the PyTorch step makes about 35 operations
    (Llama) or 15 (GPT-2). Llama: RMSNorm, rotary positions, the SwiGLU gate. GPT-2: LayerNorm, no
    rotation (its positions are added to the embedding), the tanh GELU (``_gelu_tanh``; other
    activations keep the PyTorch step). The arithmetic is the PyTorch step's, to float rounding (sums
    in another order, exp within 2 ulp): tested against it, and against exact, in the tests and the
    bench's perplexity rows.

    Buffers are allocated once per row count and reused every token; the products' inputs are
    written in the dtype each kernel reads (bf16 for PyTorch's int4, fp32 for styletune's int kernels
    and the rest), so no cast runs between them."""

    @staticmethod
    def build(decoder, model):
        """The kernel step for ``decoder``, or None where it does not apply or the kernels are not
        available (then the PyTorch step runs)."""
        if not (decoder.quantize and decoder.arch.kernel_step(model) and model.dtype == torch.float32
                and model.device.type == "cpu"):
            return None
        from . import kernels

        lib = kernels.library()
        return None if lib is None else _KernelStep(decoder, model, lib)

    def __init__(self, decoder, model, lib):
        arch, cfg = decoder.arch, model.config
        self.lib, self.arch = lib, arch
        self.kv = [t.data_ptr() for t in decoder.kv]
        self.slots_total, self.max_len = decoder.kv[0].shape[1], decoder.max_len
        self.shape = (decoder.n_heads, decoder.n_kv, decoder.head_dim)
        self.llama = isinstance(arch, _Llama)
        if self.llama:
            self.hidden, self.inter = cfg.hidden_size, cfg.intermediate_size
            self.norm, self.act, self.mlp = lib.st_add_rms, lib.st_silu_mul, ("gate_up", "down")
            self.rope = (arch.cos.data_ptr(), arch.sin_signed.data_ptr())
            # the attention scale of every layer (folded into q by the rotation)
            self.scales = [decoder.head_dim ** -0.5] * len(decoder.kv)
            self.final_norm = (arch.norm.data_ptr(),)
        else:  # GPT-2: LayerNorm's weight and bias, no rotation, its own scale per layer
            self.hidden, self.inter = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
            self.norm, self.act, self.mlp = lib.st_add_layer_norm, lib.st_gelu_tanh, ("fc", "proj")
            self.rope = (None, None)
            self.scales = arch.scales
            self.final_norm = tuple(t.data_ptr() for t in arch.ln_f)
        n_heads, n_kv, head_dim = self.shape
        group = n_heads // n_kv
        self.scratch = torch.empty(max(2 * self.inter, self.hidden,
                                       (n_heads + 2 * n_kv) * head_dim + group * (self.max_len + head_dim)))
        self._kv = decoder.kv  # the tensors self.kv points into
        self._plans: dict[int, tuple] = {}
        self._buffers: dict[int, dict] = {}

    def _plan(self, layers, head):
        """Per layer: the norms' weights (a tuple: the weight, and LayerNorm's bias), each product with the
        dtype of its input, the attention scale; the head's product."""
        plan = self._plans.get(id(layers))
        if plan is None or plan[0] is not layers or plan[1] is not head:
            def product(P):  # noqa: N803
                return _kernel_product(P, self.lib)

            def norm(w):
                return tuple(t.data_ptr() for t in w) if isinstance(w, tuple) else (w.data_ptr(),)

            up, down = self.mlp
            steps = [(norm(L["ln1"]), *product(L["qkv"]), *product(L["o"]), norm(L["ln2"]), *product(L[up]),
                      *product(L[down]), scale) for L, scale in zip(layers, self.scales)]
            # the head's output is the step's: a new tensor each step
            plan = self._plans[id(layers)] = (layers, head, steps, _kernel_product(head, self.lib, reuse=False))
        return plan[2], plan[3]

    def _rows(self, b: int) -> dict:
        """Buffers for steps of ``b`` rows: each product's input in either dtype, as (tensor, address)."""
        bufs = self._buffers.get(b)
        if bufs is None:
            n_heads, _, head_dim = self.shape
            bufs = {"slots": torch.arange(b)}
            for name, width in (("h", self.hidden), ("att", n_heads * head_dim), ("mid", self.inter)):
                for code, dtype in ((1, torch.float32), (2, torch.bfloat16)):
                    t = torch.empty(b, width, dtype=dtype)
                    bufs[name, code] = (t, t.data_ptr())
            self._buffers[b] = bufs
        return bufs

    def __call__(self, layers, head, input_ids, pos, where, mask, upto: int, slots):
        lib, arch, norm, act = self.lib, self.arch, self.norm, self.act
        b = input_ids.shape[0]
        n_heads, n_kv, head_dim = self.shape
        hidden, eps, scratch = self.hidden, arch.eps, self.scratch.data_ptr()
        plan, (head_code, head) = self._plan(layers, head)
        bufs = self._rows(b)
        slots = bufs["slots"] if slots is None else slots
        if mask is not None:
            mask = mask.contiguous()
        # (B, C): the residual stream, updated in place
        if self.llama:
            x = F.embedding(input_ids.view(b), arch.embed_weight)
        else:
            x = F.embedding(input_ids.view(b), arch.wte).add_(F.embedding(pos, arch.wpe))
        xp, posp, slotp = x.data_ptr(), pos.data_ptr(), slots.data_ptr()
        cos, sin = self.rope
        wpos, wstride = (pos.data_ptr(), 1) if where is None else (where.data_ptr(), 0)
        maskp = None if mask is None else mask.data_ptr()
        add, add_code = None, 0  # the last layer's down product, added by the next norm's call
        for kv, (ln1, qkv_code, qkv, o_code, o, ln2, up_code, up, down_code, down, scale) in zip(self.kv, plan):
            h, hp = bufs["h", qkv_code]
            norm(xp, add, add_code, *ln1, hp, qkv_code, b, hidden, eps, scratch)
            y = qkv(h)
            att, ap = bufs["att", o_code]
            lib.st_rope_attend(y.data_ptr(), _KERNEL_DTYPES[y.dtype], posp, cos, sin, kv, self.slots_total,
                               self.max_len, slotp, wpos, wstride, maskp, upto, ap, o_code,
                               b, n_heads, n_kv, head_dim, scale, scratch)
            y = o(att)
            h, hp = bufs["h", up_code]
            norm(xp, y.data_ptr(), _KERNEL_DTYPES[y.dtype], *ln2, hp, up_code, b, hidden, eps, scratch)
            y = up(h)
            mid, mp = bufs["mid", down_code]
            act(y.data_ptr(), _KERNEL_DTYPES[y.dtype], mp, down_code, b, self.inter, scratch)
            y = down(mid)  # added to the stream by the next norm's call
            add, add_code = y.data_ptr(), _KERNEL_DTYPES[y.dtype]
        h, hp = bufs["h", head_code]
        norm(xp, add, add_code, *self.final_norm, hp, head_code, b, hidden, eps, scratch)
        return head(h).float()


class SlotDecoder(FastDecoder):
    """KV-cache slots for sequences that join and leave between steps (continuous batching).

    Each slot holds one sequence's keys and values at its own positions 0..length-1: no left
    padding, no shared length. :meth:`prefill` puts a prompt into a free slot (one forward pass
    through transformers' model) and :meth:`decode` decodes one token for any set of slots at once,
    each attending only to its own filled positions. Used by ``generate`` and by the server's
    scheduler, which owns the decoder on one thread.

    Args:
        model: a model :func:`supports` accepts.
        slots: how many sequences can be held at once.
        max_len: positions per slot (prompt + new tokens).
        quantize: as for :class:`FastDecoder`.
    """

    def __init__(self, model, slots: int, max_len: int, quantize: str | None = None):
        super().__init__(model, batch=slots, max_len=max_len, quantize=quantize, compile=False)
        self.model = model
        self.lengths = [0] * slots
        # Weights by the rows a step decodes: where the step has few rows (FEW_ROWS), a LoRA run's int4
        # base plus update, and auto's format for few rows (Q8_0 off the 4-bit grid); the format for
        # this many slots otherwise. So a step's arithmetic depends on how many sequences it decodes,
        # not on how many slots the decoder holds: a request alone on the server decodes as `generate`
        # of its one prompt does.
        # Asked of every grid format: a model with neither gets its one cached copy back. Not of exact
        # fp32, where another row count would replace this decoder's packed copy.
        few = slots > FEW_ROWS and self.quantize in _GRID_FORMATS
        if few and quantize == "auto":
            few_format = auto_format(model=model, rows=FEW_ROWS)
        else:
            few_format = self.quantize
        self._weights_for = {False: (self.layers, self.head),
                             True: _weights(model, few_format, FEW_ROWS) if few else (self.layers, self.head)}

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Put the prompt ``ids`` into ``slot``; returns the float32 logits of its next token (V,)."""
        return self.prefill_rows([slot], [ids])[0]

    @torch.inference_mode()
    def prefill_rows(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Put ``prompts[b]`` into ``slots[b]``; returns their next tokens' float32 logits (B, V).

        Prompts go through transformers' model together, left-padded as its ``generate`` batches
        them: one pass reads the weights once (the bench's 8 prompts, fp32, one thread, interleaved
        best of five: GPT-2 small's shape 0.415 s one by one against 0.194 s together, SmolLM2 0.621
        against 0.225 s). Prompts of very different lengths go in separate passes
        (:func:`_padding_groups`), so padding never more than doubles the tokens computed."""
        from .engine import left_pad
        from .strategies import forward_step

        for ids in prompts:
            if len(ids) >= self.limit:
                raise StyletuneError(f"the prompt has {len(ids)} tokens; a slot holds {self.limit} positions")
        logits = [None] * len(prompts)
        for group in _padding_groups([len(p) for p in prompts]):
            ids, mask = left_pad([prompts[b] for b in group], 0, self.device)  # pad ids are masked: any will do
            out, cache = forward_step(self.model, ids, mask)
            width = ids.shape[1]
            for i, layer in enumerate(cache.layers):
                for row, b in enumerate(group):
                    n = len(prompts[b])
                    self.k[i][slots[b], :, :n] = layer.keys[row, :, width - n:]
                    self.v[i][slots[b], :, :n] = layer.values[row, :, width - n:]
            for row, b in enumerate(group):
                logits[b] = out[row]
                self.lengths[slots[b]] = len(prompts[b])
        return torch.stack(logits)

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int) -> None:
        """Start ``dst`` as a copy of ``src`` (samples of one prompt share its prefill)."""
        n = self.lengths[src]
        for kv in self.kv:  # keys and values of a layer in one copy
            kv[:, dst, :, :n] = kv[:, src, :, :n]
        self.lengths[dst] = n

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Append ``tokens[b]`` to the sequence in ``slots[b]``; float32 logits (B, vocab) of the next ones."""
        device = self.device
        lengths = [self.lengths[s] for s in slots]
        pos = torch.tensor(lengths, device=device)
        upto = max(lengths) + 1
        if upto > self.limit:
            raise StyletuneError(f"the decode cache holds {self.limit} positions; all are used")
        # Each row sees its own filled positions; rows of one length need no mask, and write at one position.
        mask = None if len(set(lengths)) == 1 else (
            torch.arange(upto, device=device)[None, :] <= pos[:, None])[:, None, None, :]
        ids = torch.tensor(tokens, device=device)[:, None]
        self.layers, self.head = self._weights_for[len(slots) <= FEW_ROWS]
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        logits = self._forward(ids, pos, pos[:1] if mask is None else None, mask, upto,
                               torch.tensor(slots, device=device),
                               slice(slots[0], slots[0] + len(slots)) if consecutive else None)
        for s in slots:
            self.lengths[s] += 1
        return logits


def _padding_groups(lengths: list[int]) -> list[list[int]]:
    """The indices of ``lengths`` in groups to pad to one width and run together: shortest first, a
    group grows while its padded size (rows x longest) stays within twice its real tokens."""
    groups: list[list[int]] = []
    real = 0
    for b in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and (len(groups[-1]) + 1) * lengths[b] <= 2 * (real + lengths[b]):
            groups[-1].append(b)
            real += lengths[b]
        else:
            groups.append([b])
            real = lengths[b]
    return groups


def _hidden(x: torch.Tensor) -> torch.Tensor:
    """The head of a step whose real head runs after it: the final norm's output, unchanged."""
    return x


def split_head(decoder):
    """(the decoder a compiler sees, the head to run after its step or None). An fp16 head is FBGEMM's
    packed weight, which neither AOTInductor (a package takes only tensors) nor torch.compile takes:
    the compiled step then ends at the final norm, and the head runs after it."""
    if not isinstance(decoder.head, (_Fp16Linear, _Int8Grid)):
        return decoder, None
    body = copy.copy(decoder)  # the same layers and KV cache; only the head differs
    body.head = _hidden
    return body, decoder.head


def _compiled_step(decoder):
    """``torch.compile`` of the decoder's step, its head after it where :func:`split_head` says so."""
    body, head = split_head(decoder)
    step = _compiled(body._step)
    return step if head is None else lambda *args: head(step(*args))


def _compiled(fn):
    """``torch.compile(fn)``, falling back to ``fn`` if compilation fails (no C++ compiler,
    an unsupported operation): the step is then just slower, never wrong."""
    compiled = torch.compile(fn, dynamic=False, fullgraph=True)
    state = {"fn": compiled}

    def call(*args):
        try:
            return state["fn"](*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run it eagerly
            if state["fn"] is fn:
                raise
            import warnings

            warnings.warn(f"torch.compile of the decode step failed ({type(exc).__name__}: {exc}); "
                          "decoding without it", stacklevel=2)
            state["fn"] = fn
            return fn(*args)

    return call
