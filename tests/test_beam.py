"""Beam search parity with transformers' ``generate(num_beams=N, do_sample=False)``.

Every test runs transformers and :func:`styletune.decoding.strategies.beam_search` on the same
tiny random model and prompts and compares the generated token ids exactly.  Hypothesis lengths
on the transformers side come from ``beam_indices`` (not from stripping padding), so an EOS equal
to the pad id is still compared.
"""

import copy

import pytest
import torch
from transformers import LogitsProcessorList

from styletune.config import DecodingConfig
from styletune.decoding.processors import NoRepeatNGram, ProcessorList, RepetitionPenalty, build_processors
from styletune.decoding.strategies import beam_search, forward_step, position_ids_from_mask, reorder_cache
from styletune.errors import StyletuneError

PROMPTS = {
    "single": ["Once upon a midnight dreary"],
    "batch": ["Once upon a midnight dreary", "The quick"],  # different lengths -> left padding
}
MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def left_tok(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def encode(tok, which):
    enc = tok(PROMPTS[which], return_tensors="pt", padding=True)
    if which == "batch":
        assert (enc.attention_mask[:, 0] == 0).any(), "the batch case must exercise left padding"
    return enc.input_ids, enc.attention_mask


def hf_beam(model, ids, mask, *, num_return_sequences=1, **kw):
    """transformers' beam search, as per-prompt lists of generated ids (EOS kept, padding dropped)."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, num_return_sequences=num_return_sequences, **kw)
    lengths = (out.beam_indices != -1).sum(-1).tolist()
    gen = out.sequences[:, ids.shape[1]:].tolist()
    flat = [g[:n] for g, n in zip(gen, lengths)]
    r = num_return_sequences
    return [flat[i * r:(i + 1) * r] for i in range(ids.shape[0])]


def both(model, ids, mask, *, num_beams, eos_token_id, max_new_tokens=MAX_NEW, length_penalty=1.0,
         num_return_sequences=2, hf_kwargs=None, processors=None):
    ours = beam_search(model, ids, mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                       eos_token_id=eos_token_id, processors=processors, length_penalty=length_penalty,
                       num_return_sequences=num_return_sequences)
    ref = hf_beam(model, ids, mask, num_beams=num_beams, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                  length_penalty=length_penalty, num_return_sequences=num_return_sequences, **(hf_kwargs or {}))
    return ours, ref


class EosRamp:
    """Adds ``slope * generated_length`` to the EOS score: EOS becomes likely after a few steps,
    so hypotheses finish at different lengths and the length penalty decides between them.
    Applied identically by both implementations (transformers applies ``logits_processor`` to
    the log-probabilities in beam search, as ``beam_search`` applies ``processors``)."""

    def __init__(self, eos, prompt_len, slope=0.3):
        self.eos, self.prompt_len, self.slope = eos, prompt_len, slope

    def __call__(self, input_ids, scores):
        out = scores.clone()
        out[:, self.eos] += self.slope * (input_ids.shape[1] - self.prompt_len)
        return out


@pytest.mark.parametrize("prompts", ["single", "batch"])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_parity_up_to_max_new_tokens(model, left_tok, num_beams, prompts):
    ids, mask = encode(left_tok, prompts)
    for nrs, lp in ((1, 1.0), (2, 1.0), (2, 2.0)):
        ours, ref = both(model, ids, mask, num_beams=num_beams, eos_token_id=0, num_return_sequences=nrs,
                         length_penalty=lp)
        assert ours == ref, (nrs, lp)
        assert len(ours) == ids.shape[0] and all(len(r) == nrs for r in ours)
    # The model's own EOS is never picked here: every hypothesis runs to the limit.
    assert all(len(h) == MAX_NEW for row in ours for h in row)


@pytest.mark.parametrize("prompts", ["single", "batch"])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_parity_when_eos_is_the_greedy_step3_token(model, left_tok, num_beams, prompts):
    ids, mask = encode(left_tok, prompts)
    greedy = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3, pad_token_id=0,
                            eos_token_id=None)
    eos = int(greedy[0, -1])
    ended = False
    for lp in (1.0, 2.0, -1.0):
        ours, ref = both(model, ids, mask, num_beams=num_beams, eos_token_id=eos, length_penalty=lp)
        assert ours == ref, lp
        ended |= any(h and h[-1] == eos and len(h) < MAX_NEW for row in ours for h in row)
    assert ended, "some returned hypothesis must end with the EOS"


@pytest.mark.parametrize("prompts", ["single", "batch"])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_parity_with_eos_and_length_penalty(model, left_tok, num_beams, prompts):
    ids, mask = encode(left_tok, prompts)
    eos = 0  # == pad id: lengths must come from the search, not from stripping padding
    results = {}
    for lp in (1.0, 0.0, 2.0, -1.0):
        ramp = EosRamp(eos, ids.shape[1])
        ours, ref = both(model, ids, mask, num_beams=num_beams, eos_token_id=eos, length_penalty=lp,
                         max_new_tokens=10, processors=ramp,
                         hf_kwargs={"logits_processor": LogitsProcessorList([ramp])})
        assert ours == ref, lp
        assert all(h[-1] == eos and len(h) < 10 for row in ours for h in row)
        results[lp] = ours
    assert len({str(r) for r in results.values()}) >= 2, "length_penalty must change the result here"


@pytest.mark.parametrize("prompts", ["single", "batch"])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_parity_with_no_repeat_ngram(model, left_tok, num_beams, prompts):
    ids, mask = encode(left_tok, prompts)
    ours, ref = both(model, ids, mask, num_beams=num_beams, eos_token_id=0,
                     processors=ProcessorList([NoRepeatNGram(2)]), hf_kwargs={"no_repeat_ngram_size": 2})
    assert ours == ref
    plain = beam_search(model, ids, mask, num_beams=num_beams, max_new_tokens=MAX_NEW, eos_token_id=0,
                        num_return_sequences=2)
    assert plain != ours
    for row in ours:
        for h in row:
            bigrams = list(zip(h, h[1:]))
            assert len(bigrams) == len(set(bigrams))


@pytest.mark.parametrize("num_beams", [2, 4])
def test_parity_with_repetition_penalty(model, left_tok, num_beams):
    # A strong signal that processors see log-probabilities, as in transformers' beam search
    # (applied to raw logits, the penalty would pick other tokens).
    ids, mask = encode(left_tok, "batch")
    ours, ref = both(model, ids, mask, num_beams=num_beams, eos_token_id=0,
                     processors=ProcessorList([RepetitionPenalty(1.3)]), hf_kwargs={"repetition_penalty": 1.3})
    assert ours == ref
    # Both repetition controls together, built from a DecodingConfig (same order as transformers).
    cfg = DecodingConfig(num_beams=num_beams, repetition_penalty=1.3, no_repeat_ngram_size=2).validate()
    shaping, sampling = build_processors(cfg)
    assert len(shaping) == 2 and not sampling
    ours, ref = both(model, ids, mask, num_beams=num_beams, eos_token_id=0, processors=shaping,
                     hf_kwargs={"repetition_penalty": 1.3, "no_repeat_ngram_size": 2})
    assert ours == ref


def test_max_length_caps_the_total_length(tiny_llama, left_tok):
    ids, mask = encode(left_tok, "batch")
    ours = beam_search(tiny_llama, ids, mask, num_beams=3, max_new_tokens=20, eos_token_id=0,
                       num_return_sequences=2, max_length=ids.shape[1] + 5)
    ref = hf_beam(tiny_llama, ids, mask, num_beams=3, max_new_tokens=5, eos_token_id=0, num_return_sequences=2)
    assert ours == ref
    assert all(len(h) == 5 for row in ours for h in row)


def test_each_step_forwards_only_the_new_token(tiny_gpt2, left_tok):
    ids, mask = encode(left_tok, "batch")
    shapes = []
    handle = tiny_gpt2.register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        out = beam_search(tiny_gpt2, ids, mask, num_beams=4, max_new_tokens=6, eos_token_id=0)
    finally:
        handle.remove()
    assert all(len(h) == 6 for row in out for h in row)
    assert shapes == [(2 * 4, ids.shape[1])] + [(2 * 4, 1)] * 5


def test_edge_cases(tiny_gpt2, left_tok):
    ids, mask = encode(left_tok, "batch")
    assert beam_search(tiny_gpt2, ids, mask, num_beams=2, max_new_tokens=0, eos_token_id=0,
                       num_return_sequences=2) == [[[], []], [[], []]]
    assert beam_search(tiny_gpt2, ids, mask, num_beams=2, max_new_tokens=5, eos_token_id=0,
                       max_length=ids.shape[1]) == [[[]], [[]]]
    with pytest.raises(StyletuneError):
        beam_search(tiny_gpt2, ids, mask, num_beams=2, max_new_tokens=3, eos_token_id=0, num_return_sequences=3)
    with pytest.raises(StyletuneError):
        beam_search(tiny_gpt2, ids, mask, num_beams=0, max_new_tokens=3, eos_token_id=0)
    # No EOS at all: runs to the limit.
    out = beam_search(tiny_gpt2, ids, mask, num_beams=2, max_new_tokens=4, eos_token_id=None)
    assert out == hf_beam(tiny_gpt2, ids, mask, num_beams=2, max_new_tokens=4, eos_token_id=None)


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_forward_step_with_cache_matches_a_full_forward(model, left_tok):
    ids, mask = encode(left_tok, "batch")
    logits, cache = forward_step(model, ids, mask, None)
    nxt = logits.argmax(-1, keepdim=True)
    # Swap the rows of the cache (and of everything else) to check reorder_cache too.
    order = torch.tensor([1, 0])
    cache = reorder_cache(cache, order)
    full_mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)[order]
    step_logits, _ = forward_step(model, nxt[order], full_mask, cache)
    full = model(input_ids=torch.cat([ids, nxt], dim=-1)[order], attention_mask=full_mask,
                 position_ids=position_ids_from_mask(full_mask)).logits[:, -1]
    torch.testing.assert_close(step_logits, full.float(), atol=1e-5, rtol=1e-4)
