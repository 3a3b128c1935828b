"""The lean Llama decode step: same logits as transformers, and the int8 variant close to them.
(GPT-2's, on the same decoders: tests/test_fast_gpt2.py.)"""

import copy

import pytest
import torch

from styletune.config import DecodingConfig
from styletune.decoding import fast
from styletune.decoding.engine import generate, left_pad
from styletune.decoding.strategies import forward_step
from styletune.errors import StyletuneError
from styletune.models import load_model

PROMPTS = ["Once upon a midnight", "The quick brown fox jumps over"]


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32")


def test_supported_architectures(llama, tiny_gpt2):
    """Llama and GPT-2 (tests/test_fast_gpt2.py) have the lean step; other architectures do not."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    assert fast.supports(llama.model)
    assert fast.supports(tiny_gpt2)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64))
    assert not fast.supports(neox)


def _decode_both_ways(lm, prompts, steps, **options):
    """Decode ``steps`` tokens of a left-padded batch with transformers and with the lean step;
    yields (transformers logits, lean logits) per step."""
    tok = lm.tokenizer
    ids, mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id, "cpu")
    ref_logits, cache = forward_step(lm.model, ids, mask)
    _, cache2 = forward_step(lm.model, ids, mask)
    dec = fast.FastDecoder(lm.model, batch=len(prompts), max_len=ids.shape[1] + steps, **options)
    dec.load_cache(cache2)
    for _ in range(steps):
        nxt = ref_logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        ref_logits, cache = forward_step(lm.model, nxt, mask, cache)
        yield ref_logits, dec.step(nxt, mask), dec


@pytest.mark.parametrize("quantize,tol,compile,batch", [
    (None, 1e-5, False, 2), ("int8", 5e-2, False, 2), ("int8-dynamic", 5e-2, False, 2), ("int4", 3e-1, False, 2),
    ("auto", 5e-2, False, 2), ("fp16", 5e-3, False, 2), ("fp16", 5e-3, False, 5), ("int4", 3e-1, True, 2),
    ("auto", 5e-2, True, 2),
    (None, 1e-5, True, 2),
    ("int8-dynamic", 5e-2, True, 2), (None, 1e-5, False, 5), (None, 1e-5, True, 5)])
def test_step_logits_match_transformers(llama, quantize, tol, compile, batch, recwarn):
    """Decode 6 tokens for a left-padded batch both ways and compare every step's logits.
    From PACK_MIN_ROWS rows on, eager fp32 CPU decoding goes through MKL-packed weights."""
    prompts = (PROMPTS * batch)[:batch]
    for ref_logits, got, dec in _decode_both_ways(llama, prompts, 6, quantize=quantize, compile=compile):
        scale = ref_logits.abs().max()
        assert (got - ref_logits).abs().max() <= tol * scale
    # (compiled steps keep the plain product: inductor cannot lower the packed one)
    assert dec.packed == (quantize is None and not compile and batch >= fast.PACK_MIN_ROWS
                          and fast.can_pack(llama.model))
    # A compiled step that fell back to eager would warn; it must not have.
    assert not [str(w.message) for w in recwarn if "decode step failed" in str(w.message)]
    if compile:
        assert dec.max_len % fast.COMPILE_BUCKET == 0  # fixed, bucketed shapes
    if compile and quantize == "auto" and fast.has_fp16_kernel():
        # layers off the 4-bit grid in int8 inside the package; the head in fp16, run after it
        assert dec.quantize == "int4-grid-fp16-head"
        assert isinstance(dec.layers[0]["qkv"], fast._Int8Linear) and isinstance(dec.head, fast._Fp16Linear)


def test_mkl_packing_is_used_where_torch_has_it():
    """The x86 CPU wheels this project installs have MKL: the batch path must not silently
    degrade to the plain product there."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("MKL ships with torch's x86 wheels only")
    assert torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def test_without_mkl_batches_use_the_model_weights(llama, monkeypatch):
    monkeypatch.setattr(fast, "can_pack", lambda model: False)
    for ref_logits, got, dec in _decode_both_ways(llama, PROMPTS * 2, 2):
        assert (got - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
    assert not dec.packed and dec.layers[0]["q"].weight is llama.model.model.layers[0].self_attn.q_proj.weight


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_derived_weights_follow_in_place_updates(tiny_model_dirs, quantize):
    """Packed and int8 copies are cached per model; a weight changed in place (an optimizer
    step, a loaded state dict) must invalidate them."""
    lm = load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32")
    prompts = PROMPTS * 2
    tol = 5e-2 if quantize else 1e-5
    list(_decode_both_ways(lm, prompts, 1, quantize=quantize))  # fills the cache
    with torch.no_grad():
        lm.model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
        lm.model.lm_head.weight.add_(0.05)
    for ref_logits, got, dec in _decode_both_ways(lm, prompts, 2, quantize=quantize):
        assert (got - ref_logits).abs().max() <= tol * ref_logits.abs().max()
    assert dec.packed == (quantize is None and fast.can_pack(lm.model))


@pytest.mark.parametrize("rows", [2, fast.PACK_MIN_ROWS])
def test_engine_uses_the_fast_step_and_matches_the_slow_path(llama, monkeypatch, rows):
    """Greedy tokens through the engine: the fast step (packed weights from PACK_MIN_ROWS rows on)
    against transformers' forward. The two differ in the last bits of the logits (< 1e-5 of their
    scale, test_step_logits_match_transformers), so equal tokens are asserted only where the
    reference's top two candidates are further apart than that: checked, not assumed."""
    calls = []
    real = fast.SlotDecoder.decode
    monkeypatch.setattr(fast.SlotDecoder, "decode", lambda self, *a: calls.append(self.packed) or real(self, *a))
    prompts = (PROMPTS * rows)[:rows]
    cfg = DecodingConfig(greedy=True, max_new_tokens=10, stop_at_eos=False)
    quick = generate(llama, prompts, cfg)
    assert len(calls) == 9  # the first token comes from the prompt pass
    assert calls[0] == (rows >= fast.PACK_MIN_ROWS and fast.can_pack(llama.model))
    llama.fast_decode = False
    try:
        slow = generate(llama, prompts, cfg)
    finally:
        llama.fast_decode = True
    for sample in slow:  # the premise: no near-tie along the reference's greedy path
        ids = torch.tensor([llama.tokenizer(prompts[sample.prompt_index])["input_ids"] + sample.token_ids])
        with torch.no_grad():
            logits = llama.model(ids).logits[0, -len(sample.token_ids) - 1:-1]
        top2 = logits.topk(2, dim=-1).values
        assert ((top2[:, 0] - top2[:, 1]) > 1e-3 * logits.abs().max()).all()
    assert [s.token_ids for s in quick] == [s.token_ids for s in slow]


@pytest.mark.parametrize("quantize", ["int8", "int8-dynamic", "int4", "fp16", "auto"])
def test_quantized_options_generate(tiny_model_dirs, quantize):
    lm = load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32", quantize=quantize)
    assert lm.quantize == quantize
    [s] = generate(lm, [PROMPTS[0]], DecodingConfig(greedy=True, max_new_tokens=8, stop_at_eos=False))
    assert len(s.token_ids) == 8


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(llama, monkeypatch, tmp_path):
    """No C++ compiler: the ahead-of-time build fails, then torch.compile does; each says so once
    and the tokens are the eager step's."""
    from styletune.decoding import compiled

    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled, "_build", no_compiler)
    monkeypatch.setattr(compiled, "_LOADED", {})
    monkeypatch.setattr(compiled, "_directory", lambda: tmp_path)  # nothing built yet
    cfg = DecodingConfig(greedy=True, max_new_tokens=6, stop_at_eos=False)
    eager = generate(llama, PROMPTS, cfg)
    llama.compile = True
    try:
        with pytest.warns(UserWarning) as caught:
            compiled_out = generate(llama, PROMPTS, cfg)
    finally:
        llama.compile = False
    messages = [str(w.message) for w in caught]
    assert any("ahead-of-time compilation of the decode step failed (RuntimeError: no C++ compiler)" in m
               for m in messages)
    assert any("torch.compile of the decode step failed" in m for m in messages)
    assert [s.token_ids for s in compiled_out] == [s.token_ids for s in eager]


