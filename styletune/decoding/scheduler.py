"""Continuous batching: one thread owns the model and decodes every active sequence together.

Requests are queued; between decode steps the scheduler admits waiting ones into free KV
slots (their prompts prefilled together), then runs one batched step for all active sequences, each with its
own decoding settings and random generator, and retires the finished, cancelled and timed-out
ones, so sequences join and leave the batch at every step (as vLLM and llama.cpp's server do).

Tokens are chosen exactly as :func:`styletune.decoding.engine.generate` chooses them (the same
processors, one generator per sample seeded with ``seed + i``, the same draws), so a request
gives the text ``styletune generate`` gives with the same settings and seed.

Models with the lean decode step (Llama and GPT-2 families, :func:`styletune.decoding.fast.supports`)
are batched; other models and beam search are served one request at a time through ``generate``
on the same thread.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import DecodingConfig
from ..errors import StyletuneError
from .engine import _Stream, encode_prompts, generate, pick_tokens
from .processors import build_processors


class QueueFull(StyletuneError):
    """Every slot is busy and the waiting queue is full."""


@dataclass
class Event:
    """What a request's consumer receives, in order: tokens, then one ``done`` (or ``error``)."""

    kind: str  # "token" | "done" | "error"
    text: str = ""
    """New text that can no longer change (stop strings and partial characters held back)."""
    token_id: int | None = None
    logprob: float | None = None
    """The model's log-probability of the token (raw logits, before any decoding rule)."""
    top: list[tuple[int, float]] | None = None
    """The ``logprobs`` most likely tokens and their log-probabilities, most likely first."""
    finish_reason: str | None = None
    """``stop`` (EOS or a stop string) or ``length``, on ``done``."""
    error: str | None = None


@dataclass
class Request:
    """One sequence to decode: a prompt and its own settings (one sample: seed is its own)."""

    prompt: str
    cfg: DecodingConfig
    seed: int
    logprobs: int | None = None
    """None: no log-probabilities; 0: the chosen token's; N: also the N most likely tokens'."""
    timeout: float | None = None
    events: "queue.Queue[Event]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    notify: "Callable[[], None] | None" = None
    """Called (on the scheduler's thread) after each event, so a consumer can wait instead of polling."""

    def emit(self, event: Event) -> None:
        self.events.put(event)
        if self.notify is not None:
            self.notify()

    def cancel(self) -> None:
        """Stop decoding it at the next step (a client that went away)."""
        self.cancelled.set()


@dataclass
class _Active:
    request: Request
    slot: int
    ids: list[int]
    logits: torch.Tensor
    gen: torch.Generator
    shaping: object
    sampling: object
    stream: _Stream
    eos: int | None
    deadline: float | None


