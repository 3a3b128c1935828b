"""The decode loop: KV cache, batching, per-sample seeds, streaming, stop strings, traces.

One loop serves greedy, sampling and epsilon-greedy decoding; beam search lives
in :mod:`styletune.decoding.strategies`. Models with the lean decode step (Llama and GPT-2)
decode from per-sequence KV slots (:class:`~styletune.decoding.fast.SlotDecoder`, the engine the
server's scheduler runs too): each row at its own positions, finished rows leaving the batch.
Other models (and ``--compile``) decode one left-padded batch. Each sample gets its own
``torch.Generator`` seeded with ``seed + i``, so a sample's text does not depend on what else
is in the batch.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..config import DecodingConfig
from ..errors import StyletuneError
from .processors import build_processors
from .strategies import forward_step

TextCallback = Callable[[int, str], None]
"""Called with (sample row, new text) as text arrives."""


@dataclass
class Step:
    """One generation step of one sample, as shown by ``--trace``.

    Probabilities are the model's own next-token distribution (softmax of the raw
    logits), so the table shows what the model thinks before any decoding rule.
    """

    chosen_id: int
    chosen_token: str
    chosen_prob: float
    rank: int
    """1 = the most likely token."""
    entropy: float
    """Of the model's distribution, in nats."""
    top: list[dict]
    """``[{id, token, prob}]``, most likely first."""
    text: str = ""
    """The continuation before this step's token."""