def test_a_package_without_a_flat_entry_point_gets_its_arguments_nested():
    """The compiled step hands the package its inputs flat (the loader's ``boxed_run``: no pytree per
    token); a package object without that loader is called as exported, ``(ids, pos, where, mask, kv,
    weights)``, with the same tensors."""
    from styletune.decoding import compiled

    seen = []

    class Package:  # the public call only
        def __call__(self, *args):
            seen.append(args)
            return "logits"

    flat = [torch.tensor(i) for i in range(9)]
    assert compiled._flat_runner(Package(), n_kv=2)(flat) == "logits"
    (args,) = seen
    assert [a is b for a, b in zip(args[:4], flat)] == [True] * 4
    assert [t is u for t, u in zip(args[4], flat[4:6])] == [True, True] and len(args[4]) == 2
    assert [t is u for t, u in zip(args[5], flat[6:])] == [True] * 3 and len(args[5]) == 3


def test_the_compiled_step_is_built_once_per_shape_and_serves_every_model_of_that_shape(llama, monkeypatch,
                                                                                        tmp_path, capsys):
    """--compile: one AOTInductor package per (shape, format, batch, cache length), on disk. A second
    decoder, and another model of the same shape (other weights), reuse it without compiling, each
    with its own weights (they are inputs of the step, not constants in it)."""
    from conftest import build_llama

    from styletune.decoding import compiled

    monkeypatch.setattr(compiled, "_LOADED", {})
    monkeypatch.setattr(compiled, "_directory", lambda: tmp_path)
    other = build_llama(llama.model.config.vocab_size, seed=1)
    builds = []
    real_build = compiled._build
    monkeypatch.setattr(compiled, "_build", lambda *a: builds.append(a[2]) or real_build(*a))
    for model in (llama.model, other, llama.model):
        for ref_logits, got, dec in _decode_both_ways(dataclass_lm(llama, model), PROMPTS, 3, compile=True):
            assert (got - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
        assert getattr(dec._forward, "package", None) is not None and dec._forward.package.is_file()
    assert len(builds) == 1
    monkeypatch.setattr(compiled, "_LOADED", {})  # a new process: loaded from disk, not rebuilt
    list(_decode_both_ways(llama, PROMPTS, 1, compile=True))
    list(_decode_both_ways(llama, PROMPTS, 1, compile=True, quantize="int8"))  # another format: another package
    assert len(builds) == 2 and len(list(tmp_path.glob("*.pt2"))) == 2
    # each build says so, once, on stderr; loading says nothing
    assert capsys.readouterr().err.count("compiling the decode step for this model's shape (once") == 2


def dataclass_lm(lm, model):
    import dataclasses

    return dataclasses.replace(lm, model=model)


def test_cli_compile_and_quantize_flags(tiny_model_dirs):
    from click.testing import CliRunner

    from styletune.cli import main

    r = CliRunner().invoke(main, ["generate", "Once upon", "--model", str(tiny_model_dirs["llama"]), "--greedy",
                                  "-n", "5", "--quantize", "int8-dynamic", "--compile", "--json"])
    assert r.exit_code == 0, r.output
    assert '"text"' in r.output
    bad = CliRunner().invoke(main, ["generate", "x", "--model", str(tiny_model_dirs["llama"]), "--quantize", "int3"])
    assert bad.exit_code == 2 and "int8-dynamic" in bad.output and "Traceback" not in bad.output
    both = CliRunner().invoke(main, ["generate", "x", "--model", str(tiny_model_dirs["llama"]), "--quantize", "fp16",
                                     "--compile"])
    assert both.exit_code == 2 and "--compile does not take --quantize fp16" in both.output
    assert "Traceback" not in both.output


def test_one_packed_copy_per_model(tiny_model_dirs):
    """Each packed set is a full copy of the weights: a new batch size replaces the last one."""
    lm = load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32")
    if not fast.can_pack(lm.model):
        pytest.skip("no MKL packed GEMM in this torch build")
    for rows in (4, 6, 6):
        list(_decode_both_ways(lm, (PROMPTS * rows)[:rows], 1))
    assert [k for k in fast._DERIVED[lm.model] if isinstance(k, tuple)] == [("packed", 6)]


@pytest.mark.parametrize("batch", [1, 2])
def test_step_logits_match_transformers_in_bf16(tiny_model_dirs, batch):
    """The lean step in bfloat16 against transformers' forward in bfloat16. Both round every product
    to bf16 (unit roundoff 2**-8 = 3.9e-3) but in different places (transformers' RMSNorm and rotary
    keep some fp32 intermediates the lean step rounds, and the other way round), so they agree to a
    few bf16 roundings of the logits: 3e-2 of their scale."""
    lm = load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16
    for ref_logits, got, dec in _decode_both_ways(lm, (PROMPTS * batch)[:batch], 6):
        assert (got - ref_logits).abs().max() <= 3e-2 * ref_logits.abs().max()
    assert not dec.packed  # MKL packing is for fp32 weights only


def test_finished_rows_leave_the_batch(llama, monkeypatch):
    """Per-sequence slots: a row that is done is not decoded any more (no padding steps)."""
    cfg = DecodingConfig(greedy=True, max_new_tokens=10, stop_at_eos=False)
    full = generate(llama, PROMPTS, cfg)
    stop = full[0].text[1:4]
    assert stop and stop not in full[1].text  # the premise: only row 0 meets the stop string
    sizes = []
    real = fast.SlotDecoder.decode
    monkeypatch.setattr(fast.SlotDecoder, "decode",
                        lambda self, slots, tokens: sizes.append(len(slots)) or real(self, slots, tokens))
    stopped = generate(llama, PROMPTS, DecodingConfig(greedy=True, max_new_tokens=10, stop_at_eos=False, stop=[stop]))
    assert stopped[0].finish_reason == "stop" and stopped[1].text == full[1].text
    assert sizes[0] == 2 and sizes[-1] == 1 and len(sizes) == 9


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary positions, and GPT-2's learned ones
@pytest.mark.parametrize("quantize,tol", [(None, 1e-5), ("int8", 5e-2), ("int8-dynamic", 5e-2), ("int4", 3e-1),
                                          ("fp16", 5e-3), ("auto", 5e-2)])
def test_slots_let_sequences_join_and_leave_between_steps(tiny_model_dirs, family, quantize, tol):
    """Continuous batching: sequences of different lengths, one joining after three steps and one
    leaving after four, each decoded at its own positions; every step's logits against transformers'
    forward over that sequence alone."""
    lm = load_model(str(tiny_model_dirs[family]), device="cpu", dtype="float32")
    dec = fast.SlotDecoder(lm.model, slots=4, max_len=64, quantize=quantize)
    seqs = {0: [5, 6, 7], 2: [8, 9, 10, 11, 12, 13]}
    logits = {s: dec.prefill(s, ids) for s, ids in seqs.items()}
    for step in range(8):
        if step == 3:  # a new request arrives
            seqs[1] = [20, 21]
            logits[1] = dec.prefill(1, seqs[1])
        if step == 4:  # a request finishes
            del seqs[0], logits[0]
        for s in seqs:
            with torch.no_grad():
                ref = lm.model(torch.tensor([seqs[s]])).logits[0, -1]
            assert (logits[s] - ref).abs().max() <= tol * ref.abs().max(), (step, s)
        tokens = {s: int(logits[s].argmax()) for s in seqs}
        out = dec.decode(list(seqs), [tokens[s] for s in seqs])
        for b, s in enumerate(seqs):
            seqs[s].append(tokens[s])
            logits[s] = out[b]
    assert dec.lengths[2] == 6 + 8 and dec.lengths[1] == 2 + 5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompts_of_different_lengths_prefill_together(tiny_model_dirs, family):
    """``prefill_rows``: prompts of three lengths in one left-padded pass and a much longer one in a
    pass of its own, into slots out of order; the first logits and those of the steps after, row by
    row, are transformers' over that sequence alone, and the padding never reaches a slot."""
    lm = load_model(str(tiny_model_dirs[family]), device="cpu", dtype="float32")
    dec = fast.SlotDecoder(lm.model, slots=4, max_len=64)
    seqs = {3: [5, 6, 7], 0: [8, 9, 10, 11, 12, 13], 2: [20], 1: list(range(30, 60))}
    assert sorted(map(sorted, fast._padding_groups([len(ids) for ids in seqs.values()]))) == [[0, 1, 2], [3]]
    out = dec.prefill_rows(list(seqs), [list(ids) for ids in seqs.values()])
    assert [dec.lengths[s] for s in (0, 1, 2, 3)] == [6, 30, 1, 3]
    assert all(float(kv[:, 2, :, 1:].abs().max()) == 0.0 for kv in dec.kv)  # the one-token prompt's slot
    for step in range(3):
        for b, s in enumerate(seqs):
            with torch.no_grad():
                ref = lm.model(torch.tensor([seqs[s]])).logits[0, -1]
            assert (out[b] - ref).abs().max() <= 1e-5 * ref.abs().max(), (step, s)
        tokens = [int(row.argmax()) for row in out]
        out = dec.decode(list(seqs), tokens)
        for s, t in zip(seqs, tokens):
            seqs[s].append(t)


def test_padding_groups_cover_every_prompt_and_at_most_double_the_tokens():
    for lengths in ([1], [5, 6, 7], [3, 1500, 10, 12], [4] * 8, [1, 100], [10, 10, 10, 40], list(range(1, 60, 7))):
        groups = fast._padding_groups(lengths)
        assert sorted(b for g in groups for b in g) == list(range(len(lengths)))
        for g in groups:
            assert len(g) * max(lengths[b] for b in g) <= 2 * sum(lengths[b] for b in g)
    assert len(fast._padding_groups([3, 1500, 10, 12])) == 2 and len(fast._padding_groups([4] * 8)) == 1


def test_slots_that_are_not_consecutive_copy_only_their_filled_positions(llama):
    """Decoding slots 0 and 2 of 3 gathers their KV (a copy): of the positions filled so far, not of
    the whole buffer, which in a server holds --max-model-len positions per slot (a gather of the
    whole buffer made 31 streams of SmolLM2 take 2.3 s a step instead of 79 ms)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    dec = fast.SlotDecoder(llama.model, slots=3, max_len=512)
    for s in range(3):
        dec.prefill(s, [5, 6, 7, 8][:2 + s])
    gathered = []

    class Gathers(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.index.Tensor and out.dim() == 5:  # (2, rows, kv heads, positions, hd)
                gathered.append(out.shape[3])
            return out

    with Gathers():
        out = dec.decode([0, 2], [9, 9])
    assert gathered and set(gathered) == {5}  # slot 2 holds 4 positions, and this token is the fifth
    with torch.no_grad():
        ref = llama.model(torch.tensor([[5, 6, 7, 8, 9]])).logits[0, -1]
    assert (out[1] - ref).abs().max() <= 1e-5 * ref.abs().max()


def _on_q4_1_grid(model):
    """The model with every matrix the decode step quantises snapped to a Q4_1-like grid: per group of
    32 inputs, 16 evenly spaced values from the group's minimum, step and minimum rounded to fp16 as a
    GGUF stores them (what the bundled SmolLM2, dequantised from Q4_1, looks like). GPT-2's Conv1D
    weights are (in, out): their groups run down the columns."""
    import copy

    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    conv1d = {id(m.weight) for m in model.modules() if isinstance(m, Conv1D)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.t() if id(p) in conv1d else p  # (out, in)
            if p.dim() != 2 or w.shape[1] % fast.INT4_GROUP:
                continue
            g = w.reshape(w.shape[0], -1, fast.INT4_GROUP)
            lo = g.amin(-1, keepdim=True).half().float()
            step = ((g.amax(-1, keepdim=True) - lo) / 15).half().float().clamp(min=1e-6)  # (an all-zero row)
            q = torch.round((g - lo) / step).clamp(0, 15)
            w.copy_((q * step + lo).reshape(w.shape))
    return model


def test_auto_format_follows_the_cpu(llama, tiny_gpt2, monkeypatch):
    """``--quantize auto`` stores int4 on the 4-bit grid and fp16 elsewhere on AVX-512 CPUs, and on AVX2
    CPUs for a model whose kernel step runs styletune's int products (a Llama, a GPT-2 with the tanh GELU,
    in fp32 on CPU), fp16 throughout for any other there; for such a model in steps of at most
    ``FEW_ROWS`` rows, Q8_0 in place of fp16. A compiled step's layers are int4 on the grid and int8
    elsewhere, and its head as eager auto's; without FBGEMM int4 on the grid and int8 elsewhere, whatever
    this machine is."""
    bf16 = copy.deepcopy(llama.model).to(torch.bfloat16)
    exact_gelu = copy.deepcopy(tiny_gpt2)
    exact_gelu.config.activation_function = "gelu"
    few, more = fast.FEW_ROWS, fast.FEW_ROWS + 1
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(fast, "_int_kernels", lambda: object())  # a build with the int products
    for model in (llama.model, tiny_gpt2):
        assert fast.auto_format(model=model) == fast.auto_format(model=model, rows=more) == "int4-fp16"
        assert fast.auto_format(model=model, rows=1) == fast.auto_format(model=model, rows=few) == "int4-q8"
        assert fast.auto_format(compile=True, model=model, rows=1) == "int4-grid-fp16-head"
    assert fast.auto_format() == fast.auto_format(model=bf16, rows=1) == "fp16"
    assert fast.auto_format(model=exact_gelu, rows=1) == "fp16"  # the PyTorch step
    monkeypatch.setattr(fast, "_int_kernels", lambda: None)  # without them (or STYLETUNE_KERNELS=0)
    assert fast.auto_format(model=llama.model, rows=1) == "fp16" and fast.auto_format(compile=True) == "int4-grid-fp16-head"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert fast.auto_format() == fast.auto_format(model=bf16) == "int4-fp16"
    assert fast.auto_format(model=llama.model, rows=1) == "int4-fp16"
    assert fast.auto_format(compile=True) == "int4-grid-fp16-head"
    for cpu in ("AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cpu)
        monkeypatch.setattr(fast, "has_fp16_kernel", lambda: False)  # an Arm build: no FBGEMM
        assert fast.auto_format() == fast.auto_format(compile=True) == "int4-grid"


def test_fp16_without_fbgemm_is_a_clear_error(llama, monkeypatch):
    monkeypatch.setattr(fast, "has_fp16_kernel", lambda: False)
    fast._DERIVED.pop(llama.model, None)
    with pytest.raises(StyletuneError, match="FBGEMM"):
        fast.FastDecoder(llama.model, batch=1, max_len=8, quantize="fp16")


def test_auto_on_avx2_stores_fp16(llama, monkeypatch):
    """On an AVX2 CPU without styletune's int products ``auto`` is fp16 throughout (fp16's logits are
    checked against transformers' in ``test_step_logits_match_transformers`` and the slot tests)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(fast, "_int_kernels", lambda: None)
    dec = fast.SlotDecoder(llama.model, slots=1, max_len=16, quantize="auto")
    assert dec.quantize == "fp16"
    assert isinstance(dec.layers[0]["qkv"], fast._Fp16Linear) and isinstance(dec.head, fast._Fp16Linear)


