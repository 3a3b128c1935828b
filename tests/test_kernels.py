"""styletune's decode kernels (styletune/decoding/kernels.c): each against the PyTorch arithmetic it
replaces, the kernel step against the PyTorch step (Llama and GPT-2), and the fallback where no compiler is
found."""

import ctypes
import warnings

import pytest
import torch
import torch.nn.functional as F

from styletune.decoding import fast, kernels
from styletune.models import load_model

F32, BF16 = 1, 2
FORMATS = ["int8", "int8-dynamic", "int4", "fp16", "auto"]


@pytest.fixture(scope="module")
def lib():
    lib = kernels.library()
    assert lib is not None, "the kernels must build on the machines this project tests on"
    return lib


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def models(tiny_model_dirs, llama):
    """Both families' tiny models in fp32, by family name."""
    return {"llama": llama, "gpt2": load_model(str(tiny_model_dirs["gpt2"]), device="cpu", dtype="float32")}


def _ptr(t):
    return t.data_ptr()


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between two bf16 tensors in units in the last place (same-sign values)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("out_dt", [F32, BF16])
@pytest.mark.parametrize("add_dt", [0, F32, BF16])
def test_add_rms_is_llamas_rmsnorm_after_the_residual_add(lib, add_dt, out_dt):
    torch.manual_seed(0)
    rows, width, eps = 3, 576, 1e-5
    x = torch.randn(rows, width) * 3
    w = torch.randn(width)
    add = torch.randn(rows, width).to({F32: torch.float32, BF16: torch.bfloat16}.get(add_dt, torch.float32))
    out = torch.empty(rows, width, dtype=torch.bfloat16 if out_dt == BF16 else torch.float32)
    want_x = x + add.float() if add_dt else x.clone()
    want = w * (want_x * torch.rsqrt(want_x.pow(2).mean(-1, keepdim=True) + eps))
    scratch = torch.empty(width)
    lib.st_add_rms(_ptr(x), _ptr(add) if add_dt else None, add_dt, _ptr(w), _ptr(out), out_dt, rows, width, eps,
                   _ptr(scratch))
    assert torch.allclose(x, want_x, rtol=0, atol=0)  # the residual stream updated in place, exactly
    if out_dt == F32:
        assert torch.allclose(out, want, rtol=2e-6, atol=1e-6)
    else:  # rounded to nearest as torch rounds: within one bf16 step of torch's rounding of the fp32 result
        assert _bf16_ulps(out.abs(), want.to(torch.bfloat16).abs()) <= 1
        assert (out.float().sign() == want.sign()).all()


@pytest.mark.parametrize("out_dt", [F32, BF16])
@pytest.mark.parametrize("add_dt", [0, F32, BF16])
def test_add_layer_norm_is_gpt2s_layernorm_after_the_residual_add(lib, add_dt, out_dt):
    torch.manual_seed(5)
    rows, width, eps = 3, 768, 1e-5
    x = torch.randn(rows, width) * 3 + 2  # a mean far from 0: centring matters
    w, bias = torch.randn(width), torch.randn(width)
    add = torch.randn(rows, width).to({F32: torch.float32, BF16: torch.bfloat16}.get(add_dt, torch.float32))
    out = torch.empty(rows, width, dtype=torch.bfloat16 if out_dt == BF16 else torch.float32)
    want_x = x + add.float() if add_dt else x.clone()
    want = F.layer_norm(want_x, (width,), w, bias, eps)
    scratch = torch.empty(width)
    lib.st_add_layer_norm(_ptr(x), _ptr(add) if add_dt else None, add_dt, _ptr(w), _ptr(bias), _ptr(out), out_dt,
                          rows, width, eps, _ptr(scratch))
    assert torch.equal(x, want_x)  # the residual stream updated in place, exactly
    if out_dt == F32:
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-5)
    else:  # within one bf16 step of torch's rounding of the fp32 result
        assert torch.allclose(out.float(), want.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-5)


