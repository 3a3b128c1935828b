"""Evaluation: sliding-window perplexity against plain forward passes, the n-gram index
against brute force, style features against hand-computed numbers, and a whole
`evaluate` + `write_report` on a tiny run trained here to memorise its corpus."""

import dataclasses
import html
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from styletune.config import DataConfig, TrainConfig
from styletune.errors import StyletuneError
from styletune.evaluation import (
    STYLE_DISTANCE_DEFINITION,
    STYLE_FEATURES,
    EvalReport,
    NgramIndex,
    _locate_run,
    choose_prompts,
    distinctive_words,
    evaluate,
    memorization_rate,
    memorization_warning,
    perplexity,
    sentences_of,
    sliding_window_nll,
    style_distance,
    style_profile,
    summary_lines,
    windowed_ttr,
    write_report,
)
from styletune.report import visible_text


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------- perplexity


def token_losses(model, ids):
    """Per-token losses of one plain forward pass (position t predicts token t+1)."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].float()
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none")


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, 300, (50,), generator=torch.Generator().manual_seed(0))


def test_window_covering_the_text_equals_a_plain_forward_pass(tiny_gpt2, stream):
    nll, n = sliding_window_nll(tiny_gpt2, stream, window=64, stride=32)
    expected = token_losses(tiny_gpt2, stream)
    assert n == len(stream) - 1
    assert perplexity(nll, n) == pytest.approx(math.exp(expected.mean().item()), rel=1e-5)
    # The same as a list of ints, and for a stream exactly one window long.
    nll2, n2 = sliding_window_nll(tiny_gpt2, stream.tolist(), window=50, stride=25)
    assert (nll2, n2) == pytest.approx((nll, n), rel=1e-5)


@pytest.mark.parametrize("window,stride", [(16, 8), (16, 5), (10, 9), (12, 1)])
def test_sliding_window_matches_a_manual_loop(tiny_gpt2, stream, window, stride):
    # Score every token once, with the window that first reaches it, context as far back as that window goes.
    expected, scored, prev_end, begin = 0.0, [], 0, 0
    while True:
        end = min(begin + window, len(stream))
        losses = token_losses(tiny_gpt2, stream[begin:end])  # losses[k] is token begin + k + 1
        for t in range(max(prev_end, begin + 1), end):
            expected += losses[t - begin - 1].item()
            scored.append(t)
        prev_end = end
        if end == len(stream):
            break
        begin += stride
    assert scored == list(range(1, len(stream)))  # every token but the first, exactly once
    for batch_size in (None, 1, 3):
        nll, n = sliding_window_nll(tiny_gpt2, stream, window, stride, batch_size=batch_size)
        assert n == len(stream) - 1
        assert nll == pytest.approx(expected, rel=1e-5)


def test_stride_equal_to_window_is_the_sum_of_independent_chunks(tiny_gpt2, stream):
    chunks = [stream[i:i + 16] for i in range(0, len(stream), 16)]
    expected = sum(token_losses(tiny_gpt2, c).sum().item() for c in chunks if len(c) > 1)
    nll, n = sliding_window_nll(tiny_gpt2, stream, window=16, stride=16)
    assert n == sum(len(c) - 1 for c in chunks)
    assert nll == pytest.approx(expected, rel=1e-5)


def test_sliding_window_arguments(tiny_gpt2):
    assert sliding_window_nll(tiny_gpt2, [5], 16, 8) == (0.0, 0)
    with pytest.raises(StyletuneError, match="stride"):
        sliding_window_nll(tiny_gpt2, [1, 2, 3], 16, 17)
    with pytest.raises(StyletuneError, match="window"):
        sliding_window_nll(tiny_gpt2, [1, 2, 3], 1, 1)


# ---------------------------------------------------------------------------------- n-grams


def brute_ngrams(tokens, n):
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def brute_longest(corpus, sample, n):
    """Longest run of ``sample`` occurring in ``corpus`` (>= n tokens), by brute force."""
    text = "," + ",".join(map(str, corpus)) + ","
    best = 0
    for i in range(len(sample)):
        for j in range(i + max(n, best + 1), len(sample) + 1):
            if "," + ",".join(map(str, sample[i:j])) + "," in text:
                best = j - i
            else:
                break
    return best


@pytest.mark.parametrize("moduli,bases", [(None, None), ((7,), (3,)), ((5, 3), (2, 2))],
                         ids=["real-hash", "colliding-hash", "colliding-pair"])
def test_ngram_index_agrees_with_brute_force(moduli, bases):
    """Tiny moduli make almost every n-gram collide: the answers must still be exact."""
    kw = {} if moduli is None else {"moduli": moduli, "bases": bases}
    rng = random.Random(0)
    for trial in range(6):
        vocab, n = rng.choice([(3, 3), (4, 4), (50, 2)])
        corpus = [rng.randrange(vocab) for _ in range(rng.randrange(n, 400))]
        index = NgramIndex(corpus, n, **kw)
        known = brute_ngrams(corpus, n)
        for _ in range(5):
            # Half copied from the corpus (so hits exist), half random.
            start = rng.randrange(len(corpus))
            sample = corpus[start:start + rng.randrange(0, 30)] + [rng.randrange(vocab) for _ in range(rng.randrange(0, 30))]
            got = index.contains(sample).tolist()
            assert got == [tuple(sample[i:i + n]) in known for i in range(len(sample) - n + 1)]
            length, pos = index.longest_span(sample)
            assert length == brute_longest(corpus, sample, n)
            if length:
                assert any(corpus[pos:pos + length] == sample[i:i + length] for i in range(len(sample)))
            else:
                assert pos == -1


def test_ngram_index_hashes_are_int64_and_distinct_for_distinct_ngrams():
    corpus = torch.randint(0, 50_000, (20_000,), generator=torch.Generator().manual_seed(1))
    index = NgramIndex(corpus, 8)
    assert index.sorted_hashes.dtype == torch.int64 and len(index) == 20_000 - 7
    assert torch.equal(index.sorted_hashes, index.hash_ngrams(corpus)[index.positions])
    # No collision among 20k random 8-grams with the real hash.
    assert index.sorted_hashes.unique().numel() == len(brute_ngrams(corpus.tolist(), 8))


def test_longest_span_on_a_constructed_example():
    eos = 0
    corpus = list(range(1, 21)) + [eos] + [5, 6, 7, 30, 31, 32, 33, 34] + [eos] + [40, 41, 42]
    index = NgramIndex(corpus, 3)
    sample = [99, 5, 6, 7, 8, 9, 10, 11, 77, 30, 31, 32, 33]
    # 5..11 (7 tokens) at corpus position 4; 30..33 is only 4 long; 5 6 7 also occurs at 21.
    assert index.longest_span(sample) == (7, 4)
    assert index.longest_span([5, 6, 7, 30, 31]) == (5, 21)
    assert index.longest_span([5, 6, 99, 30, 31]) == (0, -1)
    assert index.longest_span([5, 6]) == (0, -1)  # shorter than n
    assert index.contains(sample).tolist() == [False, True, True, True, True, True, False, False, False, True, True]
    rate, found, checked = memorization_rate(index, [sample, [5, 6], [40, 41, 42]])
    assert (found, checked) == (7 + 1, 11 + 1) and rate == pytest.approx(8 / 12)


def test_memorization_warning():
    assert memorization_warning(0.099, 8) is None
    msg = memorization_warning(0.12, 8)
    assert msg.startswith("12% of the tuned model's 8-grams are copied verbatim") and "memorising" in msg


def test_choose_prompts_is_seeded_and_distinct(tokenizer):
    eos = tokenizer.eos_token_id
    texts = [f"Document number {i} starts here and goes on" for i in range(10)]
    ids = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
    stream = torch.tensor(ids)
    docs = []
    start = 0
    for k, t in enumerate(ids):
        if t == eos:
            docs.append((start, k))
            start = k + 1
    a = choose_prompts(stream, docs, tokenizer, 4, seed=3)
    assert a == choose_prompts(stream, docs, tokenizer, 4, seed=3)
    assert len(set(a)) == 4 and all(re.fullmatch(r"Document number \d starts", p) for p in a)
    assert a != choose_prompts(stream, docs, tokenizer, 4, seed=4)
    many = choose_prompts(stream, docs, tokenizer, 13, seed=3)
    assert len(many) == 13 and len(set(many)) == 10 and many[10:] == many[:3]


# ---------------------------------------------------------------------------------- style

TEXT = 'The cat sat. "Run!" the cat said, quickly; then: no?\n— Yes, sir.'


def test_style_profile_hand_computed():
    assert sentences_of(TEXT) == ["The cat sat", '"Run', "the cat said, quickly; then: no", "— Yes, sir"]
    p = style_profile([TEXT])
    # Sentences of 3, 1, 6 and 2 words.
    assert p["sentences"] == 4 and p["sentence_length_mean"] == pytest.approx(3.0)
    assert p["sentence_length_std"] == pytest.approx(math.sqrt((0 + 4 + 9 + 1) / 4))
    # The cat sat Run the cat said quickly then no Yes sir
    lengths = [3, 3, 3, 3, 3, 3, 4, 7, 4, 2, 3, 3]
    assert p["words"] == 12 and p["word_length_mean"] == pytest.approx(41 / 12)
    assert p["word_length_std"] == pytest.approx(math.sqrt(sum((x - 41 / 12) ** 2 for x in lengths) / 12))
    assert p["type_token_ratio"] == pytest.approx(10 / 12)  # the, cat repeat
    chars = 64
    assert p["characters"] == chars == len(TEXT)
    assert p["commas_per_1000"] == pytest.approx(2 * 1000 / chars)
    for key in ("semicolons_per_1000", "colons_per_1000", "exclamations_per_1000", "questions_per_1000"):
        assert p[key] == pytest.approx(1000 / chars), key
    assert p["quotes_per_1000"] == pytest.approx(2 * 1000 / chars)
    assert p["dialogue_share"] == pytest.approx(2 / 4)  # '"Run' has a quote, '— Yes, sir' starts with a dash


def test_style_profile_details():
    # An apostrophe inside a word is no quotation mark; single quotes around a word are.
    assert style_profile(["I don't know. 'Hi' she said."])["quotes_per_1000"] == pytest.approx(2000 / 28)
    assert style_profile([])["sentence_length_mean"] == 0.0
    words = [f"w{i % 50}" for i in range(250)]
    assert windowed_ttr(words) == pytest.approx(0.5)  # two windows of 100 with 50 types; the last 50 ignored
    assert windowed_ttr(words[:30]) == pytest.approx(1.0)  # shorter than a window: the whole text
    # Unicode words.
    assert style_profile(["Había una vez."])["word_length_mean"] == pytest.approx(11 / 3)


def test_distinctive_words_and_distance():
    corpus = ["The raven said nevermore, nevermore. The raven flew.", "Nevermore! Said the raven and the cat"]
    rows = distinctive_words(corpus, k=3, others={"base": ["the dog"], "tuned": ["raven raven nevermore cat"]})
    assert [r["word"] for r in rows] == ["nevermore", "raven", "cat"]  # 'the', 'said', 'and' are stopwords
    assert rows[0]["corpus"] == pytest.approx(3 * 1000 / 15)
    assert rows[0]["base"] == 0.0 and rows[1]["tuned"] == pytest.approx(500.0)

    words = [r["word"] for r in rows]
    p = style_profile(corpus, words)
    assert style_distance(p, p) == 0.0
    q = dict(p, commas_per_1000=2 * p["commas_per_1000"])
    assert style_distance(q, p) == pytest.approx(1 / (len(STYLE_FEATURES) + 1))  # 12 features + word rates
    far = style_profile(["zzz"], words)
    assert 0.5 < style_distance(far, p) <= 1.0
    assert " ".join(style_distance.__doc__.split()).find(STYLE_DISTANCE_DEFINITION) >= 0


def test_visible_text():
    assert visible_text("a\x0eb\nc\td\x7f") == "a\u240eb\nc\td\u2421"


# ---------------------------------------------------------------------------------- evaluate on a run

SENTENCES = ["Once upon a midnight dreary, while I pondered, weak and weary.",
             "The quick brown fox jumps over the lazy dog!",
             "Why did the chicken cross the road? To get to the other side."]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, tokenizer):
    """A tiny GPT-2 fully fine-tuned at a high learning rate on three sentences repeated: it memorises them.
    Its base is freshly initialised (large initial weights, so it writes noise)."""
    from conftest import build_gpt2

    root = tmp_path_factory.mktemp("evaluate")
    base = root / "base"
    build_gpt2(len(tokenizer), initializer_range=0.2).save_pretrained(base)
    tokenizer.save_pretrained(base)
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(SENTENCES * 20), encoding="utf-8")
    cfg = TrainConfig(out=str(root / "run"), model=str(base), method="full", lr=1e-2, warmup_fraction=0.0,
                      data=DataConfig(sources=[str(corpus)], block_size=128, val_fraction=0.1), batch_size=4,
                      max_steps=150, eval_every=75, save_every=1000, eval_max_new_tokens=5, seed=1, device="cpu",
                      dtype="float32")
    with pytest.MonkeyPatch.context() as mp:
        # Module fixtures run before conftest's per-test cache setting: use the same cache.
        mp.setenv("STYLETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        from styletune.training import train

        train(cfg)
        report = evaluate(cfg.out, device="cpu", dtype="float32")
    return {"root": root, "run": Path(cfg.out), "base": base, "corpus": corpus, "report": report}


def test_evaluate_returns_the_documented_numbers(overfit):
    r = overfit["report"]
    assert isinstance(r, EvalReport) and r.run == str(overfit["run"]) and r.base == str(overfit["base"])
    p = r.perplexity
    assert {"base", "tuned", "tokens", "source", "window", "stride"} <= set(p)
    assert p["source"] == "validation split" and p["tokens"] > 50 and (p["window"], p["stride"]) == (128, 64)
    assert 1.0 <= p["tuned"] < 2.0 < 100 < p["base"]
    assert p["tuned"] == pytest.approx(math.exp(p["loss_tuned"]))

    m = r.memorization
    assert {"n", "rate_base", "rate_tuned", "samples", "longest_span", "warning"} <= set(m)
    assert m["n"] == 8 and m["samples"] == 8
    assert m["rate_tuned"] > 0.5, r.samples["tuned"]
    assert m["rate_base"] < 0.1, r.samples["base"]
    span = m["longest_span"]
    assert span["model"] == "tuned" and span["tokens"] >= 20 and span["document"] == 0
    assert span["text"].strip() and span["text"] in overfit["corpus"].read_text()
    assert span["text"].strip()[:20] in span["snippet"]
    assert m["warning"].endswith("it is memorising; train fewer steps or on more data")

    s = r.style
    assert {"distance_base", "distance_tuned", "profiles", "distinctive_words", "definition"} <= set(s)
    assert 0 <= s["distance_tuned"] < s["distance_base"] <= 1
    assert set(s["profiles"]) == {"corpus", "base", "tuned"}
    assert s["definition"] == STYLE_DISTANCE_DEFINITION
    assert all(set(w) == {"word", "corpus", "base", "tuned"} for w in s["distinctive_words"])
    assert "fox" in [w["word"] for w in s["distinctive_words"]]

    assert len(r.samples["prompts"]) == len(r.samples["base"]) == len(r.samples["tuned"]) == 8
    assert all(pr == "Once upon a midnight" for pr in r.samples["prompts"])  # the only training document
    assert len(set(r.samples["base"])) == 8  # repeats of a prompt get their own seeds
    assert [e["step"] for e in r.metrics_steps] == [0, 75, 150] and r.notes == []
    lines = summary_lines(r)
    assert lines[0].startswith("perplexity (validation split") and lines[3].startswith("warning: ")


def test_evaluate_a_lora_run(tmp_path, tokenizer):
    """The usual case: a LoRA adapter (merged on load) over a Llama base, a corpus of several documents."""
    from conftest import build_llama

    base = tmp_path / "base"
    build_llama(len(tokenizer), initializer_range=0.2).save_pretrained(base)
    tokenizer.save_pretrained(base)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(SENTENCES * 2):
        (folder / f"{i}.txt").write_text(f"Number {i}: {text}", encoding="utf-8")
    cfg = TrainConfig(out=str(tmp_path / "run"), model=str(base), method="lora", lr=1e-2, max_steps=3,
                      data=DataConfig(sources=[str(folder)], block_size=16, val_fraction=0.34), batch_size=2,
                      eval_every=3, save_every=3, eval_max_new_tokens=2, seed=0, device="cpu", dtype="float32")
    from styletune.training import train

    train(cfg)
    r = evaluate(cfg.out, samples=3, max_new_tokens=8, ngram=4, device="cpu", dtype="float32")
    assert math.isfinite(r.perplexity["base"]) and math.isfinite(r.perplexity["tuned"])
    assert r.perplexity["base"] != r.perplexity["tuned"]  # the adapter was applied
    assert (r.perplexity["window"], r.perplexity["stride"]) == (256, 128)
    assert len(set(r.samples["prompts"])) == 3 and all(p.startswith("Number ") for p in r.samples["prompts"])
    assert all(re.fullmatch(r"\S+ \S+ \S+ \S+", p) for p in r.samples["prompts"])
    assert r.memorization["n"] == 4 and 0 <= r.memorization["rate_tuned"] <= 1


def test_write_report(overfit, tmp_path):
    r = overfit["report"]
    html_path = write_report(r, tmp_path / "rep")
    out = tmp_path / "rep"
    assert html_path == out / "report.html"
    for name in ("report.json", "report.md", "report.html", "perplexity.png", "style.png", "validation_loss.png"):
        assert (out / name).is_file(), name
    with open(out / "report.json", encoding="utf-8") as fh:
        assert json.load(fh) == json.loads(json.dumps(r.to_dict()))
    page = html_path.read_text(encoding="utf-8")
    for text in r.samples["base"] + r.samples["tuned"]:
        assert html.escape(visible_text(text)) in page
    assert page.count('src="data:image/png;base64,') == 3
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<script" not in page
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "(perplexity.png)" in md and "(style.png)" in md and "Warning" in md
    assert STYLE_DISTANCE_DEFINITION in md.replace("&#x27;", "'") and STYLE_DISTANCE_DEFINITION in page.replace("&#x27;", "'")


def test_report_escapes_samples(overfit, tmp_path):
    nasty = '<script>alert("x")</script> & <b>bold</b> | pipe'
    r = dataclasses.replace(overfit["report"], samples={**overfit["report"].samples,
                                                         "tuned": [nasty] * 8, "base": ["a < b && c"] * 8})
    page = write_report(r, tmp_path).read_text(encoding="utf-8")
    assert "<script>" not in page and "<b>bold" not in page
    assert html.escape(nasty) in page and "a &lt; b &amp;&amp; c" in page
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "<script>" not in md and "&lt;script&gt;" in md and "&#124; pipe" in md


def test_evaluate_on_a_data_file(overfit, tmp_path, tokenizer):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("The quick brown fox jumps over the lazy dog!\n", encoding="utf-8")
    r = evaluate(str(overfit["run"]), data=str(held_out), samples=2, max_new_tokens=10, device="cpu",
                 dtype="float32")
    n_ids = len(tokenizer("The quick brown fox jumps over the lazy dog!", add_special_tokens=False)["input_ids"]) + 1
    assert r.perplexity["source"] == str(held_out) and r.perplexity["tokens"] == n_ids - 1
    assert r.perplexity["tuned"] < r.perplexity["base"]
    assert len(r.samples["tuned"]) == 2


def test_locate_run_accepts_weights_directories(overfit):
    run = overfit["run"]
    assert _locate_run(str(run)) == (run, run / "best")  # a run means its best weights, as --model does
    assert _locate_run(str(run / "best")) == (run, run / "best")
    assert _locate_run(str(run / "final")) == (run, run / "final")


# ---------------------------------------------------------------------------------- bad input


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_run(tmp_path):
    with pytest.raises(StyletuneError, match="no such run directory") as e:
        evaluate(str(tmp_path / "nope"))
    one_line_error(e)


def test_incomplete_run(overfit, tmp_path):
    shutil.copy(overfit["run"] / "config.yaml", tmp_path / "config.yaml")
    with pytest.raises(StyletuneError, match="not a complete styletune run .*no final/") as e:
        evaluate(str(tmp_path))
    one_line_error(e)
    with pytest.raises(StyletuneError, match="no config.yaml"):
        evaluate(str(overfit["root"]))


def test_eval_file_without_text(overfit, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n\t\n", encoding="utf-8")
    with pytest.raises(StyletuneError, match="no text") as e:
        evaluate(str(overfit["run"]), data=str(empty), device="cpu", dtype="float32")
    one_line_error(e)


def test_mismatched_tokenizers(overfit, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import build_gpt2

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["completely different text"] * 4, trainer=trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    other_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    other = tmp_path / "other-base"
    build_gpt2(len(other_tok)).save_pretrained(other)
    other_tok.save_pretrained(other)
    run = tmp_path / "run"
    shutil.copytree(overfit["run"], run, ignore=shutil.ignore_patterns("checkpoints", "best"))
    info = json.loads((run / "final" / "styletune.json").read_text())
    (run / "final" / "styletune.json").write_text(json.dumps({**info, "base_model": str(other)}))
    with pytest.raises(StyletuneError, match="tokenizer.*not be comparable") as e:
        evaluate(str(run), device="cpu", dtype="float32")
    one_line_error(e)


def test_bad_arguments(overfit):
    with pytest.raises(StyletuneError, match="--samples"):
        evaluate(str(overfit["run"]), samples=0)
    with pytest.raises(StyletuneError, match="n-gram"):
        evaluate(str(overfit["run"]), ngram=1)


def test_cli_evaluate_writes_the_report(overfit, tmp_path):
    from click.testing import CliRunner

    from styletune.cli import main

    report = tmp_path / "report"
    r = CliRunner().invoke(main, ["evaluate", str(overfit["run"]), "--samples", "2", "-n", "12", "--report", str(report)])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and "memorisation" in r.output and "style distance" in r.output
    data = json.loads((report / "report.json").read_text())
    assert {"base", "tuned", "tokens"} <= set(data["perplexity"])
    assert {"n", "rate_base", "rate_tuned", "longest_span"} <= set(data["memorization"])
    assert {"distance_base", "distance_tuned"} <= set(data["style"])
    bad = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nope"), "--report", str(report)])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert len([l for l in bad.output.splitlines() if l.strip()]) == 1