def _projections(layers, head) -> list:
    return [p for L in layers for p in L.values() if not isinstance(p, (torch.Tensor, tuple))] + [head]


@pytest.mark.skipif(fast._int_kernels() is None, reason="this CPU has neither AVX-512 VNNI nor AVX2")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_auto_reads_matrices_off_the_grid_as_q8_0_in_steps_of_few_rows(tiny_model_dirs, family):
    """Where the kernel step runs styletune's int products, ``auto`` reads a model off every grid as Q8_0
    (``--quantize int8``'s products, the same logits) in steps of at most ``FEW_ROWS`` rows, and as fp16
    in larger ones (``--quantize fp16``'s logits). A decoder of more slots switches per step, so a row
    decoded alone is decoded as by a decoder of one slot."""
    lm = load_model(str(tiny_model_dirs[family]), device="cpu", dtype="float32")
    fast._DERIVED.pop(lm.model, None)

    def decoders(quantize, slots):
        return fast.SlotDecoder(lm.model, slots=slots, max_len=32, quantize=quantize)

    one, four = decoders("auto", 1), decoders("auto", fast.FEW_ROWS + 2)
    assert one.quantize == "int4-q8" and four.quantize == "int4-fp16"
    assert all(isinstance(p, fast._Int8Grid) and not p.on_grid for p in _projections(one.layers, one.head))
    assert all(isinstance(p, fast._Fp16Linear) for p in _projections(*four._weights_for[False]))
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14]]
    tokens = [20, 21, 22, 23][:fast.FEW_ROWS + 1]

    def logits(dec, rows):
        for s in range(rows):
            dec.prefill(s, prompts[s])
        return dec.decode(list(range(rows)), tokens[:rows])

    alone = logits(four, 1)
    assert torch.equal(alone, logits(one, 1)) and torch.equal(alone, logits(decoders("int8", 1), 1))
    more = len(tokens)
    assert torch.equal(logits(four, more), logits(decoders("fp16", more), more))


