"""Did fine-tuning work?  Base model versus tuned run on three measures, and a report.

``styletune evaluate RUN`` answers three questions, each with one number for the
base model and one for the tuned run:

* **Perplexity** on held-out text (the run's validation split, or ``--data FILE``),
  both models on the same token stream, computed with a sliding window
  (:func:`sliding_window_nll`).
* **Memorisation**: the share of the n-grams of sampled text that occur verbatim
  in the training split (:class:`NgramIndex`), and the longest copied span.
* **Style distance** between the samples and the training corpus, over a profile of
  simple, explainable features (:func:`style_profile`, :func:`style_distance`).

:func:`evaluate` returns an :class:`EvalReport` (plain data) and
:func:`write_report` turns it into ``report.json``, ``report.md`` and a
self-contained ``report.html`` with its plots embedded.
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import json
import math
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import StyletuneError
from .report import figure as _figure, html_text as _h, md_cell as _md_cell, md_text as _md

Echo = Callable[[str], None]

MEMORIZATION_WARNING_RATE = 0.10
"""A tuned memorisation rate at or above this earns a warning in the report."""
CORPUS_STYLE_CHARS = 2_000_000
"""The corpus style profile reads training documents, in a seeded random order, up to this many characters."""
PROMPT_WORDS = 4
"""Memorisation prompts are the first this-many words of training documents."""


# =============================================================================================
# Perplexity


@torch.inference_mode()
def sliding_window_nll(model, ids, window: int, stride: int, batch_size: int | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of a token stream, and how many tokens it scores.

    The Hugging Face "perplexity of fixed-length models" method: windows of ``window``
    tokens start every ``stride`` tokens; each window scores only the tokens that the
    previous window did not score (the overlap is context only, label -100), so every
    token is scored once, with up to ``window - stride`` tokens of context.  The first
    token of the stream is never scored (nothing predicts it), and neither is the
    first token of a window that has no overlap with the previous one (stride ==
    window: independent chunks).  Perplexity is ``exp(total_nll / n_tokens)``.

    Windows of equal length are batched (``batch_size`` of them, default: as many as
    keep the logits under ~512 MB).  Returns ``(0.0, 0)`` for fewer than two tokens.
    """
    if window < 2:
        raise StyletuneError(f"the perplexity window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise StyletuneError(f"the perplexity stride must be between 1 and the window ({window}), got {stride}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    total = ids.numel()
    if total < 2:
        return 0.0, 0
    # (begin, end, first scored position) of every window.
    spans = []
    prev_end = 0
    for begin in range(0, total, stride):
        end = min(begin + window, total)
        first = max(prev_end, begin + 1)
        if end > first:
            spans.append((begin, end, first))
        prev_end = end
        if end == total:
            break
    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", None) or 50_000
    if batch_size is None:
        batch_size = max(1, min(16, (512 << 20) // (4 * window * vocab)))
    was_training = model.training
    model.eval()
    nll = 0.0
    scored = 0
    try:
        i = 0
        while i < len(spans):
            # A batch of consecutive windows of one length (only the last may be shorter).
            length = spans[i][1] - spans[i][0]
            j = i
            while j < len(spans) and j - i < batch_size and spans[j][1] - spans[j][0] == length:
                j += 1
            group = spans[i:j]
            i = j
            batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            labels = batch.clone()
            for row, (b, _e, first) in enumerate(group):
                labels[row, :first - b] = -100
            logits = model(input_ids=batch).logits
            # Position t predicts token t+1.
            logits = logits[:, :-1].float()
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            nll += float(loss)
            scored += int((targets != -100).sum())
    finally:
        model.train(was_training)
    return nll, scored


def perplexity(total_nll: float, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)``; ``inf`` when that overflows, ``nan`` for no tokens."""
    if n_tokens <= 0:
        return float("nan")
    mean = total_nll / n_tokens
    return math.exp(mean) if mean < 700 else float("inf")


# =============================================================================================
# Memorisation


_MODULI = (2_147_483_647, 2_147_483_629)  # two primes below 2**31: h * base stays below 2**62
_BASES = (1_000_003, 911_382_323)


class NgramIndex:
    """Every n-gram of a token stream, hashed to int64 and sorted, for fast membership tests.

    Each n-gram is hashed with two polynomial hashes modulo primes below 2**31
    (computed for all positions at once with torch: a loop over the n offsets, never
    over the corpus), combined into one int64.  The hashes are sorted once
    (``argsort`` keeps the corpus positions), so a query is a ``torch.searchsorted``.
    Memory: about 24 bytes per corpus token (tokens, sorted hashes, positions).

    Matches are always verified by comparing the actual tokens, so a hash collision
    can neither report an absent n-gram nor lengthen a span.
    """

    def __init__(self, tokens, n: int, *, moduli: tuple[int, ...] = _MODULI, bases: tuple[int, ...] = _BASES):
        if n < 1:
            raise StyletuneError(f"the n-gram size must be at least 1, got {n}")
        if len(moduli) != len(bases) or not moduli or math.prod(moduli) >= 2**62 or max(moduli) >= 2**31:
            raise ValueError("moduli must be primes below 2**31 whose product is below 2**62, one base each")
        self.n = n
        self.moduli = tuple(moduli)
        self.bases = tuple(b % p for b, p in zip(bases, moduli))
        self.tokens = torch.as_tensor(tokens, dtype=torch.long).flatten().cpu()
        hashes = self.hash_ngrams(self.tokens)
        self.sorted_hashes, self.positions = torch.sort(hashes, stable=True)

    def __len__(self) -> int:
        """Number of n-grams (positions) in the index."""
        return self.sorted_hashes.numel()

    def hash_ngrams(self, ids) -> torch.Tensor:
        """int64 hash of the n-gram starting at each position of ``ids`` (length ``len(ids) - n + 1``)."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        m = ids.numel() - self.n + 1
        if m <= 0:
            return torch.empty(0, dtype=torch.long)
        combined = torch.zeros(m, dtype=torch.long)
        for p, b in zip(self.moduli, self.bases):
            values = ids if ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < p) else ids.remainder(p)
            h = torch.zeros(m, dtype=torch.long)
            for k in range(self.n):  # in place: several times faster than building new tensors
                h.mul_(b).add_(values[k:k + m]).remainder_(p)
            combined.mul_(p).add_(h)
        return combined

    def _candidates(self, ids: torch.Tensor):
        q = self.hash_ngrams(ids)
        lo = torch.searchsorted(self.sorted_hashes, q)
        hi = torch.searchsorted(self.sorted_hashes, q, right=True)
        return lo, hi

    def _match_lengths(self, ids: torch.Tensor, start: int, cands: torch.Tensor, limit: int) -> torch.Tensor:
        """For each corpus position in ``cands``: how many tokens of ``ids[start:start+limit]`` it matches."""
        offsets = torch.arange(limit)
        idx = cands[:, None] + offsets[None, :]
        inside = idx < self.tokens.numel()
        eq = (self.tokens[idx.clamp(max=self.tokens.numel() - 1)] == ids[start:start + limit][None, :]) & inside
        return eq.long().cumprod(dim=1).sum(dim=1)

    def contains(self, ids) -> torch.Tensor:
        """BoolTensor over the n-grams of ``ids``: True where that n-gram occurs in the index."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        lo, hi = self._candidates(ids)
        m = lo.numel()
        if m == 0 or len(self) == 0:
            return torch.zeros(max(m, 0), dtype=torch.bool)
        hit = hi > lo
        # Verify the first candidate of every hit at once; only where it fails (a hash
        # collision) look at the other candidates with that hash.
        first = self.positions[lo.clamp(max=len(self) - 1)]
        rows = torch.arange(m)[:, None] + torch.arange(self.n)[None, :]
        idx = (first[:, None] + torch.arange(self.n)[None, :]).clamp(max=self.tokens.numel() - 1)
        verified = hit & (self.tokens[idx] == ids[rows]).all(dim=1)
        for j in torch.nonzero(hit & ~verified).flatten().tolist():
            cands = self.positions[lo[j] + 1:hi[j]]
            if cands.numel():
                verified[j] = bool((self._match_lengths(ids, j, cands, self.n) == self.n).any())
        return verified

    def longest_span(self, ids, chunk: int = 65_536) -> tuple[int, int]:
        """The longest run of ``ids`` that occurs verbatim in the index: ``(length, corpus_position)``.

        Only spans of at least n tokens are found (they are seeded by a matching n-gram);
        returns ``(0, -1)`` when no n-gram of ``ids`` occurs.  Every candidate is checked
        token by token and extended as far as the tokens agree; ties go to the earliest
        corpus position.
        """
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        lo, hi = self._candidates(ids)
        best_len, best_pos = 0, -1
        total = ids.numel()
        for j in range(lo.numel()):
            if total - j <= best_len:
                break
            a, b = int(lo[j]), int(hi[j])
            for c0 in range(a, b, chunk):
                cands = self.positions[c0:min(b, c0 + chunk)]
                lengths = self._match_lengths(ids, j, cands, total - j)
                lengths = torch.where(lengths >= self.n, lengths, torch.zeros_like(lengths))
                top = int(lengths.max())
                if top == 0:
                    continue
                pos = int(cands[lengths == top].min())
                if top > best_len or (top == best_len and pos < best_pos):
                    best_len, best_pos = top, pos
        return best_len, best_pos


def memorization_rate(index: NgramIndex, samples: Iterable) -> tuple[float, int, int]:
    """``(found / checked, found, checked)`` over the n-grams of every sample's token ids.

    ``samples`` holds token id lists (the generated continuation only, not the prompt).
    The rate is 0.0 when no sample is long enough to hold an n-gram.
    """
    found = checked = 0
    for ids in samples:
        hits = index.contains(ids)
        found += int(hits.sum())
        checked += hits.numel()
    return (found / checked if checked else 0.0), found, checked


def memorization_warning(rate: float, n: int) -> str | None:
    """The report's warning when the tuned model copies at least 10% of its n-grams."""
    if rate < MEMORIZATION_WARNING_RATE:
        return None
    return (f"{rate:.0%} of the tuned model's {n}-grams are copied verbatim from the training data: "
            "it is memorising; train fewer steps or on more data")


# =============================================================================================
# Style


_WORD = re.compile(r"\w+")
# Closing quotation marks right after the end mark belong to the sentence that ends there.
_SENTENCE_END = re.compile(r"[.!?…]+[\"”»’']*|\n+")
# Quotation marks; ' and ’ count only when not between two word characters (so "don't" is no quote).
_QUOTE = re.compile(r"[\"“”„‟«»‹›]|(?<!\w)['‘’]|['‘’](?!\w)")
_DASH_START = re.compile(r"^[—–―]|^-\s")
TTR_WINDOW = 100

STYLE_FEATURES = (
    "sentence_length_mean", "sentence_length_std", "word_length_mean", "word_length_std", "type_token_ratio",
    "commas_per_1000", "semicolons_per_1000", "colons_per_1000", "exclamations_per_1000", "questions_per_1000",
    "quotes_per_1000", "dialogue_share",
)
"""The numeric features of a style profile that :func:`style_distance` compares."""

STYLE_LABELS = {
    "sentence_length_mean": "sentence length, mean (words)",
    "sentence_length_std": "sentence length, std (words)",
    "word_length_mean": "word length, mean (characters)",
    "word_length_std": "word length, std (characters)",
    "type_token_ratio": "type-token ratio (100-word windows)",
    "commas_per_1000": "commas per 1000 characters",
    "semicolons_per_1000": "semicolons per 1000 characters",
    "colons_per_1000": "colons per 1000 characters",
    "exclamations_per_1000": "exclamation marks per 1000 characters",
    "questions_per_1000": "question marks per 1000 characters",
    "quotes_per_1000": "quotation marks per 1000 characters",
    "dialogue_share": "share of dialogue sentences",
}

STYLE_DISTANCE_DEFINITION = (
    "style distance = the mean, over the style features (sentence length mean and standard deviation in words; "
    "word length mean and standard deviation in characters; type-token ratio averaged over 100-word windows; "
    "commas, semicolons, colons, exclamation marks, question marks and quotation marks per 1000 characters; "
    "share of dialogue sentences; and, as one more feature, the mean over the corpus's distinctive words of the "
    "same ratio for their rates per 1000 words), of min(1, |model - corpus| / |corpus|): "
    "0 means the model's text matches the corpus on every feature, 1 means it is maximally different"
)

STOPWORDS = frozenset("""
the and for are but not you all any can had her was one our out his has him how its who she they them their
there then than that this these those with from have were been what when where which while will would could
should into about over under again more most some such only own same very just also your yours upon said did
does doing because each few other off once here why too nor may might must shall let yet get got like now well
even much many both after before being between through during above below until against further whom ourselves
himself herself itself themselves myself yourself yourselves theirs hers ours isn aren wasn weren don doesn didn
won wouldn couldn shouldn can't don't it's i'm i've you're that's there's
que los las del una uno unos unas por con para como pero más mas sus les ese esa eso esos esas este esta esto
estos estas ella ellos ellas nos porque muy sin sobre también tambien hasta desde donde cuando quien quienes
todo todos toda todas fue era eran ser son está están estaba estaban había habia han hay tiene tienen tan entre
cual cuál qué mis tus ante bajo contra durante según tras algo nada aunque pues así otro otra otros otras
mismo misma cada vez dos les sea ese aquel aquella aquí allí ahora siempre nunca
""".split())
"""A small English + Spanish stopword list for :func:`distinctive_words` (words of 3+ letters only)."""


def words_of(text: str) -> list[str]:
    """The words of a text: maximal runs of Unicode word characters (``\\w+``)."""
    return _WORD.findall(text)


def sentences_of(text: str) -> list[str]:
    """Sentences: the text split at runs of ``. ! ? …`` (with any closing quotation marks right after
    them) and at newlines; pieces with no word are dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if _WORD.search(s)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return float(statistics.fmean(values)), float(statistics.pstdev(values))


def windowed_ttr(words: list[str], window: int = TTR_WINDOW) -> float:
    """Mean type-token ratio over consecutive, non-overlapping windows of ``window`` lower-cased words.

    The last, incomplete window is ignored unless there is no complete one (then it
    is the whole text), so long texts are not penalised for their length.
    """
    words = [w.lower() for w in words]
    if not words:
        return 0.0
    windows = [words[i:i + window] for i in range(0, len(words) - window + 1, window)] or [words]
    return float(statistics.fmean(len(set(w)) / len(w) for w in windows))


def word_rates(texts: list[str], words: list[str]) -> dict[str, float]:
    """Occurrences of each (lower-case) word per 1000 words of ``texts``."""
    counts = Counter(w.lower() for t in texts for w in words_of(t))
    total = sum(counts.values())
    return {w: (1000.0 * counts[w] / total if total else 0.0) for w in words}


def style_profile(texts: list[str], words: list[str] | None = None) -> dict:
    """Simple, explainable style features of a set of texts (see :data:`STYLE_FEATURES`).

    * sentence length: mean and population standard deviation, in words, of the
      sentences of :func:`sentences_of` (split at ``. ! ? …`` and newlines);
    * word length: mean and population standard deviation, in characters, of the
      words of :func:`words_of` (``\\w+``, Unicode);
    * type-token ratio: :func:`windowed_ttr`, mean over 100-word windows;
    * ``, ; : ! ?`` and quotation marks (``" “ ” „ « »`` and ``' ‘ ’`` when not inside
      a word) per 1000 characters (all characters, spaces and newlines included);
    * dialogue share: the share of sentences that contain a quotation mark or start
      with a dash (``— – ―`` or ``- ``).

    With ``words``, the profile also holds ``word_rates``: each word's rate per 1000
    words (:func:`word_rates`).  ``words``, ``sentences`` and ``characters`` are counts.
    """
    all_words: list[str] = []
    sentence_lengths: list[int] = []
    chars = 0
    dialogue = 0
    punct = Counter()
    quotes = 0
    for text in texts:
        chars += len(text)
        all_words += words_of(text)
        for sentence in sentences_of(text):
            sentence_lengths.append(len(words_of(sentence)))
            if _QUOTE.search(sentence) or _DASH_START.match(sentence):
                dialogue += 1
        for ch in ",;:!?":
            punct[ch] += text.count(ch)
        quotes += len(_QUOTE.findall(text))
    per_1000 = (lambda count: 1000.0 * count / chars) if chars else (lambda count: 0.0)
    sl_mean, sl_std = _mean_std(sentence_lengths)
    wl_mean, wl_std = _mean_std([len(w) for w in all_words])
    profile = {
        "sentence_length_mean": sl_mean,
        "sentence_length_std": sl_std,
        "word_length_mean": wl_mean,
        "word_length_std": wl_std,
        "type_token_ratio": windowed_ttr(all_words),
        "commas_per_1000": per_1000(punct[","]),
        "semicolons_per_1000": per_1000(punct[";"]),
        "colons_per_1000": per_1000(punct[":"]),
        "exclamations_per_1000": per_1000(punct["!"]),
        "questions_per_1000": per_1000(punct["?"]),
        "quotes_per_1000": per_1000(quotes),
        "dialogue_share": dialogue / len(sentence_lengths) if sentence_lengths else 0.0,
        "words": len(all_words),
        "sentences": len(sentence_lengths),
        "characters": chars,
    }
    if words is not None:
        profile["word_rates"] = word_rates(texts, words)
    return profile


def distinctive_words(corpus_texts: list[str], k: int = 15, others: dict[str, list[str]] | None = None) -> list[dict]:
    """The corpus's ``k`` most frequent words of 3+ characters that are no stopword (nor a number).

    Words are lower-cased; ties go alphabetically.  Each row is ``{"word", "corpus"}``
    plus one key per entry of ``others`` (e.g. ``{"base": texts, "tuned": texts}``),
    every value the word's rate per 1000 words of those texts.
    """
    counts = Counter(w.lower() for t in corpus_texts for w in words_of(t))
    eligible = [(w, c) for w, c in counts.items() if len(w) >= 3 and w not in STOPWORDS and not w.isdigit()]
    eligible.sort(key=lambda wc: (-wc[1], wc[0]))
    top = [w for w, _ in eligible[:k]]
    rates = {"corpus": word_rates(corpus_texts, top)}
    for name, texts in (others or {}).items():
        rates[name] = word_rates(texts, top)
    return [{"word": w, **{name: r[w] for name, r in rates.items()}} for w in top]


def _relative_difference(model: float, corpus: float) -> float:
    return min(1.0, abs(model - corpus) / (abs(corpus) + 1e-9))


def style_distance(profile: dict, corpus_profile: dict) -> float:
    """How far a style profile is from the corpus's: 0 = identical, 1 = maximally different.

    style distance = the mean, over the style features (sentence length mean and standard
    deviation in words; word length mean and standard deviation in characters; type-token
    ratio averaged over 100-word windows; commas, semicolons, colons, exclamation marks,
    question marks and quotation marks per 1000 characters; share of dialogue sentences;
    and, as one more feature, the mean over the corpus's distinctive words of the same
    ratio for their rates per 1000 words), of min(1, |model - corpus| / |corpus|): 0 means
    the model's text matches the corpus on every feature, 1 means it is maximally different.

    (The same text is :data:`STYLE_DISTANCE_DEFINITION`.)  ``|corpus|`` gets 1e-9 added,
    so a feature the corpus lacks counts 0 when the model lacks it too and 1 otherwise.
    The word-rate feature is used when both profiles have ``word_rates`` (see
    :func:`style_profile`).
    """
    diffs = [_relative_difference(float(profile[f]), float(corpus_profile[f])) for f in STYLE_FEATURES]
    mine, theirs = profile.get("word_rates"), corpus_profile.get("word_rates")
    if mine is not None and theirs:
        diffs.append(statistics.fmean(_relative_difference(mine.get(w, 0.0), r) for w, r in theirs.items()))
    return float(statistics.fmean(diffs))


# =============================================================================================
# The evaluation


@dataclass
class EvalReport:
    """Everything ``styletune evaluate`` measured, as plain data (the CLI only formats it)."""

    run: str
    base: str
    perplexity: dict
    """``{"base", "tuned", "tokens", "source", "window", "stride", "loss_base", "loss_tuned"}``."""
    memorization: dict
    """``{"n", "rate_base", "rate_tuned", "samples", "ngrams_base", "ngrams_tuned", "longest_span", "warning"}``."""
    style: dict
    """``{"distance_base", "distance_tuned", "profiles", "distinctive_words", "definition"}``."""
    samples: dict
    """``{"prompts": [...], "base": [texts], "tuned": [texts], "decoding": {...}}``; texts are the
    continuations only, in prompt order."""
    metrics_steps: list
    """``[{"step", "val_loss"}]`` from the run's metrics.jsonl."""
    notes: list = field(default_factory=list)
    """Caveats worth telling the user (e.g. the training data changed since the run)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _locate_run(run: str) -> tuple[Path, Path]:
    """(run directory holding config.yaml, weights directory) for a run or one of its weights directories."""
    from .runs import is_weights_dir, run_root, weights_dir

    path = Path(run).expanduser()
    if not path.is_dir():
        raise StyletuneError(f"no such run directory: {run}")
    root = run_root(path)
    if root is None:
        if is_weights_dir(path):
            raise StyletuneError(f"{run} holds weights but no config.yaml was found beside it; evaluate the run directory")
        raise StyletuneError(f"{run} is not a styletune run (it has no config.yaml)")
    return root, weights_dir(path)


def _load_tokenizer(name: str):
    """Only the tokenizer of a model or weights directory (loaded from where ``load_model`` would
    load it), to check that two models are comparable before loading either."""
    from transformers import AutoTokenizer

    from .models import _from_pretrained, _quiet_transformers, local_dir_for, prepare_tokenizer, resolve
    from .runs import weights_dir

    _quiet_transformers()
    source = resolve(name)
    if source.kind == "run":
        location = str(weights_dir(Path(source.location)))
    else:
        location = local_dir_for(source) or source.location
    return prepare_tokenizer(_from_pretrained(AutoTokenizer, location, source))


def _stream(blocks) -> torch.Tensor:
    """The token stream of packed blocks, in order."""
    if blocks is None or len(blocks) == 0:
        return torch.empty(0, dtype=torch.long)
    return torch.as_tensor(blocks[:]["input_ids"], dtype=torch.long).reshape(-1)


def _eval_file_stream(path: str, data_cfg, tokenizer) -> torch.Tensor:
    """``--data FILE`` read like training data (same cleaning options), documents joined with EOS."""
    from .data import iter_clean, iter_texts

    cfg = dataclasses.replace(data_cfg, sources=[path], val=None, filter=[], split=None, config=None)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in iter_clean(iter_texts(cfg), cfg):
        ids += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + [eos]
    if not ids:
        raise StyletuneError(f"{path} holds no text to evaluate on (every record is empty after cleaning)")
    return torch.tensor(ids, dtype=torch.long)


def _documents(stream: torch.Tensor, eos: int) -> list[tuple[int, int]]:
    """(start, end) of every non-empty document of an EOS-joined stream (EOS excluded)."""
    ends = torch.nonzero(stream == eos).flatten().tolist() + [stream.numel()]
    docs, start = [], 0
    for end in ends:
        if end > start:
            docs.append((start, end))
        start = end + 1
    return docs


def choose_prompts(stream: torch.Tensor, docs: list[tuple[int, int]], tokenizer, n: int, seed: int) -> list[str]:
    """The first four words of ``n`` training documents picked with ``random.Random(seed)``.

    The documents are taken in an order shuffled by ``random.Random(seed)``, skipping
    any without words; with fewer such documents than ``n`` their prompts repeat, in
    the same order (each repeat is then sampled with another seed).
    """
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    picked: list[str] = []
    for i in order:
        start, end = docs[i]
        words = tokenizer.decode(stream[start:min(end, start + 48)].tolist(), skip_special_tokens=True).split()
        if words:
            picked.append(" ".join(words[:PROMPT_WORDS]))
            if len(picked) == n:
                return picked
    if not picked:
        raise StyletuneError("the training split has no document with text to take prompts from")
    return [picked[i % len(picked)] for i in range(n)]


SAMPLING = {"temperature": 0.8, "top_p": 0.95}
"""How the evaluation samples both models (with ``max_new_tokens`` and ``seed``)."""


def _sample(lm, prompts: list[str], max_new_tokens: int, seed: int):
    """One sample per prompt, with a distinct seed for each repeat of a prompt; in prompt order."""
    from .config import DecodingConfig
    from .decoding.engine import generate

    unique = list(dict.fromkeys(prompts))
    repeats = max(Counter(prompts).values())
    dec = DecodingConfig(max_new_tokens=max_new_tokens, seed=seed, num_samples=repeats, **SAMPLING)
    out = generate(lm, unique, dec)
    by_prompt = {p: [s for s in out if s.prompt == p] for p in unique}
    used = Counter()
    picked = []
    for p in prompts:
        picked.append(by_prompt[p][used[p]])
        used[p] += 1
    return picked


def _span_info(index: NgramIndex, length: int, pos: int, model: str, eos_positions: torch.Tensor,
               tokenizer) -> dict:
    document = int(torch.searchsorted(eos_positions, pos))  # EOS tokens before the span
    doc_start = int(eos_positions[document - 1]) + 1 if document > 0 else 0
    doc_end = int(eos_positions[document]) if document < eos_positions.numel() else index.tokens.numel()
    context = 40
    a, b = max(doc_start, pos - context), min(doc_end, pos + length + context)
    decode = lambda s, e: tokenizer.decode(index.tokens[s:e].tolist(), skip_special_tokens=True)
    snippet = ("…" if a > doc_start else "") + decode(a, b) + ("…" if b < doc_end else "")
    return {"model": model, "tokens": length, "text": decode(pos, pos + length), "document": document,
            "snippet": snippet}


def evaluate(run: str, data: str | None = None, samples: int = 8, ngram: int = 8, max_new_tokens: int = 80,
             seed: int = 0, device: str = "auto", dtype: str = "auto", *, window: int | None = None,
             stride: int | None = None, echo: Echo | None = None) -> EvalReport:
    """Compare a run with its base model: perplexity, memorisation and style.

    Args:
        run: a run directory (its ``final/`` weights are evaluated) or one of its
            weights directories (``best/``, ``checkpoints/step-N/``).
        data: held-out text to measure perplexity on, in any format ``train`` reads
            (cleaned with the run's options); default: the run's validation split.
        samples: texts sampled from each model, from the same prompts and seed.
        ngram: n of the n-grams checked against the training split.
        max_new_tokens: length of each sample.
        seed: picks the prompts' documents and seeds sampling.
        device, dtype: as for ``load_model`` (both models use the same).
        window, stride: perplexity window (default ``min(context, 1024)``) and stride
            (default ``window // 2``).
        echo: receives one line per stage, for progress.

    The training and validation splits are rebuilt from the run's ``config.yaml``
    exactly as training built them (same seed, same tokenised cache).
    """
    from .config import load_yaml, train_config_from_dict
    from .data import prepare_data
    from .models import load_model
    from .runs import read_info
    from .training import read_metrics

    echo = echo or (lambda _msg: None)
    if samples < 1:
        raise StyletuneError(f"--samples must be >= 1, got {samples}")
    if ngram < 2:
        raise StyletuneError(f"the n-gram size must be >= 2, got {ngram}")
    if max_new_tokens < 1:
        raise StyletuneError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    run_dir, wdir = _locate_run(run)
    cfg = train_config_from_dict(load_yaml(run_dir / "config.yaml"))
    base_name = read_info(wdir)["base_model"]
    notes: list[str] = []

    # ---- tokenizers must agree, or the perplexities (and n-grams) are not comparable
    tuned_tok = _load_tokenizer(str(wdir))
    base_tok = _load_tokenizer(base_name)
    if tuned_tok.get_vocab() != base_tok.get_vocab():
        raise StyletuneError(f"the run's tokenizer differs from that of its base model {base_name}: "
                             "their perplexities would not be comparable")
    # The base tokenizer, loaded from where training loaded it, so the data cache key matches.
    tok = base_tok
    eos = tok.eos_token_id
    if eos is None:
        raise StyletuneError("the run's tokenizer has no end-of-text token")

    # ---- the run's data, rebuilt as training built it
    echo("rebuilding the run's training and validation splits")
    try:
        # The block size was checked against the model's context when the run trained.
        prepared = prepare_data(cfg.data, tok, seed=cfg.seed)
    except StyletuneError as exc:
        raise StyletuneError(f"cannot rebuild the run's data from its config.yaml: {exc}") from None
    summary_path = run_dir / "data_summary.json"
    if summary_path.is_file():
        trained_key = json.loads(summary_path.read_text()).get("cache_key")
        if trained_key and trained_key != prepared.cache_key:
            notes.append("the training data changed since the run was trained: the splits used here differ "
                         "from those the run saw")
    train_stream = _stream(prepared.train)
    if data is not None:
        eval_stream = _eval_file_stream(data, cfg.data, tok)
        source = str(data)
    else:
        eval_stream = _stream(prepared.val)
        source = "validation split"
        if eval_stream.numel() == 0:
            raise StyletuneError("the run has no validation split to measure perplexity on; pass --data FILE "
                                 "with held-out text")
    if eval_stream.numel() < 2:
        raise StyletuneError(f"the evaluation text ({source}) has fewer than 2 tokens; nothing to score")

    docs = _documents(train_stream, eos)
    prompts = choose_prompts(train_stream, docs, tok, samples, seed)
    echo(f"indexing the {ngram}-grams of {train_stream.numel():,} training tokens")
    index = NgramIndex(train_stream, ngram)

    # ---- the two models, one at a time
    results: dict[str, dict] = {}
    for which, name in (("base", base_name), ("tuned", str(wdir))):
        echo(f"loading the {which} model")
        lm = load_model(name, device=device, dtype=dtype)
        if window is None:
            window = min(lm.context_length, 1024)
        if stride is None:
            stride = max(1, window // 2)
        if window > lm.context_length:
            raise StyletuneError(f"the perplexity window ({window}) exceeds the model's context "
                                 f"({lm.context_length} tokens)")
        echo(f"{which}: perplexity on {eval_stream.numel():,} tokens ({source})")
        nll, scored = sliding_window_nll(lm.model, eval_stream, window, stride)
        echo(f"{which}: sampling {samples} texts")
        got = _sample(lm, prompts, max_new_tokens, seed)
        results[which] = {"nll": nll, "scored": scored, "texts": [s.text for s in got],
                          "ids": [list(s.token_ids) for s in got]}
        del lm
        gc.collect()

    ppl = {
        "base": perplexity(results["base"]["nll"], results["base"]["scored"]),
        "tuned": perplexity(results["tuned"]["nll"], results["tuned"]["scored"]),
        "tokens": results["tuned"]["scored"],
        "source": source,
        "window": window,
        "stride": stride,
        "loss_base": results["base"]["nll"] / results["base"]["scored"],
        "loss_tuned": results["tuned"]["nll"] / results["tuned"]["scored"],
    }

    # ---- memorisation
    mem: dict = {"n": ngram, "samples": samples}
    eos_positions = torch.nonzero(train_stream == eos).flatten()
    spans = []
    for which in ("base", "tuned"):
        rate, found, checked = memorization_rate(index, results[which]["ids"])
        mem[f"rate_{which}"] = rate
        mem[f"ngrams_{which}"] = checked
        for ids in results[which]["ids"]:
            length, pos = index.longest_span(ids)
            if length:
                spans.append((length, which == "tuned", -pos, which, pos))
    if spans:
        length, _, _, which, pos = max(spans)
        mem["longest_span"] = _span_info(index, length, pos, which, eos_positions, tok)
    else:
        mem["longest_span"] = None
    mem["warning"] = memorization_warning(mem["rate_tuned"], ngram)

    # ---- style
    echo("profiling style")
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    corpus_texts, chars = [], 0
    for i in order:
        if chars >= CORPUS_STYLE_CHARS:
            break
        start, end = docs[i]
        text = tok.decode(train_stream[start:end].tolist(), skip_special_tokens=True)
        corpus_texts.append(text)
        chars += len(text)
    words = distinctive_words(corpus_texts, k=15, others={"base": results["base"]["texts"],
                                                         "tuned": results["tuned"]["texts"]})
    word_list = [w["word"] for w in words]
    profiles = {"corpus": style_profile(corpus_texts, word_list),
                "base": style_profile(results["base"]["texts"], word_list),
                "tuned": style_profile(results["tuned"]["texts"], word_list)}
    style = {
        "distance_base": style_distance(profiles["base"], profiles["corpus"]),
        "distance_tuned": style_distance(profiles["tuned"], profiles["corpus"]),
        "profiles": profiles,
        "distinctive_words": words,
        "definition": STYLE_DISTANCE_DEFINITION,
    }

    steps = [{"step": r["step"], "val_loss": r["val_loss"]} for r in read_metrics(run_dir) if "val_loss" in r]
    return EvalReport(run=str(run), base=base_name, perplexity=ppl, memorization=mem, style=style,
                      samples={"prompts": prompts, "base": results["base"]["texts"],
                               "tuned": results["tuned"]["texts"],
                               "decoding": {"max_new_tokens": max_new_tokens, "seed": seed, **SAMPLING}},
                      metrics_steps=steps, notes=notes)


# =============================================================================================
# The report


def summary_lines(report: EvalReport) -> list[str]:
    """The three headline numbers (and the warning), one per line, for a terminal."""
    p, m, s = report.perplexity, report.memorization, report.style
    lines = [
        f"perplexity ({p['source']}, {p['tokens']:,} tokens): base {p['base']:.2f} -> tuned {p['tuned']:.2f}",
        f"memorisation ({m['n']}-grams of samples found in the training data): "
        f"base {m['rate_base']:.1%} -> tuned {m['rate_tuned']:.1%}",
        f"style distance to the corpus (0 = same, 1 = far): base {s['distance_base']:.3f} -> "
        f"tuned {s['distance_tuned']:.3f}",
    ]
    if m.get("warning"):
        lines.append(f"warning: {m['warning']}")
    lines += [f"note: {n}" for n in report.notes]
    return lines


def plot_validation_loss(steps: list[dict], path: Path) -> Path | None:
    """Validation loss per step (from metrics.jsonl); None when the run logged none."""
    if not steps:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in steps], [r["val_loss"] for r in steps], marker="o", color="#ee6677")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss during training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_perplexity(ppl: dict, path: Path) -> Path:
    """Bars: base versus tuned perplexity."""
    fig = _figure(4.8, 3.6)
    ax = fig.add_subplot()
    values = [ppl["base"], ppl["tuned"]]
    shown = [v if math.isfinite(v) else 0.0 for v in values]
    bars = ax.bar(["base", "tuned"], shown, color=["#bbbbbb", "#4477aa"])
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if len(finite) == 2 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"Perplexity on the {ppl['source'] if ppl['source'] == 'validation split' else 'evaluation file'}")
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_style(profiles: dict, path: Path) -> Path:
    """Grouped bars: each style feature of base and tuned divided by the corpus's (corpus = 1)."""
    import numpy as np

    corpus = profiles["corpus"]
    feats = list(STYLE_FEATURES)
    cap = 3.0

    def ratios(p):
        return [min(cap, p[f] / corpus[f]) if corpus[f] else (1.0 if not p[f] else cap) for f in feats]

    y = np.arange(len(feats))
    fig = _figure(7.2, 5.2)
    ax = fig.add_subplot()
    ax.barh(y - 0.2, ratios(profiles["base"]), height=0.4, label="base", color="#bbbbbb")
    ax.barh(y + 0.2, ratios(profiles["tuned"]), height=0.4, label="tuned", color="#4477aa")
    ax.axvline(1.0, color="#ee6677", linewidth=1.5, label="corpus")
    ax.set_yticks(y, [STYLE_LABELS[f] for f in feats], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, cap)
    ax.set_xlabel(f"model / corpus (1 = like the corpus; capped at {cap:g})")
    ax.set_title("Style profile relative to the corpus")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path




def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


def _headline(report: EvalReport) -> list[tuple[str, str, str, str]]:
    p, m, s = report.perplexity, report.memorization, report.style
    return [
        ("Perplexity", f"{p['base']:.2f}", f"{p['tuned']:.2f}",
         f"on {p['tokens']:,} tokens of the {p['source']} (lower = the text is less surprising)"
         if p["source"] == "validation split" else f"on {p['tokens']:,} tokens of {p['source']} (lower is better)"),
        ("Memorisation", f"{m['rate_base']:.1%}", f"{m['rate_tuned']:.1%}",
         f"share of the samples' {m['n']}-grams found verbatim in the training split"),
        ("Style distance", f"{s['distance_base']:.3f}", f"{s['distance_tuned']:.3f}",
         "from the samples to the training corpus (0 = same style, 1 = maximally different)"),
    ]


def _span_sentence(span: dict | None, n: int) -> str:
    if not span:
        return f"No sample shares an {n}-gram with the training data."
    return (f"Longest verbatim span: {span['tokens']} tokens, from the {span['model']} model, "
            f"copied from training document {span['document']} (counting from 0).")


def _samples_sentence(report: EvalReport) -> str:
    d = report.samples.get("decoding") or {}
    how = (f", up to {d['max_new_tokens']} new tokens each, sampled at temperature {d['temperature']:g}, "
           f"top-p {d['top_p']:g}, seed {d['seed']}") if d else ""
    return (f"{len(report.samples['prompts'])} samples per model{how}. Both models continue the same prompts "
            "(the first words of training documents) with the same seeds.")


def report_markdown(report: EvalReport, images: dict[str, str]) -> str:
    """``report.md``: the numbers, the warning, plots (linked), samples, distinctive words, definitions."""
    p, m, s = report.perplexity, report.memorization, report.style
    esc = _md
    lines = [f"# Evaluation of {esc(report.run)}", "", f"Base model: `{report.base}`", "",
             "| measure | base | tuned | what it is |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _headline(report)]
    lines.append("")
    if m.get("warning"):
        lines += [f"> **Warning:** {esc(m['warning'])}", ""]
    lines += [f"> Note: {esc(n)}" for n in report.notes]
    if report.notes:
        lines.append("")
    for key, caption in (("loss", "validation loss"), ("perplexity", "perplexity"), ("style", "style profile")):
        if key in images:
            lines += [f"![{caption}]({images[key]})", ""]
    lines += ["## Memorisation", "", esc(_span_sentence(m["longest_span"], m["n"])), ""]
    if m["longest_span"]:
        lines += ["Copied text:", "", f"> {_md_cell(m['longest_span']['text'])}", "",
                  "In the training document:", "", f"> {_md_cell(m['longest_span']['snippet'])}", ""]
    lines += ["## Samples", "", esc(_samples_sentence(report)), "",
              "| # | prompt | base | tuned |", "| --- | --- | --- | --- |"]
    for i, (prompt, b, t) in enumerate(zip(report.samples["prompts"], report.samples["base"],
                                           report.samples["tuned"]), 1):
        lines.append(f"| {i} | {_md_cell(prompt)} | {_md_cell(b)} | {_md_cell(t)} |")
    lines += ["", "## Distinctive words", "", "Rate per 1000 words.", "",
              "| word | corpus | base | tuned |", "| --- | --- | --- | --- |"]
    lines += [f"| {_md_cell(w['word'])} | {w['corpus']:.2f} | {w['base']:.2f} | {w['tuned']:.2f} |"
              for w in s["distinctive_words"]]
    lines += ["", "## Style profile", "", "| feature | corpus | base | tuned |", "| --- | --- | --- | --- |"]
    prof = s["profiles"]
    lines += [f"| {STYLE_LABELS[f]} | {_fmt(prof['corpus'][f])} | {_fmt(prof['base'][f])} | {_fmt(prof['tuned'][f])} |"
              for f in STYLE_FEATURES]
    lines += ["", "## Definitions", "",
              f"- **Perplexity**: exp of the mean next-token loss, windows of {p['window']} tokens moving by "
              f"{p['stride']} (each token scored once, with up to {p['window'] - p['stride']} tokens of context; "
              "lower than the per-block validation perplexity in the training log).",
              f"- **Memorisation**: ({m['n']}-grams of the generated tokens found in the training split) / "
              "(all n-grams of the generated tokens); prompts are not counted.",
              f"- **Style distance**: {esc(s['definition'])}.", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.35em .6em;vertical-align:top}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.big td.num{font-size:1.3em;font-weight:600}
.warning{background:#fff3cd;border:1px solid #e0b100;padding:.7em 1em;border-radius:4px}
.note{background:#eef4fb;border:1px solid #9bbbe0;padding:.5em 1em;border-radius:4px}
.sample{white-space:pre-wrap;font-family:Georgia,serif;width:40%}
.prompt{font-weight:600}
blockquote{white-space:pre-wrap;border-left:4px solid #ccc;margin:.5em 0;padding:.2em 1em;color:#444}
img{max-width:100%;height:auto;margin:.5em 0}
code{background:#f4f4f4;padding:0 .2em}
"""


def report_html(report: EvalReport, images: dict[str, bytes]) -> str:
    """``report.html``: the same content as the Markdown, with the PNG plots embedded (no external resources)."""
    p, m, s = report.perplexity, report.memorization, report.style
    esc = _h
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>Evaluation of {esc(report.run)}</title><style>{_CSS}</style></head><body>",
           f"<h1>Evaluation of <code>{esc(report.run)}</code></h1>",
           f"<p>Base model: <code>{esc(report.base)}</code></p>",
           '<table class="big"><tr><th>measure</th><th>base</th><th>tuned</th><th>what it is</th></tr>']
    for a, b, c, d in _headline(report):
        out.append(f'<tr><th>{esc(a)}</th><td class="num">{esc(b)}</td><td class="num">{esc(c)}</td>'
                   f"<td>{esc(d)}</td></tr>")
    out.append("</table>")
    if m.get("warning"):
        out.append(f'<p class="warning"><strong>Warning:</strong> {esc(m["warning"])}</p>')
    out += [f'<p class="note">Note: {esc(n)}</p>' for n in report.notes]
    for key, caption in (("loss", "validation loss per step"), ("perplexity", "perplexity, base and tuned"),
                         ("style", "style profile relative to the corpus")):
        if key in images:
            data = base64.b64encode(images[key]).decode("ascii")
            out.append(f'<img alt="{esc(caption)}" src="data:image/png;base64,{data}">')
    out += ["<h2>Memorisation</h2>", f"<p>{esc(_span_sentence(m['longest_span'], m['n']))}</p>"]
    if m["longest_span"]:
        out += ["<p>Copied text:</p>", f"<blockquote>{esc(m['longest_span']['text'])}</blockquote>",
                "<p>In the training document:</p>", f"<blockquote>{esc(m['longest_span']['snippet'])}</blockquote>"]
    out += ["<h2>Samples</h2>", f"<p>{esc(_samples_sentence(report))} The prompt is in bold.</p>",
            "<table><tr><th>#</th><th>base</th><th>tuned</th></tr>"]
    for i, (prompt, b, t) in enumerate(zip(report.samples["prompts"], report.samples["base"],
                                           report.samples["tuned"]), 1):
        lead = f'<span class="prompt">{esc(prompt)}</span>'
        out.append(f'<tr><td class="num">{i}</td><td class="sample">{lead}{esc(b)}</td>'
                   f'<td class="sample">{lead}{esc(t)}</td></tr>')
    out += ["</table>", "<h2>Distinctive words</h2>", "<p>Rate per 1000 words.</p>",
            "<table><tr><th>word</th><th>corpus</th><th>base</th><th>tuned</th></tr>"]
    for w in s["distinctive_words"]:
        out.append(f"<tr><td>{esc(w['word'])}</td>" + "".join(f'<td class="num">{w[k]:.2f}</td>'
                                                               for k in ("corpus", "base", "tuned")) + "</tr>")
    out += ["</table>", "<h2>Style profile</h2>",
            "<table><tr><th>feature</th><th>corpus</th><th>base</th><th>tuned</th></tr>"]
    prof = s["profiles"]
    for f in STYLE_FEATURES:
        out.append(f"<tr><td>{esc(STYLE_LABELS[f])}</td>" + "".join(f'<td class="num">{esc(_fmt(prof[k][f]))}</td>'
                                                                    for k in ("corpus", "base", "tuned")) + "</tr>")
    out += ["</table>", "<h2>Definitions</h2><ul>",
            f"<li><strong>Perplexity</strong>: exp of the mean next-token loss, windows of {p['window']} tokens "
            f"moving by {p['stride']} (each token scored once, with up to {p['window'] - p['stride']} tokens of "
            "context; lower than the per-block validation perplexity in the training log).</li>",
            f"<li><strong>Memorisation</strong>: ({m['n']}-grams of the generated tokens found in the training "
            "split) / (all n-grams of the generated tokens); prompts are not counted.</li>",
            f"<li><strong>Style distance</strong>: {esc(s['definition'])}.</li>", "</ul></body></html>"]
    return "\n".join(out) + "\n"


def _json_safe(value):
    """NaN and infinities as strings, so report.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: EvalReport, out_dir: str | Path) -> Path:
    """Write ``report.json``, ``report.md``, ``report.html`` and the PNG plots into ``out_dir``.

    ``report.html`` is self-contained (plots as ``data:image/png;base64`` URIs, inline
    CSS, no scripts), so it opens offline; ``report.md`` links the PNG files beside it.
    Returns the path of ``report.html``.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise StyletuneError(f"--report {out_dir} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    loss = plot_validation_loss(report.metrics_steps, out / "validation_loss.png")
    if loss:
        files["loss"] = loss
    files["perplexity"] = plot_perplexity(report.perplexity, out / "perplexity.png")
    files["style"] = plot_style(report.style["profiles"], out / "style.png")
    (out / "report.json").write_text(json.dumps(_json_safe(report.to_dict()), indent=1, ensure_ascii=False),
                                     encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report, {k: v.name for k, v in files.items()}), encoding="utf-8")
    path = out / "report.html"
    path.write_text(report_html(report, {k: v.read_bytes() for k, v in files.items()}), encoding="utf-8")
    return path
