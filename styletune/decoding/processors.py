"""Decoding rules, one small class each, with the transformers signature.

Every rule is a callable ``(input_ids, scores) -> scores`` where ``input_ids`` is
``(batch, seq)`` (the prompt and what has been generated so far) and ``scores`` is
``(batch, vocab)`` logits for the next token.  Rules validate their arguments,
never modify ``scores`` in place, and are checked against their transformers
counterparts in ``tests/test_processors.py``.
"""

from __future__ import annotations

import torch

from ..errors import StyletuneError

FILTERED = -float("inf")


class Temperature:
    """Divide logits by ``temperature``: < 1 sharpens the distribution, > 1 flattens it."""

    def __init__(self, temperature: float):
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise StyletuneError(f"temperature must be a number > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the ``top_k`` highest logits (ties with the k-th are kept too)."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        if not isinstance(top_k, int) or top_k <= 0:
            raise StyletuneError(f"top_k must be a positive integer, got {top_k!r}")
        self.top_k = max(top_k, min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.size(-1))
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (B, 1)
        return scores.masked_fill(scores < kth, FILTERED)


class TopP:
    """Nucleus sampling: keep the smallest set of tokens whose probabilities sum to ``top_p``."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise StyletuneError(f"top_p must be in (0, 1], got {top_p!r}")
        self.top_p = float(top_p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Sort ascending so the tokens to drop form a prefix whose mass is <= 1 - top_p.
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - self.top_p)
        drop_sorted[..., -self.min_tokens_to_keep:] = False
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        return scores.masked_fill(drop, FILTERED)


class MinP:
    """Drop tokens whose probability is below ``min_p`` times that of the most likely token."""

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1):
        if not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1:
            raise StyletuneError(f"min_p must be in [0, 1], got {min_p!r}")
        self.min_p = float(min_p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        threshold = self.min_p * probs.amax(dim=-1, keepdim=True)
        drop = probs < threshold
        # Never drop the min_tokens_to_keep most likely tokens.
        keep = torch.topk(probs, min(self.min_tokens_to_keep, probs.size(-1)), dim=-1).indices
        drop = drop.scatter(1, keep, False)
        return scores.masked_fill(drop, FILTERED)


class RepetitionPenalty:
    """CTRL's penalty: logits of tokens already present are divided by ``penalty`` if
    positive and multiplied by it if negative, so > 1 always makes them less likely."""

    def __init__(self, penalty: float):
        if not isinstance(penalty, (int, float)) or not penalty > 0:
            raise StyletuneError(f"repetition_penalty must be a number > 0, got {penalty!r}")
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = torch.gather(scores, 1, input_ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, input_ids, seen)


class NoRepeatNGram:
    """Forbid any token that would complete an n-gram already present in the sequence."""

    def __init__(self, ngram_size: int):
        if not isinstance(ngram_size, int) or ngram_size <= 0:
            raise StyletuneError(f"no_repeat_ngram_size must be a positive integer, got {ngram_size!r}")
        self.n = ngram_size

    def banned_tokens(self, tokens: list[int]) -> list[int]:
        """Tokens that follow an earlier occurrence of the last n-1 tokens."""
        n = self.n
        if len(tokens) + 1 < n:
            return []
        prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
        return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores.clone()
        for row, tokens in enumerate(input_ids.tolist()):
            banned = self.banned_tokens(tokens)
            if banned:
                out[row, banned] = FILTERED
        return out


class ProcessorList(list):
    """Apply rules in order."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for rule in self:
            scores = rule(input_ids, scores)
        return scores


def build_processors(cfg) -> tuple[ProcessorList, ProcessorList]:
    """Turn a :class:`~styletune.config.DecodingConfig` into two lists of rules.

    The first list (repetition controls) shapes every strategy, greedy and beam
    included; the second (temperature and truncation) applies only when sampling,
    as in transformers.
    """
    shaping = ProcessorList()
    if cfg.repetition_penalty != 1.0:
        shaping.append(RepetitionPenalty(cfg.repetition_penalty))
    if cfg.no_repeat_ngram_size:
        shaping.append(NoRepeatNGram(cfg.no_repeat_ngram_size))
    sampling = ProcessorList()
    if cfg.mode in ("sample", "eps"):
        if cfg.temperature != 1.0:
            sampling.append(Temperature(cfg.temperature))
        if cfg.top_k is not None:
            sampling.append(TopK(cfg.top_k))
        if cfg.top_p is not None and cfg.top_p < 1.0:
            sampling.append(TopP(cfg.top_p))
        if cfg.min_p is not None and cfg.min_p > 0:
            sampling.append(MinP(cfg.min_p))
    return shaping, sampling
