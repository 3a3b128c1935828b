"""The decode loop: parity with transformers, seeds, stop strings, streaming, traces."""

import math

import pytest

from styletune.config import DecodingConfig
from styletune.decoding.engine import generate
from styletune.errors import StyletuneError
from styletune.models import load_model

PROMPTS = ["Once upon a midnight", "The quick brown fox jumps over"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, tiny_model_dirs):
    return load_model(str(tiny_model_dirs[request.param]), device="cpu", dtype="float32")


def hf_greedy(lm, prompts, n, **kw):
    tok = lm.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = lm.model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                            eos_token_id=None, **kw)
    return [row[enc["input_ids"].shape[1]:].tolist() for row in out]


def ids(samples):
    return [s.token_ids for s in samples]


def test_greedy_equals_transformers_single_and_batched(lm):
    for prompts in ([PROMPTS[0]], PROMPTS):
        got = generate(lm, prompts, DecodingConfig(greedy=True, max_new_tokens=20, stop_at_eos=False))
        assert ids(got) == hf_greedy(lm, prompts, 20)
        assert all(len(s.token_ids) == 20 and s.finish_reason == "length" for s in got)


def test_repetition_controls_match_transformers_greedy(lm):
    cfg = DecodingConfig(greedy=True, max_new_tokens=20, stop_at_eos=False, repetition_penalty=1.5,
                         no_repeat_ngram_size=2)
    got = generate(lm, PROMPTS, cfg)
    assert ids(got) == hf_greedy(lm, PROMPTS, 20, repetition_penalty=1.5, no_repeat_ngram_size=2)
    for s in got:  # no bigram of the output occurs twice
        bigrams = list(zip(s.token_ids, s.token_ids[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_top_k_1_and_eps_1_equal_greedy(lm):
    greedy = ids(generate(lm, PROMPTS, DecodingConfig(greedy=True, max_new_tokens=15, stop_at_eos=False)))
    topk1 = ids(generate(lm, PROMPTS, DecodingConfig(top_k=1, max_new_tokens=15, seed=3, stop_at_eos=False)))
    eps1 = ids(generate(lm, PROMPTS, DecodingConfig(eps=1.0, max_new_tokens=15, seed=3, stop_at_eos=False)))
    assert topk1 == greedy and eps1 == greedy


def test_eps_0_is_plain_sampling(lm):
    cfg = dict(max_new_tokens=15, seed=11, stop_at_eos=False)
    assert ids(generate(lm, PROMPTS, DecodingConfig(eps=0.0, **cfg))) == ids(generate(lm, PROMPTS, DecodingConfig(**cfg)))


def test_eps_mixes_greedy_and_sampled_steps(lm):
    cfg = DecodingConfig(eps=0.5, temperature=3.0, max_new_tokens=40, seed=5, stop_at_eos=False)
    [s] = generate(lm, [PROMPTS[0]], cfg, trace_top=1)
    ranks = [st.rank for st in s.steps]
    assert 1 in ranks and any(r > 1 for r in ranks)


def test_same_seed_same_text_different_seed_different_text(lm):
    cfg = DecodingConfig(max_new_tokens=20, seed=7, num_samples=3, temperature=2.0, stop_at_eos=False)
    a, b = generate(lm, PROMPTS, cfg), generate(lm, PROMPTS, cfg)
    assert ids(a) == ids(b)
    assert len({tuple(x) for x in ids(a)}) > 1  # samples of one prompt differ
    c = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=20, seed=8, num_samples=3, temperature=2.0,
                                             stop_at_eos=False))
    assert ids(c) != ids(a)


def test_a_sample_does_not_depend_on_the_rest_of_the_batch(lm):
    cfg = DecodingConfig(max_new_tokens=12, seed=21, num_samples=2, temperature=1.5, stop_at_eos=False)
    together = generate(lm, PROMPTS, cfg)
    alone = generate(lm, [PROMPTS[1]], cfg)
    assert ids(together)[2:] == ids(alone)
    # Sample i of a prompt uses seed + i: a single-sample run with seed+1 gives sample 1.
    second = generate(lm, [PROMPTS[1]], DecodingConfig(max_new_tokens=12, seed=22, temperature=1.5, stop_at_eos=False))
    assert ids(second) == [together[3].token_ids]


def test_stop_string_cuts_text(lm):
    [full] = generate(lm, [PROMPTS[0]], DecodingConfig(greedy=True, max_new_tokens=25, stop_at_eos=False))
    assert len(full.text) > 6
    stop = full.text[3:6]
    [cut] = generate(lm, [PROMPTS[0]], DecodingConfig(greedy=True, max_new_tokens=25, stop=[stop], stop_at_eos=False))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text
    assert full.text.startswith(lm.tokenizer.decode(cut.token_ids))


def test_eos_ends_a_sample(lm):
    [full] = generate(lm, [PROMPTS[0]], DecodingConfig(greedy=True, max_new_tokens=10, stop_at_eos=False))
    eos = full.token_ids[4]
    lm2 = type(lm)(**{**lm.__dict__})
    lm2.tokenizer = lm.tokenizer
    old = lm.tokenizer.eos_token_id
    try:
        lm.tokenizer.eos_token_id = eos  # pretend this token is EOS
        [s] = generate(lm2, [PROMPTS[0]], DecodingConfig(greedy=True, max_new_tokens=10))
    finally:
        lm.tokenizer.eos_token_id = old
    first = full.token_ids.index(eos)
    assert s.finish_reason == "eos" and s.token_ids == full.token_ids[:first]


def test_streamed_text_equals_final_text(lm):
    chunks = {}
    cfg = DecodingConfig(max_new_tokens=30, seed=1, num_samples=2, temperature=1.3, stop=["e t"], stop_at_eos=False)
    samples = generate(lm, PROMPTS, cfg, on_text=lambda row, t: chunks.setdefault(row, []).append(t))
    for row, s in enumerate(samples):
        assert "".join(chunks.get(row, [])) == s.text


def test_trace_steps(lm):
    [s] = generate(lm, [PROMPTS[0]], DecodingConfig(max_new_tokens=8, seed=2, stop_at_eos=False), trace_top=4)
    assert len(s.steps) == 8
    for st, tid in zip(s.steps, s.token_ids):
        assert st.chosen_id == tid and len(st.top) == 4
        assert st.top[0]["prob"] >= st.top[-1]["prob"]
        assert 0 < st.chosen_prob <= 1 and st.rank >= 1
        if st.rank <= 4:
            assert st.top[st.rank - 1]["id"] == tid
        assert 0 <= st.entropy <= math.log(len(lm.tokenizer)) + 1e-4


def test_beam_search_matches_transformers(lm):
    got = generate(lm, PROMPTS, DecodingConfig(num_beams=3, max_new_tokens=10, stop_at_eos=False))
    assert ids(got) == hf_greedy(lm, PROMPTS, 10, num_beams=3)


def test_prompt_beyond_context_is_a_clear_error(lm):
    too_long = "a b c d e f g h " * 200
    with pytest.raises(StyletuneError, match="exceeds the model's context"):
        generate(lm, [too_long], DecodingConfig(max_new_tokens=5))
    n = len(lm.tokenizer(PROMPTS[0])["input_ids"])
    with pytest.raises(StyletuneError, match="exceeds the model's context"):
        generate(lm, [PROMPTS[0]], DecodingConfig(max_new_tokens=lm.context_length - n + 1))


@pytest.mark.parametrize("cfg", [
    dict(max_new_tokens=-1), dict(top_p=0), dict(top_p=1.2), dict(top_k=0), dict(temperature=0), dict(eps=2),
    dict(num_samples=0), dict(num_beams=2, num_samples=3), dict(min_p=1.5),
])
def test_bad_settings(cfg, lm):
    with pytest.raises(StyletuneError):
        generate(lm, PROMPTS, DecodingConfig(**cfg))


def test_empty_prompt_starts_from_bos(lm):
    [s] = generate(lm, [""], DecodingConfig(greedy=True, max_new_tokens=5, stop_at_eos=False))
    assert len(s.token_ids) == 5
