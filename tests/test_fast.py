"""The lean Llama decode step: same logits as transformers, and the int8 variant close to them."""

import pytest
import torch

from styletune.config import DecodingConfig
from styletune.decoding import fast
from styletune.decoding.engine import generate, left_pad
from styletune.decoding.strategies import forward_step
from styletune.models import load_model

PROMPTS = ["Once upon a midnight", "The quick brown fox jumps over"]


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32")


def test_supported_architectures(llama, tiny_gpt2):
    assert fast.supports(llama.model)
    assert not fast.supports(tiny_gpt2)


@pytest.mark.parametrize("quantize,tol,compile", [(None, 1e-5, False), ("int8", 5e-2, False),
                                                  ("int8-dynamic", 5e-2, False), (None, 1e-5, True),
                                                  ("int8-dynamic", 5e-2, True)])
def test_step_logits_match_transformers(llama, quantize, tol, compile, recwarn):
    """Decode 6 tokens for a left-padded batch both ways and compare every step's logits."""
    tok = llama.tokenizer
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    ids, mask = left_pad(rows, tok.pad_token_id, "cpu")
    ref_logits, cache = forward_step(llama.model, ids, mask)
    _, cache2 = forward_step(llama.model, ids, mask)
    dec = fast.FastLlamaDecoder(llama.model, batch=2, max_len=ids.shape[1] + 6, quantize=quantize, compile=compile)
    dec.load_cache(cache2)
    for _ in range(6):
        nxt = ref_logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        ref_logits, cache = forward_step(llama.model, nxt, mask, cache)
        got = dec.step(nxt, mask)
        scale = ref_logits.abs().max()
        assert (got - ref_logits).abs().max() <= tol * scale
    # A compiled step that fell back to eager would warn; it must not have.
    assert not [str(w.message) for w in recwarn if "decode step failed" in str(w.message)]
    if compile:
        assert dec.max_len % fast.COMPILE_BUCKET == 0  # fixed, bucketed shapes


def test_engine_uses_the_fast_step_and_matches_the_slow_path(llama, monkeypatch):
    calls = []
    real = fast.FastLlamaDecoder.step
    monkeypatch.setattr(fast.FastLlamaDecoder, "step", lambda self, *a: calls.append(1) or real(self, *a))
    cfg = DecodingConfig(max_new_tokens=10, seed=3, temperature=1.3, num_samples=2, stop_at_eos=False)
    quick = generate(llama, PROMPTS, cfg)
    assert len(calls) == 9  # the first token comes from the prompt pass
    llama.fast_decode = False
    try:
        slow = generate(llama, PROMPTS, cfg)
    finally:
        llama.fast_decode = True
    assert [s.token_ids for s in quick] == [s.token_ids for s in slow]


@pytest.mark.parametrize("quantize", ["int8", "int8-dynamic"])
def test_int8_options_generate(tiny_model_dirs, quantize):
    lm = load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32", quantize=quantize)
    assert lm.quantize == quantize
    [s] = generate(lm, [PROMPTS[0]], DecodingConfig(greedy=True, max_new_tokens=8, stop_at_eos=False))
    assert len(s.token_ids) == 8


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(llama, monkeypatch):
    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    cfg = DecodingConfig(greedy=True, max_new_tokens=6, stop_at_eos=False)
    eager = generate(llama, PROMPTS, cfg)
    llama.compile = True
    try:
        with pytest.warns(UserWarning, match="torch.compile of the decode step failed"):
            compiled = generate(llama, PROMPTS, cfg)
    finally:
        llama.compile = False
    assert [s.token_ids for s in compiled] == [s.token_ids for s in eager]


def test_cli_compile_and_quantize_flags(tiny_model_dirs):
    from click.testing import CliRunner

    from styletune.cli import main

    r = CliRunner().invoke(main, ["generate", "Once upon", "--model", str(tiny_model_dirs["llama"]), "--greedy",
                                  "-n", "5", "--quantize", "int8-dynamic", "--compile", "--json"])
    assert r.exit_code == 0, r.output
    assert '"text"' in r.output
    bad = CliRunner().invoke(main, ["generate", "x", "--model", str(tiny_model_dirs["llama"]), "--quantize", "int4"])
    assert bad.exit_code == 2 and "int8-dynamic" in bad.output