@pytest.mark.parametrize("in_dt,out_dt", [(F32, F32), (BF16, BF16), (BF16, F32)])
def test_gelu_tanh_is_gpt2s_activation(lib, in_dt, out_dt):
    torch.manual_seed(6)
    rows, inner = 2, 3072
    x = (torch.randn(rows, inner) * 4).to(torch.bfloat16 if in_dt == BF16 else torch.float32)
    x[0, :5] = torch.tensor([-100.0, 100.0, 0.0, -9.0, 1e-4])  # saturated, zero and tiny inputs
    out = torch.empty(rows, inner, dtype=torch.bfloat16 if out_dt == BF16 else torch.float32)
    scratch = torch.empty(inner)
    lib.st_gelu_tanh(_ptr(x), in_dt, _ptr(out), out_dt, rows, inner, _ptr(scratch))
    want = F.gelu(x.float(), approximate="tanh")
    if out_dt == F32:
        assert torch.allclose(out, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.allclose(out.float(), want, rtol=2 ** -8, atol=1e-6)
    assert out[0, 1] == 100.0 and abs(float(out[0, 0])) < 1e-30 and out[0, 2] == 0.0


@pytest.mark.parametrize("in_dt,out_dt", [(F32, F32), (BF16, BF16), (BF16, F32)])
def test_silu_mul_is_swiglus_gate(lib, in_dt, out_dt):
    torch.manual_seed(1)
    rows, inner = 2, 1536
    gu = (torch.randn(rows, 2 * inner) * 6).to(torch.bfloat16 if in_dt == BF16 else torch.float32)
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -88.5])  # saturated and zero gates
    out = torch.empty(rows, inner, dtype=torch.bfloat16 if out_dt == BF16 else torch.float32)
    scratch = torch.empty(2 * inner)  # held: a temporary would be freed before the call reads it
    lib.st_silu_mul(_ptr(gu), in_dt, _ptr(out), out_dt, rows, inner, _ptr(scratch))
    gate, up = gu.float().chunk(2, dim=-1)
    want = F.silu(gate) * up
    if out_dt == F32:
        assert torch.allclose(out, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.allclose(out.float(), want, rtol=2 ** -8, atol=1e-6)
    assert torch.isfinite(out.float()).all()


# (heads, kv heads, head size): the general code, and the shapes kernels.c compiles as constants
HEADS = [(6, 2, 16), (9, 3, 64), (12, 3, 64), (4, 2, 64), (16, 4, 128), (6, 3, 128)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("r_dt", [F32, BF16])
@pytest.mark.parametrize("heads,kv_heads,hd,rotary",
                         [(*h, True) for h in HEADS] + [(12, 12, 64, False), (2, 2, 16, False)])
def test_rope_attend_rotates_writes_the_cache_and_attends(lib, r_dt, masked, heads, kv_heads, hd, rotary):
    """Rows in slots 2 and 0 of a cache of 3, at positions 5 and 3, each attending over its own slot
    (positions 0..5), with the rotation and softmax written out in PyTorch as the eager step does.
    Without tables (``rotary`` False: GPT-2's heads) nothing is rotated; q is scaled all the same."""
    torch.manual_seed(2)
    slots_total, T, upto = 3, 12, 6
    group = heads // kv_heads
    cache = torch.randn(2, slots_total, kv_heads, T, hd)
    before = cache.clone()
    r = torch.randn(2, heads + 2 * kv_heads, hd).to(torch.bfloat16 if r_dt == BF16 else torch.float32)
    pos = torch.tensor([5, 3])
    slots = torch.tensor([2, 0])
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, hd, 2) / hd))
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    sin_signed = torch.cat([-sin[:, :hd // 2], sin[:, hd // 2:]], -1)
    mask = torch.ones(2, upto, dtype=torch.bool)
    if masked:
        mask[0, 1] = mask[1, 0] = False
        mask[1, 4:] = False  # row 1 (position 3) sees nothing after itself
    out = torch.empty(2, heads * hd)
    scale, scratch = hd ** -0.5, torch.empty((heads + 2 * kv_heads) * hd + heads // kv_heads * (T + hd))
    tables = (_ptr(cos), _ptr(sin_signed)) if rotary else (None, None)
    lib.st_rope_attend(_ptr(r), r_dt, _ptr(pos), *tables, _ptr(cache), slots_total, T,
                       _ptr(slots), _ptr(pos), 1, _ptr(mask) if masked else None, upto, _ptr(out), F32,
                       2, heads, kv_heads, hd, scale, _ptr(scratch))
    rf = r.float()

    def rotate(v, p):
        if not rotary:
            return v
        half = torch.cat([-v[..., hd // 2:], v[..., :hd // 2]], -1)
        return v * cos[p] + half * sin[p]

    want_cache = before.clone()
    for b in range(2):
        p, s = int(pos[b]), int(slots[b])
        q = rotate(rf[b, :heads], p) * scale
        want_cache[0, s, :, p] = rotate(rf[b, heads:heads + kv_heads], p)
        want_cache[1, s, :, p] = rf[b, heads + kv_heads:]
        keys = want_cache[0, s, :, :upto].repeat_interleave(group, 0)  # (heads, upto, hd)
        values = want_cache[1, s, :, :upto].repeat_interleave(group, 0)
        scores = torch.einsum("hd,htd->ht", q, keys).masked_fill(~mask[b], float("-inf"))
        want = torch.einsum("ht,htd->hd", torch.softmax(scores, -1), values).reshape(-1)
        assert torch.allclose(out[b], want, rtol=1e-5, atol=1e-5), b
    assert torch.allclose(cache, want_cache, rtol=1e-6, atol=1e-6)
    assert torch.equal(cache[:, 1], before[:, 1])  # a slot no row decodes is untouched


@pytest.mark.parametrize("x_dt,y_dt", [(F32, BF16), (BF16, F32)])
def test_low_rank_adds_a_lora_update_to_the_base_product(lib, x_dt, y_dt):
    torch.manual_seed(4)
    rows, n_in, rank, n_out = 2, 96, 12, 80
    dtypes = {F32: torch.float32, BF16: torch.bfloat16}
    x, y = torch.randn(rows, n_in).to(dtypes[x_dt]), torch.randn(rows, n_out).to(dtypes[y_dt])
    a_t, b_t = torch.randn(n_in, rank), torch.randn(rank, n_out) * 0.1
    out, scratch = torch.empty(rows, n_out), torch.empty(n_in + rank)
    lib.st_low_rank(_ptr(x), x_dt, _ptr(a_t), _ptr(b_t), _ptr(y), y_dt, _ptr(out), rows, n_in, rank, n_out,
                    _ptr(scratch))
    want = y.float() + (x.float() @ a_t) @ b_t
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-5)


# styletune's int4 and int8 products: built for AVX-512 VNNI or AVX2 (elsewhere PyTorch's kernels run)
int_products = pytest.mark.skipif(fast._int_kernels() is None, reason="this CPU has neither AVX-512 VNNI nor AVX2")


def _build(tmp_path, arch: str):
    """kernels.c built for another x86-64 level (``-march=...``), with OpenMP, loaded with its signatures."""
    import platform
    import subprocess

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86-64 build")
    out = tmp_path / f"kernels-{arch}.so"
    subprocess.run([*kernels._compiler(), *kernels.FLAGS, f"-march={arch}", "-fopenmp", str(kernels.SOURCE),
                    "-o", str(out), "-lm"], check=True)
    built = ctypes.CDLL(str(out))
    for name, argtypes in kernels._SIGNATURES.items():
        fn = getattr(built, name)
        fn.argtypes, fn.restype = argtypes, kernels._RETURNS.get(name)
    return built


@pytest.fixture(scope="module", params=["native", "x86-64-v3"])
def int_lib(request, lib, tmp_path_factory):
    """The int products as this machine's build has them, and the AVX2 ones (an x86-64-v3 build) where that
    build has AVX-512 VNNI's: both kinds of tile are checked on every machine that can run them."""
    if request.param == "native":
        if not lib.st_int_products():
            pytest.skip("this CPU has neither AVX-512 VNNI nor AVX2")
        return lib
    if lib.st_int_products() != 512:
        pytest.skip("this machine's own build is the AVX2 one (or has no int products)")
    built = _build(tmp_path_factory.mktemp("avx2"), "x86-64-v3")
    assert built.st_int_products() == 256
    return built


def _activations(x: torch.Tensor, passes: int):
    """The kernels' int8 activations, written out: per group of 32 inputs, codes q = round(x / d) with
    d = max|x| / 127 (ties to even), a second pass the same of what the first leaves; and the group's
    exact sum. Returns ([(codes, scales) per pass], sums)."""
    g = x.float().unflatten(-1, (-1, 32))
    sums, runs = g.sum(-1), []
    for _ in range(passes):
        amax = g.abs().amax(-1)
        q = torch.round(g * torch.where(amax > 0, 127 / amax, 0)[..., None])
        runs.append((q, amax / 127))
        g = g - q * (amax / 127)[..., None]
    return runs, sums


def _grid_matrix(rows: int, n_in: int, bits: int, seed: int):
    """A matrix on a GGUF grid, as a model dequantised from Q4_1 (bits 4) or Q8_0 (bits 8) holds, with fp16
    scales: (weight, codes, scales, centers or None)."""
    torch.manual_seed(seed)
    groups = (rows, n_in // 32)
    scale = (torch.rand(groups) * 0.02 + 0.001).half().float()
    if bits == 4:
        q = torch.randint(0, 16, (rows, n_in))
        q[:, ::32], q[:, 1::32] = 0, 15  # each group spans the grid, as Q4_1's quantiser leaves it
        zero = (torch.randn(groups) * 0.01).half().float()
        w = (q.float().unflatten(1, (-1, 32)) - 8) * scale[..., None] + zero[..., None]
        return w.flatten(1), q, scale, zero
    q = torch.randint(-127, 128, (rows, n_in))
    q[:, ::32] = 127  # each group's largest |q| is 127, as Q8_0's quantiser leaves it
    return (q.float().unflatten(1, (-1, 32)) * scale[..., None]).flatten(1), q, scale, None


def _int_mm(lib, bits, packed, x, n_in, n_out, threads=1, passes=2):
    y = torch.empty(x.shape[0], n_out)
    scratch = fast._int_scratch(x.shape[0], n_in)
    mm = lib.st_q4_mm if bits == 4 else lib.st_q8_mm
    mm(_ptr(x), F32 if x.dtype == torch.float32 else BF16, _ptr(packed[0]), _ptr(packed[1]), _ptr(y), x.shape[0],
       n_in, n_out, _ptr(scratch), threads, passes)
    return y


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_int_products_are_their_formula_with_int8_activations(int_lib, bits, rows, passes):
    """y = sum over passes and groups of scale * d * (sum q * qx - offset * sum qx) (+ center * the exact sum
    for int4), checked against that formula written out in PyTorch; 80 output rows (at one input row, tiles
    of 4 blocks, 2 in an AVX2 build, and one left over), 96 inputs (3 groups). Against the exact product of
    the same weights, one pass of int8 activations costs about 0.5% (as llama.cpp's Q8 activations), two
    (what fast.py takes) about 1e-5."""
    n_out, n_in = 80, 96
    w, q, scale, zero = _grid_matrix(n_out, n_in, bits, seed=rows)
    packed = fast._pack_int4(q, scale, zero) if bits == 4 else fast._pack_int8(q, scale)
    x = torch.randn(rows, n_in) * 2
    x[0, :32] = 0  # a group of zeros: scale 0, codes 0
    y = _int_mm(int_lib, bits, packed, x, n_in, n_out, passes=passes)
    runs, sums = _activations(x, passes)
    qw = q.float().unflatten(1, (-1, 32)) - (8 if bits == 4 else 0)  # (out, groups, 32)
    want = sum((torch.einsum("bgi,ogi->bog", qx, qw) * d[:, None, :] * scale[None]).sum(-1) for qx, d in runs)
    if bits == 4:
        want += (zero[None] * sums[:, None, :]).sum(-1)
    # (a second-pass code may round the other way where the compiler fuses the remainder's multiply and
    # subtract: one such code moves a sum by about 3e-4 here)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5 if passes == 1 else 1e-3), float((y - want).abs().max())
    exact = x @ w.t()
    assert float((y - exact).norm() / exact.norm()) < (1e-2 if passes == 1 else 1e-4)
    assert torch.equal(_int_mm(int_lib, bits, packed, x, n_in, n_out, threads=2, passes=passes), y)  # rows shared out
    xb = x.to(torch.bfloat16)  # bf16 inputs: read as their fp32 values
    assert torch.equal(_int_mm(int_lib, bits, packed, xb, n_in, n_out), _int_mm(int_lib, bits, packed, xb.float(), n_in, n_out))


@int_products
def test_the_int_formats_take_the_matrices_on_their_grids(lib):
    """``--quantize auto`` keeps a Q4_1-grid matrix in int4 (styletune's layout beside PyTorch's) and a
    Q8_0-grid one in int8 (the bundled model's tied embedding head), each through styletune's kernel;
    a matrix on neither grid stays fp16."""
    w4, *_ = _grid_matrix(64, 96, 4, seed=7)
    w8, q8, scale8, _ = _grid_matrix(64, 96, 8, seed=8)
    off = torch.randn(64, 96) * 0.02
    four, eight, neither = (fast._int4_grid_fp16(w) for w in (w4, w8, off))
    assert isinstance(four, fast._Int4Linear) and four.packed is not None
    assert isinstance(eight, fast._Int8Grid) and isinstance(neither, fast._Fp16Linear)
    codes, scales = fast._int8_grid(w8)
    assert torch.equal(codes.long(), q8) and torch.allclose(scales, scale8)  # the GGUF's codes and scales
    assert fast._int8_grid(off) is None and fast._int8_grid(w8[:, :80]) is None  # off the grid; not whole groups
    x = torch.randn(3, 96)
    for proj, w in ((eight, w8), (fast._Int8Grid(fast._int8_grid(w8), bias=torch.ones(64)), w8)):
        want = x @ w.t() + (0 if proj.bias is None else proj.bias)
        assert float((proj(x) - want).norm() / want.norm()) < 1e-4


def test_the_library_says_which_int_products_it_has(tmp_path):
    """st_int_products is the products' vector width: 256 in a build for AVX2 (x86-64-v3), 0 in one for a
    CPU without it (x86-64-v2: no products, and fast.py keeps PyTorch's int4 kernel and FBGEMM's fp16),
    and for this machine's build what its CPU has."""
    assert _build(tmp_path, "x86-64-v3").st_int_products() == 256
    assert _build(tmp_path, "x86-64-v2").st_int_products() == 0
    flags = set(kernels._cpu().split())
    want = 512 if {"avx512f", "avx512bw", "avx512_vnni"} <= flags else 256 if {"avx2", "fma", "f16c"} <= flags else 0
    assert kernels.library().st_int_products() == want


def test_int8_is_llamacpps_q8_0_in_styletunes_kernel(lib):
    """``--quantize int8`` where the int kernels run: codes in -127..127, one fp16 scale per 32 inputs (the
    group's largest weight over 127), each code the nearest for its scale; the product (bias included)
    is the formula's to the input's two-pass rounding, and the dequantised weights within half a scale
    step of the model's. 50 rows: the kernel's blocks of 16 padded (as GPT-2's 50257-token head), in the
    PyTorch step's call and in the kernel step's alike."""
    torch.manual_seed(9)
    n, k = 50, 96
    w, bias, x = torch.randn(n, k) * 0.05, torch.randn(n), torch.randn(3, k)
    w[0, :32] = 0.0  # an all-zero group: scale 0, codes 0
    proj = fast._int8(w, bias)
    assert isinstance(proj, fast._Int8Grid)
    groups = w.reshape(n, k // 32, 32)
    scale = (groups.abs().amax(-1) / 127).half().float()
    q = torch.round(groups / scale.clamp(min=1e-30)[..., None]).clamp(-127, 127)
    dequantised = (q * scale[..., None]).reshape(n, k)
    assert ((dequantised - w).abs().reshape(n, k // 32, 32) <= scale[..., None] / 2 + 1e-9).all()
    padded = [torch.cat([t, t.new_zeros(14, t.shape[1])]) for t in (q.to(torch.int8).reshape(n, k), scale)]
    assert torch.equal(proj.packed[0], fast._pack_int8(*padded)[0])
    want = x @ dequantised.t() + bias
    assert torch.allclose(proj(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    code, kernel_step_product = fast._kernel_product(proj, lib)
    got = kernel_step_product(x)
    assert code == F32 and got.shape == (3, n) and got.is_contiguous() and torch.equal(got, proj(x))


def test_without_int_products_the_formats_are_pytorchs(monkeypatch):
    monkeypatch.setattr(fast, "_int_kernels", lambda: None)
    w4, *_ = _grid_matrix(64, 96, 4, seed=7)
    w8, *_ = _grid_matrix(64, 96, 8, seed=8)
    four, eight = fast._int4_grid_fp16(w4), fast._int4_grid_fp16(w8)
    assert isinstance(four, fast._Int4Linear) and four.packed is None and isinstance(eight, fast._Fp16Linear)
    assert isinstance(fast._int8(w8), fast._Int8Linear)  # --quantize int8: one scale per row, PyTorch's kernel


def _decoders(model, monkeypatch, **kwargs):
    """The same decoder with the kernel step and with PyTorch's alone, on the same weight copies (without
    the kernels a format can store other copies: ``int8`` one scale per row in place of Q8_0's groups), so
    that the two differ in their steps only."""
    with_kernels = fast.FastDecoder(model, **kwargs)
    monkeypatch.setenv("STYLETUNE_KERNELS", "0")
    without = fast.FastDecoder(model, **kwargs)
    monkeypatch.delenv("STYLETUNE_KERNELS")
    assert with_kernels._kernels is not None and without._kernels is None
    without.layers, without.head = with_kernels.layers, with_kernels.head
    return with_kernels, without


@pytest.mark.parametrize("quantize", FORMATS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_kernel_step_is_the_pytorch_step(models, lib, monkeypatch, family, quantize, padded):
    """Eight tokens for two rows (left-padded: a mask; or not) through both steps: the same logits to
    float rounding, and the same KV cache. fp16 keeps fp32 activations, so the two agree to fp32
    rounding; the int formats round activations to bf16 at every product, where a sum in another
    order can land a value one bf16 step away (2**-8 relative), so they agree to a few of those."""
    kern, torch_step = _decoders(models[family].model, monkeypatch, batch=2, max_len=16, quantize=quantize)
    tol = 1e-5 if quantize == "fp16" else 3e-2
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]]) if padded else torch.ones(2, 3, dtype=torch.long)
    for d in (kern, torch_step):
        d.length = 3  # a prompt's cache: the same random keys and values in both
        for kv in d.kv:
            torch.manual_seed(3)
            kv[:, :, :, :3] = torch.randn_like(kv[:, :, :, :3])
    ids = torch.tensor([[7], [9]])
    for step in range(8):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        a, b = kern.step(ids, mask), torch_step.step(ids, mask)
        assert (a - b).abs().max() <= tol * b.abs().max(), step
        ids = b.argmax(-1, keepdim=True)
    for ka, kb in zip(kern.kv, torch_step.kv):
        assert (ka - kb).abs().max() <= 10 * tol * kb.abs().max()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_kernel_step_serves_slots_that_join_leave_and_are_not_consecutive(models, lib, monkeypatch, family):
    """A SlotDecoder's rows: slots 3 and 1 at different lengths (a mask, each row writing at its own
    position), then slot 1 alone; logits as the PyTorch step's and as transformers' over each sequence."""
    lm = models[family]
    decs = []
    for env in ("1", "0"):
        monkeypatch.setenv("STYLETUNE_KERNELS", env)
        decs.append(fast.SlotDecoder(lm.model, slots=4, max_len=32, quantize="fp16"))
    assert decs[0]._kernels is not None and decs[1]._kernels is None
    seqs = {3: [5, 6, 7, 8, 9], 1: [20, 21]}
    outs = [d.prefill_rows(list(seqs), list(seqs.values())) for d in decs]
    for step in range(5):
        live = list(seqs) if step < 3 else [1]
        tokens = [int(outs[1][list(seqs).index(s) if step < 3 else 0].argmax()) for s in live]
        for s, t in zip(live, tokens):
            seqs[s].append(t)
        outs = [d.decode(live, tokens) for d in decs]
        assert (outs[0] - outs[1]).abs().max() <= 1e-5 * outs[1].abs().max(), step
        for b, s in enumerate(live):
            with torch.no_grad():
                ref = lm.model(torch.tensor([seqs[s]])).logits[0, -1]
            assert (outs[0][b] - ref).abs().max() <= 5e-3 * ref.abs().max(), (step, s)


def test_the_kernel_step_is_only_for_fp32_steps_it_has_kernels_for(models, tiny_model_dirs, lib):
    for family in ("llama", "gpt2"):
        model = models[family].model
        assert fast.FastDecoder(model, batch=1, max_len=8, quantize="int8")._kernels is not None
        assert fast.FastDecoder(model, batch=1, max_len=8)._kernels is None  # exact: transformers' own arithmetic
    erf = load_model(str(tiny_model_dirs["gpt2"]), device="cpu", dtype="float32")
    erf.model.config.activation_function = "gelu"  # the exact GELU: no kernel for it, PyTorch's step
    assert fast.FastDecoder(erf.model, batch=1, max_len=8, quantize="int8")._kernels is None
    bf16 = load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="bfloat16")
    assert fast.FastDecoder(bf16.model, batch=1, max_len=8, quantize="int8")._kernels is None


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no library loaded yet in this process."""
    monkeypatch.setenv("STYLETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_LOADED", {})
    return tmp_path / "cache" / "kernels"


def test_the_library_is_built_once_and_then_loaded_from_the_cache(fresh, monkeypatch):
    assert isinstance(kernels.library(), ctypes.CDLL)
    built = list(fresh.glob("styletune-kernels-*.so"))
    assert len(built) == 1 and not list(fresh.glob("*.tmp"))
    monkeypatch.setattr(kernels, "_LOADED", {})  # a new process, as far as the cache is concerned

    def no_compiler(*args, **kwargs):
        raise AssertionError("the cached library should have been loaded, not rebuilt")

    monkeypatch.setattr(kernels.subprocess, "run", no_compiler)
    assert isinstance(kernels.library(), ctypes.CDLL)


def test_without_a_compiler_decoding_falls_back_to_pytorch_with_one_warning(fresh, monkeypatch, llama):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    with pytest.warns(UserWarning, match="decode kernels are not available"):
        dec = fast.FastDecoder(llama.model, batch=1, max_len=8, quantize="fp16")
    assert dec._kernels is None
    assert not list(fresh.glob("*")) if fresh.exists() else True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not per decoder
        again = fast.FastDecoder(llama.model, batch=1, max_len=8, quantize="fp16")
    logits = again.step(torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.long))
    with torch.no_grad():
        ref = llama.model(torch.tensor([[5]])).logits[0, -1]
    assert (logits[0] - ref).abs().max() <= 5e-3 * ref.abs().max()


def test_a_compiler_error_is_reported_and_nothing_half_built_is_left(fresh, monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'kernels.c:1: error: this compiler refuses' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(UserWarning, match="this compiler refuses"):
        assert kernels.library() is None
    assert not list(fresh.iterdir())


def test_styletune_kernels_0_turns_them_off_silently(fresh, monkeypatch, llama):
    monkeypatch.setenv("STYLETUNE_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.library() is None
        assert fast.FastDecoder(llama.model, batch=1, max_len=8, quantize="int4")._kernels is None
    assert not fresh.exists()


def test_the_compiler_is_one_that_is_installed(monkeypatch):
    """Python's own compiler may be one this machine lacks (Debian's ``x86_64-linux-gnu-gcc``): the
    next installed one is taken; with none at all, the error says what to do."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(kernels.sysconfig, "get_config_var", lambda name: "no-such-gcc -pthread")
    found = kernels._compiler()
    assert found[0] in ("cc", "gcc", "clang") and kernels.shutil.which(found[0])
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    with pytest.raises(OSError, match="no C compiler found"):
        kernels._compiler()
    monkeypatch.setenv("CC", "gcc -O1")  # $CC is taken as it is, arguments and all
    assert kernels._compiler() == ["gcc", "-O1"]