def test_auto_keeps_one_copy_of_a_model_on_the_grid(llama):
    """For a model on the 4-bit grid, ``auto``'s formats for few and for many rows store the same matrices:
    one copy serves both."""
    snapped = _on_q4_1_grid(llama.model)
    one, many = (fast.FastDecoder(snapped, batch=b, max_len=8, quantize="auto") for b in (1, fast.FEW_ROWS + 1))
    assert all(getattr(p, "on_grid", False) for p in _projections(one.layers, one.head))
    assert one.layers is many.layers and one.head is many.head


def test_auto_stores_int4_only_where_it_loses_nothing(llama, monkeypatch):
    """``--quantize auto`` on an AVX-512 CPU without styletune's int products: matrices on a 4-bit grid go
    to int4, with logits as close to exact as bf16 activations allow (int4 of weights off the grid is
    several times further off); other matrices go to fp16, or to weight-only int8 in the format a compiled
    step takes."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(fast, "_int_kernels", lambda: None)
    snapped = _on_q4_1_grid(llama.model)
    assert all(fast.on_int4_grid(p) for p in snapped.parameters() if p.dim() == 2)
    assert not any(fast.on_int4_grid(p) for p in llama.model.parameters() if p.dim() == 2)

    def worst(model, quantize):
        ids = llama.tokenizer(PROMPTS[1], return_tensors="pt").input_ids
        dec = fast.SlotDecoder(model, slots=1, max_len=ids.shape[1] + 1, quantize=quantize)
        dec.prefill(0, ids[0, :-1].tolist())
        got = dec.decode([0], [int(ids[0, -1])])[0]
        with torch.no_grad():
            ref = model(ids).logits[0, -1]
        return float((got - ref).abs().max() / ref.abs().max()), dec

    on_grid, dec = worst(snapped, "auto")
    assert isinstance(dec.layers[0]["qkv"], fast._Int4Linear)
    assert isinstance(dec.head, fast._Int4Linear)  # the tied embedding is snapped too here
    off_grid, _ = worst(llama.model, "int4")
    assert on_grid < 1e-2 and on_grid * 3 < off_grid, (on_grid, off_grid)
    off_grid_auto, dec = worst(llama.model, "auto")
    assert dec.quantize == "int4-fp16"
    assert isinstance(dec.layers[0]["qkv"], fast._Fp16Linear) and isinstance(dec.head, fast._Fp16Linear)
    assert off_grid_auto < 1e-3, off_grid_auto  # fp16 weights: nothing lost but their rounding
    monkeypatch.setattr(fast, "has_fp16_kernel", lambda: False)  # "int4-grid", as a compiled step
    _, dec = worst(llama.model, "auto")
    assert dec.quantize == "int4-grid"
    assert isinstance(dec.layers[0]["qkv"], fast._Int8Linear) and isinstance(dec.head, fast._Int8Linear)


@pytest.mark.parametrize("cpu", ["AVX2", "AVX512"])  # int4 on both where the int products are built
def test_auto_greedy_text_on_a_4bit_model_is_the_exact_text(train_model_dirs, cpu, monkeypatch):
    """On a model whose weights are on the 4-bit grid (larger weights, so that the next-token
    distributions are peaked rather than near-uniform), the default (auto) decodes the same greedy
    tokens as the exact step, on either kind of CPU."""
    import dataclasses

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cpu)
    lm = load_model(str(train_model_dirs["llama"]), device="cpu", dtype="float32")
    lm = dataclasses.replace(lm, model=_on_q4_1_grid(lm.model))
    cfg = DecodingConfig(greedy=True, max_new_tokens=12, stop_at_eos=False)
    texts = {q: [s.token_ids for s in generate(dataclasses.replace(lm, quantize=q), PROMPTS, cfg)]
             for q in (None, "auto")}
    assert texts["auto"] == texts[None]


def test_a_compiled_decoder_from_an_empty_cache(llama):
    """The package takes two filled positions or more; a first step with nothing before it runs
    eagerly, and every step matches the eager decoder's."""
    compiled_dec = fast.FastDecoder(llama.model, batch=1, max_len=10, compile=True)
    eager_dec = fast.FastDecoder(llama.model, batch=1, max_len=10)
    assert getattr(compiled_dec._forward, "package", None) is not None
    for n, token in enumerate([5, 6, 7], start=1):
        mask = torch.ones(1, n, dtype=torch.long)
        got, ref = compiled_dec.step(torch.tensor([[token]]), mask), eager_dec.step(torch.tensor([[token]]), mask)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.fixture(scope="module")