@dataclass
class Sample:
    prompt: str
    prompt_index: int
    sample_index: int
    text: str
    """The continuation only, stopped before any stop string."""
    token_ids: list[int]
    """The continuation's ids (without a final EOS)."""
    finish_reason: str = "length"
    """``eos``, ``stop`` or ``length``."""
    seed: int | None = None
    steps: list[Step] | None = None

    def to_dict(self, trace: bool = False) -> dict:
        d = {"prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
             "sample": self.sample_index, "finish_reason": self.finish_reason, "seed": self.seed}
        if trace and self.steps is not None:
            d["steps"] = [{k: v for k, v in asdict(s).items() if k != "text"} for s in self.steps]
        return d


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt; an empty prompt starts from BOS (or EOS, GPT-2 style)."""
    out = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=True)["input_ids"] if p else []
        if not ids:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:
                raise StyletuneError("empty prompt and the tokenizer has no BOS/EOS token to start from")
            ids = [start]
        out.append(ids)
    return out


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so every row ends at T-1."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def check_context(lm, prompt_lengths: list[int], max_new_tokens: int) -> None:
    longest = max(prompt_lengths)
    if longest + max_new_tokens > lm.context_length:
        raise StyletuneError(
            f"the prompt has {longest} tokens and --max-new-tokens is {max_new_tokens}: "
            f"{longest + max_new_tokens} exceeds the model's context of {lm.context_length} tokens; "
            "shorten the prompt or lower --max-new-tokens"
        )


def new_seed() -> int:
    return random.SystemRandom().randrange(2**31)


class _Stream:
    """Incremental detokenisation with stop strings, for one sample.

    Decodes the whole continuation each step (robust for byte-level BPE, where a
    character can span tokens) and only hands out text that can no longer change:
    an incomplete UTF-8 character or a possible start of a stop string is held back.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def push(self, token_id: int) -> bool:
        """Add a token; True when a stop string has appeared (text is then cut before it)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            self.ids.pop()  # the token that completed the stop string is not part of the output
            return True
        self.text = text
        return False

    def ready(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end -= self.holdback
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        chunk, self.emitted = self.text[self.emitted:end], end
        return chunk


def _trace_step(tokenizer, logits: torch.Tensor, chosen: int, top_n: int, text: str) -> Step:
    logp = torch.log_softmax(logits.float(), dim=-1)
    probs = logp.exp()
    entropy = float(-(probs * logp).nan_to_num().sum())
    p_chosen = probs[chosen]
    rank = int((probs > p_chosen).sum()) + 1
    top_p, top_i = torch.topk(probs, min(top_n, probs.numel()))
    top = [{"id": int(i), "token": tokenizer.decode([int(i)]), "prob": float(p)} for p, i in zip(top_p, top_i)]
    return Step(chosen_id=chosen, chosen_token=tokenizer.decode([chosen]), chosen_prob=float(p_chosen),
                rank=rank, entropy=entropy, top=top, text=text)


def pick_tokens(cfg: DecodingConfig, shaping, sampling, seq: torch.Tensor, logits: torch.Tensor,
                gens: list[torch.Generator]) -> list[int]:
    """The next token of each row: ``seq`` (B, T) the ids so far, ``logits`` (B, V) the model's
    scores, ``gens`` one generator per row (seeded with the row's seed). Greedy, sampling or
    epsilon-greedy per ``cfg``, after the processors of :func:`build_processors`."""
    scores = shaping(seq, logits)
    if cfg.mode == "greedy":
        return scores.argmax(dim=-1).tolist()
    warped = sampling(seq, scores)
    probs = warped.softmax(dim=-1).cpu()
    greedy_pick = warped.argmax(dim=-1).tolist()
    chosen = []
    for r, g in enumerate(gens):
        # Every row draws the same random numbers in every mode, so eps only
        # decides *which* token, never shifts the random stream.
        u = float(torch.rand((), generator=g))
        take_best = cfg.mode == "eps" and u < cfg.eps
        sampled = int(torch.multinomial(probs[r], 1, generator=g))
        chosen.append(greedy_pick[r] if take_best else sampled)
    return chosen


@torch.inference_mode()
def generate(lm, prompts: list[str], cfg: DecodingConfig | None = None, *, trace_top: int = 0,
             on_text: TextCallback | None = None) -> list[Sample]:
    """Continue each prompt ``cfg.num_samples`` times.

    Args:
        lm: a :class:`~styletune.models.LoadedModel`.
        prompts: texts to continue (an empty string starts from BOS).
        cfg: decoding settings; validated here.
        trace_top: when > 0, record a :class:`Step` per token with this many candidates.
        on_text: streaming callback ``(row, text)``; row = prompt_index * num_samples + sample_index.

    Returns:
        Samples ordered by prompt, then sample index.
    """
    cfg = (cfg or DecodingConfig()).validate()
    if not prompts:
        raise StyletuneError("no prompt given")
    tok = lm.tokenizer
    encoded = encode_prompts(tok, prompts)
    check_context(lm, [len(e) for e in encoded], cfg.max_new_tokens)
    seed = cfg.seed if cfg.seed is not None else new_seed()
    if cfg.mode == "beam":
        return _beam(lm, prompts, encoded, cfg, seed, on_text)

    n = cfg.num_samples
    rows = [(p, i) for p in range(len(prompts)) for i in range(n)]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = left_pad([encoded[p] for p, _ in rows], pad_id, lm.device)
    gens = [torch.Generator(device="cpu").manual_seed(seed + i) for _, i in rows]
    shaping, sampling = build_processors(cfg)
    eos = lm.eos_token_id if cfg.stop_at_eos else None
    streams = [_Stream(tok, cfg.stop) for _ in rows]
    steps: list[list[Step]] = [[] for _ in rows]
    finish = ["length"] * len(rows)
    done = [False] * len(rows)

    def accept(r: int, t: int, row_logits: torch.Tensor) -> None:
        """Row r's token t: trace it, end the row at EOS or a stop string, stream its new text."""
        if trace_top:
            steps[r].append(_trace_step(tok, row_logits, t, trace_top, streams[r].text))
        if eos is not None and t == eos:
            done[r], finish[r] = True, "eos"
        elif streams[r].push(t):
            done[r], finish[r] = True, "stop"
        if on_text:
            chunk = streams[r].ready(final=done[r])
            if chunk:
                on_text(r, chunk)

    slots = _slot_decoder(lm, [encoded[p] for p, _ in rows], cfg.max_new_tokens)
    if slots is not None:
        # Per-sequence KV slots: every row at its own positions (no padding), and a finished row
        # leaves the batch, so later steps decode only the rows still going.
        decoder, logits = slots
        seqs = [list(encoded[p]) for p, _ in rows]
        live = list(range(len(rows)))
        for step in range(cfg.max_new_tokens):
            chosen = {r: pick_tokens(cfg, shaping, sampling, torch.tensor([seqs[r]], device=lm.device),
                                     logits[k][None], [gens[r]])[0] for k, r in enumerate(live)}
            for k, r in enumerate(live):
                accept(r, chosen[r], logits[k])
            live = [r for r in live if not done[r]]
            if not live or step == cfg.max_new_tokens - 1:
                break  # no forward pass for a token nobody will read
            for r in live:
                seqs[r].append(chosen[r])
            logits = decoder.decode(live, [chosen[r] for r in live])
    else:
        # One left-padded batch through transformers' forward (or the compiled fixed-shape step).
        logits, cache = forward_step(lm.model, ids, mask)  # (B, V): the whole prompt in one pass
        fast = _fast_decoder(lm, cache, len(rows), ids.shape[1] + cfg.max_new_tokens)
        seq = ids
        for step in range(cfg.max_new_tokens):
            chosen_list = pick_tokens(cfg, shaping, sampling, seq, logits, gens)
            for r, t in enumerate(chosen_list):
                if not done[r]:
                    accept(r, t, logits[r])
            if all(done) or step == cfg.max_new_tokens - 1:
                break
            # Finished rows decode padding here (fixed shapes); their output is already fixed.
            nxt = torch.tensor([pad_id if d else t for d, t in zip(done, chosen_list)], device=seq.device)[:, None]
            seq = torch.cat([seq, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            if fast is not None:
                logits = fast.step(nxt, mask)
            else:
                logits, cache = forward_step(lm.model, nxt, mask, cache)

    samples = []
    for r, (p, i) in enumerate(rows):
        if on_text:
            chunk = streams[r].ready(final=True)
            if chunk:
                on_text(r, chunk)
        samples.append(Sample(prompt=prompts[p], prompt_index=p, sample_index=i, text=streams[r].text,
                              token_ids=list(streams[r].ids), finish_reason=finish[r],
                              seed=seed + i if cfg.mode in ("sample", "eps") else None,
                              steps=steps[r] if trace_top else None))
    return samples


def _slot_decoder(lm, rows: list[list[int]], max_new_tokens: int):
    """(decoder, first logits (B, V)) with row r's prompt in slot r, for models with the lean step;
    None for the others and for ``--compile`` (whose step needs the fixed shapes of one padded batch).
    Samples of one prompt share its prefill: the first slot's cache is copied to the others."""
    from . import fast

    if not getattr(lm, "fast_decode", False) or getattr(lm, "compile", False) or not fast.supports(lm.model):
        return None
    decoder = fast.SlotDecoder(lm.model, len(rows), max(len(r) for r in rows) + max_new_tokens,
                               quantize=getattr(lm, "quantize", None))
    keys = [tuple(ids) for ids in rows]
    first: dict[tuple, int] = {}  # each distinct prompt -> the slot that holds its prefill
    for slot, key in enumerate(keys):
        first.setdefault(key, slot)
    logits = decoder.prefill_rows(list(first.values()), [list(key) for key in first])  # (distinct prompts, V)
    row_of = {key: n for n, key in enumerate(first)}
    for slot, key in enumerate(keys):
        if first[key] != slot:
            decoder.copy_slot(first[key], slot)
    return decoder, logits[[row_of[key] for key in keys]]


def _fast_decoder(lm, cache, batch: int, max_len: int):
    """The lean decode step when the model allows it (else None: transformers' forward)."""
    from . import fast

    if not getattr(lm, "fast_decode", False) or not fast.supports(lm.model) or not hasattr(cache, "layers"):
        return None
    decoder = fast.FastDecoder(lm.model, batch, max_len, quantize=getattr(lm, "quantize", None),
                               compile=getattr(lm, "compile", False))
    decoder.load_cache(cache)
    return decoder


def _beam(lm, prompts, encoded, cfg: DecodingConfig, seed: int, on_text: TextCallback | None) -> list[Sample]:
    from .strategies import beam_search

    tok = lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = left_pad(encoded, pad_id, lm.device)
    shaping, _ = build_processors(cfg)
    results = beam_search(lm.model, ids, mask, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                          eos_token_id=lm.eos_token_id if cfg.stop_at_eos else None,
                          processors=shaping or None, length_penalty=cfg.length_penalty,
                          num_return_sequences=cfg.num_samples)
    samples = []
    for p, seqs in enumerate(results):
        for i, token_ids in enumerate(seqs):
            stream = _Stream(tok, cfg.stop)
            finish = "length"
            for t in token_ids:
                if cfg.stop_at_eos and t == lm.eos_token_id:
                    finish = "eos"
                    break
                if stream.push(t):
                    finish = "stop"
                    break
            row = p * cfg.num_samples + i
            if on_text and stream.text:
                on_text(row, stream.text)
            samples.append(Sample(prompt=prompts[p], prompt_index=p, sample_index=i, text=stream.text,
                                  token_ids=list(stream.ids), finish_reason=finish, seed=None))
    return samples
