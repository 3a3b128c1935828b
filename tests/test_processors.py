"""Each decoding rule against its transformers counterpart, on random scores."""

import pytest
import torch
from transformers.generation import logits_process as hf

from styletune.decoding import processors as P
from styletune.errors import StyletuneError


def random_inputs(seed=0, batch=3, vocab=50, seq=12):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, vocab, generator=g) * 3
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return ids, scores


CASES = [
    (lambda: P.Temperature(0.7), lambda: hf.TemperatureLogitsWarper(0.7)),
    (lambda: P.Temperature(1.8), lambda: hf.TemperatureLogitsWarper(1.8)),
    (lambda: P.TopK(1), lambda: hf.TopKLogitsWarper(1)),
    (lambda: P.TopK(5), lambda: hf.TopKLogitsWarper(5)),
    (lambda: P.TopK(500), lambda: hf.TopKLogitsWarper(500)),
    (lambda: P.TopP(0.9), lambda: hf.TopPLogitsWarper(0.9)),
    (lambda: P.TopP(0.3), lambda: hf.TopPLogitsWarper(0.3)),
    (lambda: P.TopP(1.0), lambda: hf.TopPLogitsWarper(1.0)),
    (lambda: P.MinP(0.1), lambda: hf.MinPLogitsWarper(0.1)),
    (lambda: P.MinP(0.9), lambda: hf.MinPLogitsWarper(0.9)),
    (lambda: P.RepetitionPenalty(1.3), lambda: hf.RepetitionPenaltyLogitsProcessor(1.3)),
    (lambda: P.RepetitionPenalty(0.8), lambda: hf.RepetitionPenaltyLogitsProcessor(0.8)),
    (lambda: P.NoRepeatNGram(1), lambda: hf.NoRepeatNGramLogitsProcessor(1)),
    (lambda: P.NoRepeatNGram(2), lambda: hf.NoRepeatNGramLogitsProcessor(2)),
    (lambda: P.NoRepeatNGram(3), lambda: hf.NoRepeatNGramLogitsProcessor(3)),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ours,theirs", CASES)
def test_matches_transformers(ours, theirs, seed):
    # A small vocabulary and a long sequence make repeated n-grams (and so bans) certain.
    ids, scores = random_inputs(seed, vocab=8 if "NoRepeat" in repr(ours()) else 50, seq=20)
    before = scores.clone()
    got = ours()(ids, scores)
    want = theirs()(ids, scores.clone())
    assert torch.equal(scores, before), "a rule must not modify its input"
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite])


def test_no_repeat_ngram_actually_bans_something():
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    out = P.NoRepeatNGram(3)(ids, torch.zeros(1, 5))
    assert out[0, 3] == -float("inf") and torch.isfinite(out[0, [0, 1, 2, 4]]).all()


def test_top_p_keeps_the_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = P.TopP(0.8)(None, scores)
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()


@pytest.mark.parametrize("make", [
    lambda: P.Temperature(0), lambda: P.Temperature(-1), lambda: P.TopK(0), lambda: P.TopK(2.5),
    lambda: P.TopP(0), lambda: P.TopP(1.5), lambda: P.MinP(-0.1), lambda: P.RepetitionPenalty(0),
    lambda: P.NoRepeatNGram(0),
])
def test_bad_arguments_are_named(make):
    with pytest.raises(StyletuneError):
        make()