def grid_lora_runs(tmp_path_factory, train_model_dirs, tokenizer):
    """A LoRA run over a tiny Llama and over a tiny GPT-2 whose weights are on the 4-bit grid (as the
    bundled SmolLM2's are), trained so that every adapted matrix's update is not zero."""
    from styletune.config import DataConfig, TrainConfig
    from styletune.training import train

    root = tmp_path_factory.mktemp("grid_runs")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(["The raven sat upon the bust of Pallas above my chamber door."] * 12))
    runs = {}
    for family in ("llama", "gpt2"):
        base = root / f"base-{family}"
        lm = load_model(str(train_model_dirs[family]), device="cpu", dtype="float32")
        _on_q4_1_grid(lm.model).save_pretrained(base)
        tokenizer.save_pretrained(base)
        runs[family] = root / family
        train(TrainConfig(out=str(runs[family]), model=str(base), lr=2e-2, max_steps=3, batch_size=2,
                          data=DataConfig(sources=[str(corpus)], block_size=16, val_fraction=0.2),
                          save_every=100, eval_max_new_tokens=2, device="cpu", dtype="float32"))
    return runs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_lora_run_over_a_4bit_base_decodes_the_base_in_int4(grid_lora_runs, family, monkeypatch):
    """A LoRA run's merged weights are off the 4-bit grid that its base is on. ``--quantize auto`` reads
    every adapted matrix as the base in int4 plus the update in low rank: logits as close to the
    merged model's as the base model's own int4 decoding is to it, where int4 of the merged weights
    is several times further off; and the same greedy text as exact decoding."""
    import dataclasses

    from styletune.lora import LOW_RANK_UPDATE

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    lm = load_model(str(grid_lora_runs[family]), device="cpu", dtype="float32")
    merged = [m for m in lm.model.modules() if hasattr(m, LOW_RANK_UPDATE)]
    assert len(merged) == (14 if family == "llama" else 8)  # every projection of both layers
    assert not any(fast.on_int4_grid(m.weight) for m in merged)  # the merged weights: off the grid
    assert all(float(getattr(m, LOW_RANK_UPDATE)[1].abs().max()) > 0 for m in merged)  # trained updates

    ids = lm.tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = lm.model(ids).logits[0, -1]

    def worst(quantize):
        fast._DERIVED.pop(lm.model, None)
        dec = fast.SlotDecoder(lm.model, slots=1, max_len=ids.shape[1] + 1, quantize=quantize)
        dec.prefill(0, ids[0, :-1].tolist())
        got = dec.decode([0], [int(ids[0, -1])])[0]
        return float((got - ref).abs().max() / ref.abs().max()), dec

    split, dec = worst("auto")
    assert dec.quantize == ("int4-q8" if fast._int_kernels() else "int4-fp16")  # Q8_0 or fp16 off the grid
    layers = [p for L in dec.layers for p in L.values() if not isinstance(p, (torch.Tensor, tuple))]
    assert layers and all(isinstance(p, fast._Int4LowRank) for p in layers)
    split_int4, dec = worst("int4")
    assert all(isinstance(p, fast._Int4LowRank) for L in dec.layers for p in L.values()
               if not isinstance(p, (torch.Tensor, tuple)))  # int4 of the base here too: nothing lost
    assert split_int4 == split
    splitting = fast._splitting_low_rank
    with pytest.MonkeyPatch.context() as mp:  # int4 of the merged weights
        mp.setattr(fast, "_splitting_low_rank", lambda Proj, split: splitting(Proj, False))
        lossy, dec = worst("int4")
    assert type(dec.layers[0]["qkv"]) is fast._Int4Linear
    assert split < 1e-2 and split * 3 < lossy, (split, lossy)

    # Compiled ahead of time, the same split (the update's tensors are inputs of the package, as the weights)
    fast._DERIVED.pop(lm.model, None)
    compiled = fast.FastDecoder(lm.model, batch=1, max_len=8, quantize="auto", compile=True)
    eager = fast.FastDecoder(lm.model, batch=1, max_len=8, quantize="auto")
    assert getattr(compiled._forward, "package", None) is not None
    assert isinstance(compiled.layers[0]["qkv"], fast._Int4LowRank)
    for n, token in enumerate(ids[0, :4].tolist(), start=1):
        mask = torch.ones(1, n, dtype=torch.long)
        got, want = compiled.step(torch.tensor([[token]]), mask), eager.step(torch.tensor([[token]]), mask)
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()

    fast._DERIVED.pop(lm.model, None)
    cfg = DecodingConfig(greedy=True, max_new_tokens=12, stop_at_eos=False)
    texts = {q: [s.token_ids for s in generate(dataclasses.replace(lm, quantize=q), PROMPTS, cfg)]
             for q in (None, "auto")}
    assert texts["auto"] == texts[None]


