"""``styletune serve``: an OpenAI-compatible HTTP API and a web page, on FastAPI + uvicorn.

Endpoints (as vLLM's and llama.cpp's servers have them): ``GET /health``, ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` for server-sent
events), and the page at ``/``. Each served model has its own :class:`Scheduler`, which
decodes every request in flight together (continuous batching).

Besides OpenAI's fields the request bodies accept styletune's own decoding controls:
``top_k``, ``min_p``, ``eps``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``num_beams``,
and vLLM's ``ignore_eos``.
Errors come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from .config import DecodingConfig
from .decoding.engine import encode_prompts
from .decoding.scheduler import Event, QueueFull, Request, Scheduler
from .errors import StyletuneError

PLAIN_CHAT_TEMPLATE = "{role}: {content}\n"
"""For a model without a chat template: each message as ``role: content`` on its own line, then
``assistant:`` for the model to continue."""


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_tokens_cap: int = 1024
    """The most tokens one request may ask for."""
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 100_000
    max_n: int = 16
    timeout: float | None = 300.0
    """Seconds a request may run (queue time included)."""
    max_model_len: int = 2048
    """Positions per sequence, prompt and completion together (capped by the model's context), as
    vLLM's ``--max-model-len``: the KV slots are allocated for this many."""


@dataclass
class Served:
    """A model behind the API: its name in ``/v1/models`` and its scheduler."""

    id: str
    lm: object
    scheduler: Scheduler
    role: str = "model"


@dataclass
class ServerState:
    models: dict[str, Served] = field(default_factory=dict)
    default: str | None = None
    ready: bool = False
    load_error: str | None = None
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    created: int = field(default_factory=lambda: int(time.time()))


# ---------------------------------------------------------------------------------------------
# Requests -> decoding settings


def _number(body: dict, name: str, kind, default=None, low=None, high=None, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if value != value or value in (float("inf"), float("-inf")):
        raise ApiError(400, f"'{name}' must be finite, got {value!r}", name)
    if low is not None and (value <= low if low_open else value < low):
        raise ApiError(400, f"'{name}' must be {'>' if low_open else '>='} {low}, got {value}", name)
    if high is not None and value > high:
        raise ApiError(400, f"'{name}' must be <= {high}, got {value}", name)
    return kind(value)


def decoding_from_body(body: dict, limits: Limits, default_max_tokens: int) -> tuple[DecodingConfig, int, int]:
    """(DecodingConfig for one sample, n, seed) from an OpenAI request body plus styletune's fields.

    ``temperature: 0`` means greedy, as in OpenAI's API; ``eps`` is epsilon-greedy; ``num_beams`` > 1
    beam search. Every value is checked here and named in the error."""
    max_tokens = _number(body, "max_tokens", int, default_max_tokens, low=0)
    if "max_completion_tokens" in body:
        max_tokens = _number(body, "max_completion_tokens", int, max_tokens, low=0)
    if max_tokens > limits.max_tokens_cap:
        raise ApiError(400, f"'max_tokens' is {max_tokens}; this server allows at most {limits.max_tokens_cap}",
                       "max_tokens")
    temperature = _number(body, "temperature", float, 1.0, low=0, high=2)
    top_p = _number(body, "top_p", float, None, low=0, high=1, low_open=True)
    n = _number(body, "n", int, 1, low=1, high=limits.max_n)
    seed = _number(body, "seed", int, None, low=0)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = stop
    else:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    num_beams = _number(body, "num_beams", int, 1, low=1, high=16)
    cfg = DecodingConfig(
        max_new_tokens=max_tokens, greedy=temperature == 0, temperature=temperature if temperature > 0 else 1.0,
        top_k=_number(body, "top_k", int, None, low=1), top_p=top_p,
        min_p=_number(body, "min_p", float, None, low=0, high=1), eps=_number(body, "eps", float, None, low=0, high=1),
        num_beams=num_beams, repetition_penalty=_number(body, "repetition_penalty", float, 1.0, low=0, low_open=True),
        no_repeat_ngram_size=_number(body, "no_repeat_ngram_size", int, 0, low=0), stop=stops, num_samples=1,
        stop_at_eos=not _flag(body, "ignore_eos"))
    try:
        cfg.validate()
    except StyletuneError as exc:
        raise ApiError(400, str(exc).replace("--", "").replace("-", "_")) from None
    if seed is None:
        from .decoding.engine import new_seed

        seed = new_seed()
    return cfg, n, seed


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {value!r}", name)
    return value


def _logprobs_count(body: dict, chat: bool) -> int | None:
    if chat:
        if not body.get("logprobs"):
            return None
        return _number(body, "top_logprobs", int, 0, low=0, high=20)
    return _number(body, "logprobs", int, None, low=0, high=20)


# ---------------------------------------------------------------------------------------------
# The app


def create_app(state: ServerState):
    """The FastAPI application for ``state`` (whose models may still be loading: 503 until ready)."""
    app = FastAPI(title="styletune", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        return JSONResponse(ApiError(400, f"invalid request: {exc.errors()[0].get('msg', exc)}").body(), status_code=400)

    @app.exception_handler(404)
    async def not_found(_request, _exc):
        return JSONResponse(ApiError(404, "no such endpoint", code="not_found").body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(_request, _exc):
        return JSONResponse(ApiError(405, "method not allowed").body(), status_code=405)

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        try:
            if request.url.path.startswith("/v1/"):
                _check_key(state, request.headers.get("authorization"))
                length = request.headers.get("content-length")
                if length is not None and int(length) > state.limits.max_body_bytes:
                    raise ApiError(413, f"the request body is over {state.limits.max_body_bytes} bytes",
                                   code="request_too_large")
                if not state.ready:
                    raise ApiError(503, state.load_error or "the model is loading; retry in a few seconds",
                                   type_="server_error", code="loading")
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not state.ready:
            return JSONResponse({"status": "loading" if not state.load_error else "error",
                                 "error": state.load_error}, status_code=503)
        return {"status": "ok", "models": {m.id: {"active": len(m.scheduler.active),
                                                  "waiting": m.scheduler.waiting.qsize(),
                                                  "slots": m.scheduler.max_concurrency,
                                                  "batched": m.scheduler.batched} for m in state.models.values()}}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m.id, "object": "model", "created": state.created,
                                            "owned_by": "styletune", "role": m.role} for m in state.models.values()]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (resources.files("styletune") / "web" / "index.html").read_text(encoding="utf-8")

    async def read_body(request: HttpRequest) -> dict:
        raw = await request.body()
        if len(raw) > state.limits.max_body_bytes:
            raise ApiError(413, f"the request body is over {state.limits.max_body_bytes} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await read_body(request)
        served = _model(state, body)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            raise ApiError(400, "'prompt' is required: a string or a non-empty list of strings", "prompt")
        return await _respond(state, served, request, body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await read_body(request)
        served = _model(state, body)
        prompt = render_chat(served.lm.tokenizer, body.get("messages"))
        return await _respond(state, served, request, body, [prompt], chat=True)

    async def _respond(state, served: Served, http: HttpRequest, body: dict, prompts: list[str], chat: bool):
        limits = state.limits
        if sum(len(p) for p in prompts) > limits.max_prompt_chars:
            raise ApiError(400, f"the prompt is over {limits.max_prompt_chars} characters", "prompt")
        cfg, n, seed = decoding_from_body(body, limits, 16 if not chat else min(512, limits.max_tokens_cap))
        logprobs = _logprobs_count(body, chat)
        echo = _flag(body, "echo") and not chat
        stream = _flag(body, "stream")
        if cfg.mode == "beam" and stream:
            raise ApiError(400, "beam search ('num_beams' > 1) cannot stream", "stream")
        tok = served.lm.tokenizer
        room = served.scheduler.max_len
        for ids in encode_prompts(tok, prompts):  # as the scheduler will encode them
            length = len(ids)
            if length + cfg.max_new_tokens > room:
                raise ApiError(400, f"the prompt has {length} tokens and max_tokens is {cfg.max_new_tokens}: "
                               f"{length + cfg.max_new_tokens} exceeds the {room} positions a sequence may use here "
                               f"(the model's context is {served.lm.context_length})", "max_tokens",
                               code="context_length_exceeded")
        reqs = []
        # The scheduler's thread wakes this response's coroutine when a request has a new event.
        loop, wake = asyncio.get_running_loop(), asyncio.Event()

        def notify():
            loop.call_soon_threadsafe(wake.set)

        try:
            for p in prompts:
                for i in range(n):
                    reqs.append(served.scheduler.submit(Request(prompt=p, cfg=cfg, seed=seed + i, logprobs=logprobs,
                                                                timeout=limits.timeout, notify=notify)))
        except QueueFull as exc:
            for r in reqs:
                r.cancel()
            raise ApiError(429, str(exc), type_="rate_limit_error", code="queue_full") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            return StreamingResponse(_sse(http, served, reqs, prompts, n, rid, created, chat, echo, logprobs, wake),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _collect_all(http, reqs, wake)
        choices = []
        for index, (r, (text, tokens, finish, error)) in enumerate(zip(reqs, results)):
            if error:
                raise ApiError(500 if "timed out" not in error else 408, error, type_="server_error")
            prompt = prompts[index // n]
            if chat:
                choice = {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                if logprobs is not None:
                    choice["logprobs"] = {"content": [_chat_logprob(tok, e) for e in tokens]}
            else:
                choice = {"index": index, "text": (prompt if echo else "") + text, "finish_reason": finish,
                          "logprobs": _completion_logprobs(tok, tokens, (len(prompt) if echo else 0)) if logprobs
                          is not None else None}
            choices.append(choice)
        usage = _usage(reqs, n)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": served.id, "choices": choices, "usage": usage}

    return app


def _usage(reqs: list[Request], n: int) -> dict:
    prompt = sum(r.prompt_tokens for i, r in enumerate(reqs) if i % n == 0)
    completion = sum(r.completion_tokens for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _check_key(state: ServerState, header: str | None) -> None:
    if state.api_key is None:
        return
    given = header[7:] if header and header.startswith("Bearer ") else ""
    if not hmac.compare_digest(given.encode(), state.api_key.encode()):
        raise ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer KEY'",
                       type_="authentication_error", code="invalid_api_key")


def _model(state: ServerState, body: dict) -> Served:
    name = body.get("model") or state.default
    if not isinstance(name, str) or name not in state.models:
        raise ApiError(404, f"the model {name!r} is not served here; see /v1/models "
                       f"({', '.join(state.models)})", "model", code="model_not_found")
    return state.models[name]


def render_chat(tokenizer, messages) -> str:
    """The prompt for ``messages``: the model's chat template (transformers renders it in jinja2's
    sandbox), else :data:`PLAIN_CHAT_TEMPLATE`."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ApiError(400, "each message needs a 'role' (system, user or assistant) and a string 'content'",
                           "messages")
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template error is the request's, not the server's
            raise ApiError(400, f"the model's chat template failed on these messages: {exc}", "messages") from None
    return "".join(PLAIN_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages) + "assistant:"


async def _wait(http, wake: asyncio.Event) -> bool:
    """Until the scheduler has news (or half a second has passed); False once the client has gone."""
    try:
        await asyncio.wait_for(wake.wait(), timeout=0.5)
    except asyncio.TimeoutError:
        pass
    return not await http.is_disconnected()


def _drain(request: Request) -> list[Event]:
    events = []
    while True:
        try:
            events.append(request.events.get_nowait())
        except queue.Empty:
            return events


async def _collect_all(http, reqs: list[Request], wake: asyncio.Event):
    """Each request's (text, token events, finish reason, error), once all are done."""
    state = {i: ([], [], None, None) for i in range(len(reqs))}
    pending = set(state)
    while pending:
        wake.clear()  # before draining: an event that comes after is not missed
        for i in list(pending):
            text, tokens, _, _ = state[i]
            for event in _drain(reqs[i]):
                if event.kind == "token":
                    text.append(event.text)
                    if event.token_id is not None:
                        tokens.append(event)
                else:
                    state[i] = (text, tokens, event.finish_reason, event.error)
                    pending.discard(i)
        if pending and not await _wait(http, wake):
            for i in pending:
                reqs[i].cancel()
            break
    return [("".join(text), tokens, finish or "cancelled", error) for text, tokens, finish, error in state.values()]


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _completion_logprobs(tokenizer, events: list[Event], offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        piece = _token_text(tokenizer, e.token_id)
        out["tokens"].append(piece)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({_token_text(tokenizer, i): lp for i, lp in (e.top or [])} if e.top else None)
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def _chat_logprob(tokenizer, e: Event) -> dict:
    piece = _token_text(tokenizer, e.token_id)
    return {"token": piece, "logprob": e.logprob, "bytes": list(piece.encode()),
            "top_logprobs": [{"token": _token_text(tokenizer, i), "logprob": lp,
                              "bytes": list(_token_text(tokenizer, i).encode())} for i, lp in (e.top or [])]}


async def _sse(http, served: Served, reqs: list[Request], prompts, n, rid, created, chat, echo, logprobs,
               wake: asyncio.Event):
    """Server-sent events: one ``data: {json}`` chunk per token of each choice, a final chunk per
    choice with its ``finish_reason``, then ``data: [DONE]``."""
    tok = served.lm.tokenizer
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str, finish, event: Event | None, offset: int, first: bool) -> str:
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish}
            if logprobs is not None:
                choice["logprobs"] = {"content": [_chat_logprob(tok, event)]} if event and event.token_id is not None \
                    else None
        else:
            choice = {"index": index, "text": text, "finish_reason": finish,
                      "logprobs": _completion_logprobs(tok, [event], offset)
                      if logprobs is not None and event and event.token_id is not None else None}
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": served.id,
                                      "choices": [choice]}, ensure_ascii=False) + "\n\n"

    pending = {i: r for i, r in enumerate(reqs)}
    offsets = {i: len(prompts[i // n]) if echo else 0 for i in pending}
    first = {i: True for i in pending}
    try:
        if echo:
            for i in pending:
                yield chunk(i, prompts[i // n], None, None, 0, first[i])
                first[i] = False
        while pending:
            wake.clear()  # before draining: an event that comes after is not missed
            progressed = False
            for i, r in list(pending.items()):
                for event in _drain(r):
                    progressed = True
                    if event.kind == "token":
                        if event.text or first[i] or logprobs is not None:  # nothing new: no chunk
                            yield chunk(i, event.text, None, event, offsets[i], first[i])
                            first[i] = False
                        if event.token_id is not None:
                            offsets[i] += len(_token_text(tok, event.token_id))
                    elif event.kind == "done":
                        yield chunk(i, "", event.finish_reason, None, offsets[i], False)
                        del pending[i]
                    else:
                        yield "data: " + json.dumps(ApiError(500, event.error, type_="server_error").body()) + "\n\n"
                        del pending[i]
            if pending and not progressed and not await _wait(http, wake):
                break
        if not pending:
            yield "data: [DONE]\n\n"
    finally:
        for r in pending.values():  # the client went away (or the response was abandoned): free the slots
            r.cancel()


# ---------------------------------------------------------------------------------------------
# Loading and running


def load_into(state: ServerState, model: str, compare_with: str | None, max_concurrency: int, device: str,
              dtype: str, quantize: str | None = None) -> None:
    """Load the served model (and the comparison model) and start their schedulers; marks ``state``
    ready, or records the error (then /health and every endpoint say it)."""
    from .models import load_model

    try:
        names = [(model, "model")] + ([(compare_with, "comparison")] if compare_with else [])
        for name, role in names:
            lm = load_model(name, device=device, dtype=dtype, quantize=quantize)
            scheduler = Scheduler(lm, max_concurrency=max_concurrency, max_queue=4 * max_concurrency,
                                  max_len=state.limits.max_model_len)
            state.models[name] = Served(id=name, lm=lm, scheduler=scheduler, role=role)
        state.default = model
        state.ready = True
    except StyletuneError as exc:
        state.load_error = f"could not load the model: {exc}"
        raise


def serve(model: str, compare_with: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_concurrency: int = 8, limits: Limits | None = None,
          device: str = "auto", dtype: str = "auto", quantize: str | None = None, echo=print) -> None:
    """Load the models in the background and serve until Ctrl-C (uvicorn)."""
    import uvicorn

    from .models import resolve

    import socket

    resolve(model)  # a bad name fails now, as one line, before the server starts
    if compare_with:
        resolve(compare_with)
    try:  # so does a port that is taken (uvicorn would log it and exit with status 3)
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise StyletuneError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; pick another --port") from None
    state = ServerState(api_key=api_key, limits=limits or Limits())
    app = create_app(state)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    errors = []

    def load():
        try:
            load_into(state, model, compare_with, max_concurrency, device, dtype, quantize)
            echo(f"styletune serves {', '.join(state.models)} at http://{host}:{port}/ "
                 f"(OpenAI API at http://{host}:{port}/v1)")
        except StyletuneError as exc:
            errors.append(exc)
            server.should_exit = True

    threading.Thread(target=load, name="styletune-load", daemon=True).start()
    server.run()
    for served in state.models.values():
        served.scheduler.close()
    if errors:
        raise errors[0]