class Scheduler:
    """Owns ``lm`` on its own thread; :meth:`submit` from any thread.

    Args:
        lm: a :class:`~styletune.models.LoadedModel`.
        max_concurrency: KV slots, i.e. sequences decoded together.
        max_queue: requests allowed to wait for a slot; beyond it :meth:`submit` raises :class:`QueueFull`.
        max_len: positions per slot, prompt and completion together (at most the model's context).
            The slots' KV cache is allocated up front: layers x slots x max_len x KV width, 96 MB per
            slot at 2048 positions for SmolLM2-135M in fp32.
    """

    def __init__(self, lm, max_concurrency: int = 8, max_queue: int = 64, max_len: int = 2048):
        from . import fast

        self.lm = lm
        self.max_concurrency = max_concurrency
        self.waiting: "queue.Queue[Request]" = queue.Queue(maxsize=max_queue)
        self.active: list[_Active] = []
        self.free = list(range(max_concurrency))
        self.batched = bool(getattr(lm, "fast_decode", True)) and fast.supports(lm.model)
        self.max_len = min(max_len, lm.context_length)
        self.decoder = (fast.SlotDecoder(lm.model, max_concurrency, self.max_len,
                                         quantize=getattr(lm, "quantize", None)) if self.batched else None)
        self.steps = 0
        self.max_batch_seen = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"styletune-scheduler-{lm.name}", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ any thread

    def submit(self, request: Request) -> Request:
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"all {self.max_concurrency} slots are busy and {self.waiting.maxsize} requests are "
                            "waiting; retry later") from None
        self._wake.set()
        return request

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=10)

    @property
    def busy(self) -> int:
        return len(self.active) + self.waiting.qsize()

    # ------------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._admit()
                if not self.active:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._step()
            except Exception as exc:  # noqa: BLE001 - one bad step must not stop the server
                for a in self.active:
                    self._retire(a, Event("error", error=f"decoding failed: {type(exc).__name__}: {exc}"))
                self.active.clear()
                self.free = list(range(self.max_concurrency))

    def _admit(self) -> None:
        """Waiting requests into free slots; their prompts are prefilled together (one pass reads the
        weights once, where a pass per prompt read them once each)."""
        admitted: list[tuple[Request, int, list[int]]] = []
        while self.free or not self.batched:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                break
            if request.cancelled.is_set():
                continue
            if request.cfg.max_new_tokens == 0:
                request.prompt_tokens = len(encode_prompts(self.lm.tokenizer, [request.prompt])[0])
                request.emit(Event("done", finish_reason="length"))
                continue
            if not self.batched or request.cfg.mode == "beam":
                self._run_alone(request)
                continue
            try:
                ids = encode_prompts(self.lm.tokenizer, [request.prompt])[0]
                request.prompt_tokens = len(ids)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                request.emit(Event("error", error=str(exc)))
                continue
            admitted.append((request, self.free.pop(), ids))
        if not admitted:
            return
        try:
            rows = self.decoder.prefill_rows([slot for _, slot, _ in admitted], [ids for _, _, ids in admitted])
        except Exception:  # noqa: BLE001 - find the request that fails: one at a time, the others go on
            rows = [None] * len(admitted)
            for n, (request, slot, ids) in enumerate(admitted):
                try:
                    rows[n] = self.decoder.prefill(slot, ids)
                except Exception as exc:  # noqa: BLE001
                    self.free.append(slot)
                    request.emit(Event("error", error=str(exc)))
        for (request, slot, ids), logits in zip(admitted, rows):
            if logits is None:
                continue
            shaping, sampling = build_processors(request.cfg)
            self.active.append(_Active(
                request=request, slot=slot, ids=list(ids), logits=logits,
                gen=torch.Generator(device="cpu").manual_seed(request.seed), shaping=shaping, sampling=sampling,
                stream=_Stream(self.lm.tokenizer, request.cfg.stop),
                eos=self.lm.eos_token_id if request.cfg.stop_at_eos else None,
                deadline=time.monotonic() + request.timeout if request.timeout else None))

    def _step(self) -> None:
        """Choose a token for every active sequence from its logits, retire the finished ones, then
        one batched forward pass for the rest."""
        now = time.monotonic()
        going: list[_Active] = []
        for a in self.active:
            req = a.request
            if req.cancelled.is_set():
                self._retire(a, Event("done", finish_reason="cancelled"))
                continue
            if a.deadline is not None and now > a.deadline:
                self._retire(a, Event("error", error=f"the request timed out after {req.timeout:g} s"))
                continue
            try:
                finish = self._choose(a)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                self._retire(a, Event("error", error=f"decoding failed: {type(exc).__name__}: {exc}"))
                continue
            if finish is not None:
                self._retire(a, Event("done", finish_reason=finish))
                continue
            going.append(a)
        self.active = going
        if going:
            logits = self.decoder.decode([a.slot for a in going], [a.ids[-1] for a in going])
            for a, row in zip(going, logits):
                a.logits = row
            self.steps += 1
            self.max_batch_seen = max(self.max_batch_seen, len(going))

    def _choose(self, a: _Active) -> str | None:
        """Pick ``a``'s next token and hand out its text; the finish reason, or None to go on."""
        req = a.request
        seq = torch.tensor([a.ids], device=a.logits.device)
        token = pick_tokens(req.cfg, a.shaping, a.sampling, seq, a.logits[None], [a.gen])[0]
        # EOS, or the token that completes a stop string, is not part of the output (as in generate).
        finish = "stop" if (a.eos is not None and token == a.eos) or a.stream.push(token) else None
        req.completion_tokens = len(a.stream.ids)
        if finish is None and req.completion_tokens >= req.cfg.max_new_tokens:
            finish = "length"
        text = a.stream.ready(final=finish is not None)
        if finish == "stop":
            if text:
                req.emit(Event("token", text=text))
            return finish
        event = Event("token", text=text, token_id=token)
        if req.logprobs is not None:
            logp = torch.log_softmax(a.logits.float(), dim=-1)
            event.logprob = float(logp[token])
            if req.logprobs:
                values, ids = torch.topk(logp, req.logprobs)
                event.top = list(zip(ids.tolist(), values.tolist()))
        req.emit(event)
        a.ids.append(token)
        return finish

    def _retire(self, a: _Active, last: Event) -> None:
        """Free ``a``'s slot and give its request its last event (``done`` or ``error``)."""
        self.free.append(a.slot)
        a.request.emit(last)

    def _run_alone(self, request: Request) -> None:
        """A model without the lean step, or beam search: the whole request through ``generate``.
        Text streams as it is made; with log-probabilities asked for, the tokens (from generate's
        trace) are handed out when the request is done."""
        import math

        try:
            cfg = dataclasses.replace(request.cfg, num_samples=1, seed=request.seed)
            request.prompt_tokens = len(encode_prompts(self.lm.tokenizer, [request.prompt])[0])
            if request.logprobs is None or cfg.mode == "beam":
                [sample] = generate(self.lm, [request.prompt], cfg,
                                    on_text=lambda _row, text: request.emit(Event("token", text=text)))
            else:
                [sample] = generate(self.lm, [request.prompt], cfg, trace_top=max(1, request.logprobs))
                stream = _Stream(self.lm.tokenizer, [])
                for n, (token, step) in enumerate(zip(sample.token_ids, sample.steps or [])):
                    stream.push(token)
                    top = [(c["id"], math.log(c["prob"]) if c["prob"] > 0 else -math.inf)
                           for c in step.top[:request.logprobs]] if request.logprobs else None
                    request.emit(Event("token", text=stream.ready(final=n == len(sample.token_ids) - 1),
                                             token_id=token, logprob=math.log(step.chosen_prob)
                                             if step.chosen_prob > 0 else -math.inf, top=top))
            request.completion_tokens = len(sample.token_ids)
            request.emit(Event("done", finish_reason="length" if sample.finish_reason == "length" else "stop"))
        except Exception as exc:  # noqa: BLE001
            request.emit(Event("error", error=str(exc)))