def test_a_stale_low_rank_update_is_not_used(grid_lora_runs, monkeypatch):
    """The int4 base is the weights minus the update kept beside them, taken only where that lands on
    the grid: weights changed after the merge (so that they no longer are base + update) are read
    as they are, as auto reads any matrix off the grid, and decode as the changed model does."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    lm = load_model(str(grid_lora_runs["llama"]), device="cpu", dtype="float32")
    attn = lm.model.model.layers[0].self_attn
    ids = [5, 6, 7, 8]
    with torch.no_grad():
        before = lm.model(torch.tensor([ids])).logits[0, -1]
        attn.q_proj.weight.mul_(1.5)
    dec = fast.SlotDecoder(lm.model, slots=1, max_len=8, quantize="auto")
    # q, k and v are one matrix, off every grid together: Q8_0 in a step of one row (fp16 without the int kernels)
    assert isinstance(dec.layers[0]["qkv"], fast._Int8Grid if fast._int_kernels() else fast._Fp16Linear)
    assert isinstance(dec.layers[0]["o"], fast._Int4LowRank) and isinstance(dec.layers[1]["qkv"], fast._Int4LowRank)
    dec.prefill(0, ids[:-1])
    got = dec.decode([0], [ids[-1]])[0]
    with torch.no_grad():
        ref = lm.model(torch.tensor([ids])).logits[0, -1]
    tol = 5e-2 if fast._int_kernels() else 1e-2  # Q8_0's tolerance in the slot tests, or fp16's here
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    assert (before - ref).abs().max() > 2 * tol * ref.abs().max()  # the tolerance tells the two models apart


def test_a_lora_run_splits_in_steps_of_few_rows(grid_lora_runs, monkeypatch):
    """The split pays at few rows only (``FEW_ROWS``): a step of more rows reads the merged
    weights as the format stores any matrix off the grid (fp16 here). The choice follows the rows a
    step decodes, not the slots the decoder holds, so one sequence alone in the server's many slots
    gets exactly the logits of a one-slot decoder (``generate`` of one prompt). The model's own int4
    layers, with no update, are one copy for every row count."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    lm = load_model(str(grid_lora_runs["llama"]), device="cpu", dtype="float32")
    rows = fast.FEW_ROWS + 1
    one = fast.SlotDecoder(lm.model, slots=1, max_len=8, quantize="auto")
    many = fast.SlotDecoder(lm.model, slots=rows, max_len=8, quantize="auto")
    assert isinstance(one.layers[0]["qkv"], fast._Int4LowRank) and isinstance(many.layers[0]["qkv"], fast._Fp16Linear)
    prompt, more = [5, 6, 7], [8, 9, 10]
    for slot in range(rows):
        many.prefill(slot, prompt)
    one.prefill(0, prompt)
    for token in more:  # steps of one row: the split, as in the one-slot decoder, to the bit
        alone = many.decode([0], [token])[0]
        assert torch.equal(alone, one.decode([0], [token])[0])
    assert isinstance(many.layers[0]["qkv"], fast._Int4LowRank) and many.layers[0]["qkv"] is one.layers[0]["qkv"]
    together = many.decode(list(range(1, rows)) + [0], [8] * (rows - 1) + [11])  # a step of many rows
    assert isinstance(many.layers[0]["qkv"], fast._Fp16Linear)
    with torch.no_grad():
        ref_alone = lm.model(torch.tensor([prompt + more])).logits[0, -1]
        ref = lm.model(torch.tensor([prompt + [8]])).logits[0, -1]
    assert (alone - ref_alone).abs().max() <= 1e-2 * ref_alone.abs().max()
    assert (together[0] - ref).abs().max() <= 1e-2 * ref.abs().max()
    base = load_model(str(grid_lora_runs["llama"].parent / "base-llama"), device="cpu", dtype="float32")
    few_slots, many_slots = (fast.SlotDecoder(base.model, slots=n, max_len=8, quantize="auto") for n in (1, 8))
    assert few_slots.layers is many_slots.layers and isinstance(few_slots.layers[0]["qkv"], fast._Int4Linear)


def test_codes_in_slices_are_the_codes_of_the_whole_matrix(monkeypatch):
    """The group codes are computed over slices of rows (``_SLICE`` numbers each); any slicing gives the
    codes, scales and errors of the whole matrix at once. The grid tests look at a few rows first and
    then at all of them: a matrix on a grid but for its last row is off it."""
    torch.manual_seed(0)
    w = torch.randn(70, 96) * 0.02  # rows of 96 inputs: slices of 1, 2 and 10 rows, the last one short
    whole = [fast._int4_groups(w), fast._int8_groups(w), fast._int8_groups(w, fp16_scales=True)]
    for numbers in (96, 200, 1000):
        monkeypatch.setattr(fast, "_SLICE", numbers)
        sliced = [fast._int4_groups(w), fast._int8_groups(w), fast._int8_groups(w, fp16_scales=True)]
        for a, b in zip(whole, sliced):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    q, scale, _ = whole[2]
    grid = (q.float().view(70, 3, 32) * scale[..., None]).view(70, 96)
    assert fast._int8_grid(grid) is not None and fast._int8_grid(w) is None
    grid[-1] = w[-1]
    assert fast._int8_grid(grid) is None
