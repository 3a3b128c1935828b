"""GPT-2 on the lean decode step (the decoders of tests/test_fast.py, GPT-2's layer arithmetic):
the same logits as transformers' forward, the same greedy tokens as transformers' ``generate``, int8
close to them, configs with options the step lacks left to transformers, and the server's scheduler
batching GPT-2 requests."""

import pytest
import torch

from styletune.config import DecodingConfig
from styletune.decoding import fast
from styletune.decoding.engine import generate, left_pad
from styletune.decoding.strategies import forward_step
from styletune.errors import StyletuneError
from styletune.models import load_model

PROMPTS = ["Once upon a midnight", "The quick brown fox jumps over", "Había una vez", "Why"]


@pytest.fixture(scope="module")
def gpt2(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["gpt2"]), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def peaked(train_model_dirs):
    """Larger initial weights (0.2): peaked next-token distributions, where int8 rounding could flip
    the top token if it were too coarse (with 0.02 every logit is near zero)."""
    return load_model(str(train_model_dirs["gpt2"]), device="cpu", dtype="float32")


def _gpt2(vocab, **config):
    """A tiny GPT-2 with some config options changed (weights of scale 0.2, so that they matter)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=3, n_head=4, bos_token_id=0,
                     eos_token_id=0, initializer_range=0.2, **config)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


def _close(got, ref, tol):
    got, ref = got.detach(), ref.detach()
    return float((got - ref).abs().max()) <= tol * float(ref.abs().max())


def test_supports_plain_gpt2_only(tiny_gpt2, tokenizer):
    assert fast.supports(tiny_gpt2)
    assert fast.supports(_gpt2(len(tokenizer), activation_function="gelu", scale_attn_by_inverse_layer_idx=True))
    # options the step does not implement: transformers' forward decodes these
    assert not fast.supports(_gpt2(len(tokenizer), reorder_and_upcast_attn=True))
    assert not fast.supports(_gpt2(len(tokenizer), add_cross_attention=True))
    assert not fast.supports(_gpt2(len(tokenizer), activation_function="quick_gelu"))


def _decode_both_ways(model, tok, prompts, steps, **options):
    """A left-padded batch, ``steps`` tokens decoded by transformers and by the lean step
    (:class:`~styletune.decoding.fast.FastDecoder`); yields (transformers logits, lean logits, decoder)."""
    ids, mask = left_pad([tok(p)["input_ids"] for p in prompts], 0, "cpu")
    ref, cache = forward_step(model, ids, mask)
    _, cache2 = forward_step(model, ids, mask)
    dec = fast.FastDecoder(model, batch=len(prompts), max_len=ids.shape[1] + steps, **options)
    dec.load_cache(cache2)
    for _ in range(steps):
        nxt = ref.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        ref, cache = forward_step(model, nxt, mask, cache)
        yield ref, dec.step(nxt, mask), dec


@pytest.mark.parametrize("quantize,tol,compile,batch", [
    (None, 1e-5, False, 1), (None, 1e-5, False, 2), (None, 1e-5, False, 5), (None, 1e-5, True, 2),
    ("int8", 5e-2, False, 2), ("int8-dynamic", 5e-2, False, 2), ("fp16", 5e-3, False, 2), ("fp16", 5e-3, False, 5)])
def test_step_logits_match_transformers(gpt2, quantize, tol, compile, batch, recwarn):
    """Prompts of different lengths, left-padded; every step's logits against transformers' forward.
    From PACK_MIN_ROWS rows on, fp32 decoding runs on MKL-packed weights (with GPT-2's biases)."""
    prompts = (PROMPTS * batch)[:batch]
    for ref, got, dec in _decode_both_ways(gpt2.model, gpt2.tokenizer, prompts, 6, quantize=quantize,
                                           compile=compile):
        assert _close(got, ref, tol)
    assert dec.packed == (quantize is None and not compile and batch >= fast.PACK_MIN_ROWS
                          and fast.can_pack(gpt2.model))
    assert not [str(w.message) for w in recwarn if "decode step failed" in str(w.message)]


def test_dense_step_layouts(gpt2, monkeypatch):
    """fp32 on CPU below PACK_MIN_ROWS rows: copies of the weights in the faster layouts (projections
    (out, in), the head (in, out)), made once per model. Without them (``can_relayout`` False) the step
    reads GPT-2's own tensors: Conv1D weights through a transposed view, the tied head."""
    attn = gpt2.model.transformer.h[0].attn
    dec = fast.FastDecoder(gpt2.model, batch=1, max_len=8)
    assert fast.can_relayout(gpt2.model) and "relayout" in fast._DERIVED[gpt2.model]
    qkv = dec.layers[0]["qkv"].weight
    assert qkv.is_contiguous() and torch.equal(qkv, attn.c_attn.weight.t())
    assert torch.equal(dec.head.weight, gpt2.model.lm_head.weight.t())
    assert fast.FastDecoder(gpt2.model, batch=2, max_len=8).layers[0]["qkv"] is dec.layers[0]["qkv"]  # made once
    monkeypatch.setattr(fast, "can_relayout", lambda model: False)
    dec = fast.FastDecoder(gpt2.model, batch=1, max_len=8)
    assert dec.layers[0]["qkv"].weight.data_ptr() == attn.c_attn.weight.data_ptr()
    assert dec.layers[0]["qkv"].bias is attn.c_attn.bias
    assert dec.head.weight is gpt2.model.transformer.wte.weight
    for ref, got, _ in _decode_both_ways(gpt2.model, gpt2.tokenizer, PROMPTS[:2], 3):
        assert _close(got, ref, 1e-5)


@pytest.mark.parametrize("batch", [1, fast.PACK_MIN_ROWS])
def test_derived_weights_follow_in_place_updates(tiny_model_dirs, batch):
    """The relaid-out (batch 1) and packed (PACK_MIN_ROWS) copies must follow weights changed in place."""
    lm = load_model(str(tiny_model_dirs["gpt2"]), device="cpu", dtype="float32")
    prompts = (PROMPTS * batch)[:batch]
    list(_decode_both_ways(lm.model, lm.tokenizer, prompts, 1))  # fills the cache
    with torch.no_grad():
        lm.model.transformer.h[0].mlp.c_proj.weight.mul_(3.0)
        lm.model.transformer.h[1].attn.c_attn.bias.add_(0.5)
        lm.model.lm_head.weight.add_(0.05)
    for ref, got, _ in _decode_both_ways(lm.model, lm.tokenizer, prompts, 2):
        assert _close(got, ref, 1e-5)


@pytest.mark.parametrize("config", [
    {"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False}, {"activation_function": "gelu"},
    {"activation_function": "relu", "n_inner": 48}, {"layer_norm_epsilon": 1e-2}])
def test_config_options_match_transformers(tokenizer, config):
    """GPT-2's config options the step implements, each against transformers with that config (checked
    first to change transformers' logits by more than the tolerance, so a step that ignored the option
    would fail)."""
    model, default = _gpt2(len(tokenizer), **config), _gpt2(len(tokenizer))
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        assert not _close(model(ids).logits, default(ids).logits, 1e-4)
    for ref, got, _ in _decode_both_ways(model, tokenizer, PROMPTS[:2], 4):
        assert _close(got, ref, 1e-5)


def _assert_no_near_ties(model, ids: list[int], continuation: list[int]) -> None:
    """The premise of comparing greedy tokens: along the reference's path the top two logits are
    further apart than the two computations differ (~1e-7 of their scale)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + continuation])).logits[0, len(ids) - 1:-1]
    top2 = logits.topk(2, dim=-1).values
    assert ((top2[:, 0] - top2[:, 1]) > 1e-4 * logits.abs().max()).all()


@pytest.mark.parametrize("lm_name", ["gpt2", "peaked"])
def test_greedy_generate_equals_transformers_generate(lm_name, request, monkeypatch):
    """styletune's greedy tokens (per-sequence slots on the lean step) against transformers'
    ``model.generate(do_sample=False)``: each prompt alone, then all four at once (left-padded for
    transformers)."""
    lm = request.getfixturevalue(lm_name)
    calls = []
    real = fast.SlotDecoder.decode
    monkeypatch.setattr(fast.SlotDecoder, "decode", lambda self, *a: calls.append(len(a[0])) or real(self, *a))
    tok, n = lm.tokenizer, 12
    cfg = DecodingConfig(greedy=True, max_new_tokens=n, stop_at_eos=False)
    encoded = [tok(p)["input_ids"] for p in PROMPTS]
    alone = []
    for p, ids in zip(PROMPTS, encoded):
        [sample] = generate(lm, [p], cfg)
        with torch.no_grad():
            ref = lm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        _assert_no_near_ties(lm.model, ids, ref[0, len(ids):].tolist())
        assert sample.token_ids == ref[0, len(ids):].tolist()
        alone.append(sample.token_ids)
    assert calls == [1] * (n - 1) * len(PROMPTS)  # the lean step decoded them
    calls.clear()
    batched = generate(lm, PROMPTS, cfg)
    assert calls == [len(PROMPTS)] * (n - 1)
    ids, mask = left_pad(encoded, 0, "cpu")
    with torch.no_grad():
        ref = lm.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                pad_token_id=0)
    assert [s.token_ids for s in batched] == ref[:, ids.shape[1]:].tolist() == alone


@pytest.mark.parametrize("quantize", ["int8", "int8-dynamic"])
def test_int8_quality(peaked, tiny_model_dirs, train_model_dirs, quantize):
    """Teacher-forced over 48 tokens: int8 logits within 5% of their scale of the exact ones, the same
    top token on most steps, and a different one only where the exact top two were within 2% of the
    scale of each other (a 32-wide model rounds coarsely: measured 4-5 such steps of 48, at margins
    under 0.7%, against a median margin of 6%); ``load_model(quantize=...)`` decodes GPT-2 with them."""
    model = peaked.model
    ids = torch.tensor([(peaked.tokenizer(" ".join(PROMPTS * 3))["input_ids"] * 3)[:48]])
    with torch.no_grad():
        ref = model(ids).logits[0].float()
    dec = fast.SlotDecoder(model, slots=1, max_len=ids.shape[1], quantize=quantize)
    rows = [dec.prefill(0, ids[0, :1].tolist())]
    for t in range(1, ids.shape[1]):
        rows.append(dec.decode([0], [int(ids[0, t])])[0])
    got = torch.stack(rows)
    assert _close(got, ref, 5e-2)
    flips = got.argmax(-1) != ref.argmax(-1)
    assert flips.float().mean() <= 0.15
    top2 = ref.topk(2, dim=-1).values
    assert ((top2[:, 0] - top2[:, 1])[flips] < 2e-2 * ref.abs().max()).all()
    lm = load_model(str(tiny_model_dirs["gpt2"]), device="cpu", dtype="float32", quantize=quantize)
    [s] = generate(lm, [PROMPTS[0]], DecodingConfig(greedy=True, max_new_tokens=8, stop_at_eos=False))
    assert len(s.token_ids) == 8


@pytest.mark.parametrize("batch", [1, 2])
def test_step_logits_match_transformers_in_bf16(tiny_model_dirs, batch):
    """bf16 against transformers in bf16: both round every product to bf16, so they agree to a few bf16
    roundings of the logits (as for Llama)."""
    lm = load_model(str(tiny_model_dirs["gpt2"]), device="cpu", dtype="bfloat16")
    for ref, got, dec in _decode_both_ways(lm.model, lm.tokenizer, PROMPTS[:batch], 6):
        assert _close(got, ref, 3e-2)
    assert not dec.packed


def test_the_context_is_not_exceeded(gpt2):
    """GPT-2's positions are learned: n_positions (128 here) is a hard limit. generate refuses more,
    the decoders refuse caches longer than it, and decoding right up to it matches transformers."""
    n_pos = gpt2.model.config.n_positions
    ids = gpt2.tokenizer(PROMPTS[1])["input_ids"]
    with pytest.raises(StyletuneError, match="exceeds the model's context"):
        generate(gpt2, [PROMPTS[1]], DecodingConfig(greedy=True, max_new_tokens=n_pos - len(ids) + 1))
    with pytest.raises(StyletuneError, match="the model has 128"):
        fast.SlotDecoder(gpt2.model, slots=1, max_len=n_pos + 1)
    cfg = DecodingConfig(greedy=True, max_new_tokens=n_pos - len(ids), stop_at_eos=False)
    [quick] = generate(gpt2, [PROMPTS[1]], cfg)
    gpt2.fast_decode = False
    try:
        [slow] = generate(gpt2, [PROMPTS[1]], cfg)
    finally:
        gpt2.fast_decode = True
    _assert_no_near_ties(gpt2.model, ids, slow.token_ids[:-1])
    assert quick.token_ids == slow.token_ids and len(quick.token_ids) == n_pos - len(ids)
    # a compiled step's cache is rounded up past n_positions; the positions it may fill are not
    dec = fast.FastDecoder(gpt2.model, batch=1, max_len=n_pos, compile=True)
    assert dec.max_len > n_pos and dec.limit == n_pos


def test_a_merged_lora_model_gets_the_lean_step(tiny_gpt2):
    """LoRA runs load merged (models.load_run_model): a plain GPT2LMHeadModel again. The peft wrapper
    itself decodes through transformers."""
    import copy

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(tiny_gpt2), LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                                                  fan_in_fan_out=True, init_lora_weights=False))
    assert not fast.supports(wrapped)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = wrapped(ids).logits[0, -1]
    merged = wrapped.merge_and_unload()
    assert fast.supports(merged)
    dec = fast.SlotDecoder(merged, slots=1, max_len=8)
    dec.prefill(0, [5, 6, 7])
    assert _close(dec.decode([0], [8])[0], want, 1e-5)


def test_the_scheduler_batches_gpt2_requests(gpt2):
    """The server's scheduler decodes GPT-2 requests together now, each giving the text ``generate``
    gives alone with its settings and seed."""
    from styletune.decoding.scheduler import Request, Scheduler

    sched = Scheduler(gpt2, max_concurrency=4, max_len=64)
    try:
        assert sched.batched
        jobs = [(PROMPTS[i], 10 + i, 8 + i) for i in range(4)]
        reqs = [Request(prompt=p, cfg=DecodingConfig(max_new_tokens=n, temperature=1.1, stop_at_eos=False).validate(),
                        seed=seed) for p, seed, n in jobs]
        for r in reqs:
            sched.submit(r)
        texts = []
        for r in reqs:
            parts = []
            while True:
                event = r.events.get(timeout=60)
                assert event.kind != "error", event.error
                if event.kind == "done":
                    break
                parts.append(event.text)
            texts.append("".join(parts))
        assert sched.max_batch_seen > 1
    finally:
        sched.close()
    for (p, seed, n), text in zip(jobs, texts):
        [alone] = generate(gpt2, [p], DecodingConfig(max_new_tokens=n, temperature=1.1, stop_at_eos=False, seed=seed))
        assert text == alone.text


def test_requests_admitted_together_are_prefilled_together_and_a_bad_one_fails_alone(gpt2, monkeypatch):
    """Requests waiting when the scheduler admits are prefilled in one ``prefill_rows`` call; when that
    call fails (here: one prompt longer than a slot), each is prefilled alone, the bad one gets its
    error and gives its slot back, and the others start from transformers' logits for their prompt."""
    from styletune.decoding.engine import encode_prompts
    from styletune.decoding.scheduler import Request, Scheduler

    sched = Scheduler(gpt2, max_concurrency=4, max_len=32)
    sched.close()  # its thread stopped: this test calls _admit itself
    calls = []
    real = sched.decoder.prefill_rows
    monkeypatch.setattr(sched.decoder, "prefill_rows", lambda slots, prompts: calls.append(len(slots))
                        or real(slots, prompts))
    cfg = DecodingConfig(max_new_tokens=3, greedy=True).validate()
    good = [Request(prompt=p, cfg=cfg, seed=0) for p in PROMPTS[:2]]
    sched.waiting.put(good[0])
    sched.waiting.put(good[1])
    sched._admit()
    assert calls == [2] and [a.request for a in sched.active] == good
    bad = Request(prompt="word " * 40, cfg=cfg, seed=0)
    sched.waiting.put(bad)
    sched.waiting.put(good[0])
    sched._admit()
    assert calls == [2, 2, 1, 1]  # together (it raised), then one at a time
    event = bad.events.get_nowait()
    assert event.kind == "error" and "a slot holds 32 positions" in event.error
    assert len(sched.active) == 3 and len(sched.free) == 1
    for a in sched.active:
        [ids] = encode_prompts(gpt2.tokenizer, [a.request.prompt])
        with torch.no_grad():
            want = gpt2.model(torch.tensor([ids])).logits[0, -1]
        assert _close(a.logits, want, 1e-5)
