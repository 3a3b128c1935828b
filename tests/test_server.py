"""styletune serve: the OpenAI-compatible API, tested with the official `openai` client against a
live server on 127.0.0.1, continuous batching under 32 concurrent streams, and bad requests."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time

import httpx
import pytest

from styletune.config import DecodingConfig
from styletune.decoding.engine import generate
from styletune.models import load_model
from styletune.server import Limits, ServerState, create_app, load_into, render_chat

PROMPTS = ["Once upon a midnight", "The quick brown fox", "Había una vez", "Why did the chicken"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on 127.0.0.1 in a thread, started and stopped by the test."""

    def __init__(self, state: ServerState):
        import uvicorn

        self.state = state
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port,
                                                    log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        for served in self.state.models.values():
            served.scheduler.close()


def start(models: list[str], **state_kw) -> LiveServer:
    state = ServerState(**state_kw)
    load_into(state, models[0], models[1] if len(models) > 1 else None, max_concurrency=8, device="cpu",
              dtype="float32")
    return LiveServer(state)


@pytest.fixture(scope="module")
def server(tiny_model_dirs):
    live = start([str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])], limits=Limits(max_tokens_cap=200))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def llama_id(tiny_model_dirs):
    return str(tiny_model_dirs["llama"])


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm(llama_id):
    return load_model(llama_id, device="cpu", dtype="float32")


def alone(lm, prompt, **cfg):
    """What `styletune generate` gives for this prompt and these settings."""
    [sample] = generate(lm, [prompt], DecodingConfig(**cfg))
    return sample


def test_models_and_health(server, client, llama_id, tiny_model_dirs):
    assert [m.id for m in client.models.list().data] == [llama_id, str(tiny_model_dirs["gpt2"])]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["models"][llama_id]["batched"] is True
    assert health["models"][str(tiny_model_dirs["gpt2"])]["batched"] is True  # GPT-2 has the lean step too


def test_completion_equals_styletune_generate(client, lm, llama_id):
    r = client.completions.create(model=llama_id, prompt=PROMPTS[0], max_tokens=12, temperature=0.9, top_p=0.95,
                                  seed=7, extra_body={"top_k": 40, "repetition_penalty": 1.2,
                                                      "no_repeat_ngram_size": 3, "min_p": 0.01})
    expected = alone(lm, PROMPTS[0], max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7, top_k=40,
                     repetition_penalty=1.2, no_repeat_ngram_size=3, min_p=0.01)
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(lm.tokenizer(PROMPTS[0])["input_ids"])
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("extra,cfg", [
    ({"temperature": 0}, {"greedy": True}),
    ({"temperature": 1.0, "extra_body": {"eps": 0.5}}, {"eps": 0.5}),
    ({"temperature": 0, "extra_body": {"num_beams": 3}}, {"num_beams": 3}),
])
def test_strategies_equal_styletune_generate(client, lm, llama_id, extra, cfg):
    r = client.completions.create(model=llama_id, prompt=PROMPTS[1], max_tokens=10, seed=3, **extra)
    assert r.choices[0].text == alone(lm, PROMPTS[1], max_new_tokens=10, seed=3, **cfg).text


def test_streaming_completion_and_prompt_lists(client, llama_id):
    plain = client.completions.create(model=llama_id, prompt=PROMPTS[:2], max_tokens=10, seed=5, n=2)
    assert [c.index for c in plain.choices] == [0, 1, 2, 3]
    assert plain.choices[0].text != plain.choices[1].text  # sample i has seed + i
    chunks = list(client.completions.create(model=llama_id, prompt=PROMPTS[:2], max_tokens=10, seed=5, n=2,
                                            stream=True))
    texts = {}
    finishes = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(4)] == [c.text for c in plain.choices]
    assert finishes == {c.index: c.finish_reason for c in plain.choices}
    echoed = client.completions.create(model=llama_id, prompt=PROMPTS[0], max_tokens=4, seed=5, echo=True)
    assert echoed.choices[0].text.startswith(PROMPTS[0])


def test_stop_strings(client, lm, llama_id):
    full = alone(lm, PROMPTS[2], max_new_tokens=30, seed=11, stop_at_eos=True)
    stop = full.text[5:7]
    r = client.completions.create(model=llama_id, prompt=PROMPTS[2], max_tokens=30, seed=11, stop=[stop])
    assert r.choices[0].text == full.text[:full.text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_logprobs(client, lm, llama_id):
    r = client.completions.create(model=llama_id, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy: the top one
    [sample] = generate(lm, [PROMPTS[0]], DecodingConfig(greedy=True, max_new_tokens=6), trace_top=3)
    assert lp.token_logprobs == pytest.approx([__import__("math").log(s.chosen_prob) for s in sample.steps], abs=1e-4)
    chat = client.chat.completions.create(model=llama_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)


def test_chat_uses_the_template(client, lm, llama_id):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about ravens"}]
    r = client.chat.completions.create(model=llama_id, messages=messages, max_tokens=8, seed=2)
    prompt = render_chat(lm.tokenizer, messages)
    assert prompt == "system: Be brief.\nuser: Tell me about ravens\nassistant:"  # no chat template: the plain one
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == alone(lm, prompt, max_new_tokens=8, seed=2).text
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=llama_id, messages=messages, max_tokens=8, seed=2, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content


def test_chat_template_is_rendered_in_the_sandbox(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert render_chat(tok, [{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    from styletune.server import ApiError

    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"  # a template trying to escape
    with pytest.raises(ApiError, match="chat template failed"):
        render_chat(tok, [{"role": "user", "content": "hi"}])


def test_a_second_architecture_is_served_beside_the_first(client, tiny_model_dirs):
    gpt2 = str(tiny_model_dirs["gpt2"])
    r = client.completions.create(model=gpt2, prompt=PROMPTS[0], max_tokens=6, seed=1)
    lm = load_model(gpt2, device="cpu", dtype="float32")
    assert r.choices[0].text == alone(lm, PROMPTS[0], max_new_tokens=6, seed=1).text


def test_32_concurrent_streams_each_get_their_own_text(server, client, lm, llama_id):
    jobs = [(PROMPTS[i % 4], 100 + i, 20 + i % 5) for i in range(32)]

    def one(job):
        prompt, seed, n = job
        stream = client.completions.create(model=llama_id, prompt=prompt, max_tokens=n, seed=seed, temperature=1.1,
                                           stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)

    scheduler = server.state.models[llama_id].scheduler
    scheduler.max_batch_seen = 0
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, jobs))
    assert got == [alone(lm, p, max_new_tokens=n, seed=s, temperature=1.1).text for p, s, n in jobs]
    assert scheduler.max_batch_seen > 4  # decoded together, not one after another


def test_a_client_that_disconnects_frees_its_slot(server, llama_id, monkeypatch):
    scheduler = server.state.models[llama_id].scheduler
    real = scheduler.decoder.decode

    def slow(*a, **k):  # < 40 tokens/s: its 200 tokens would take over 5 s
        time.sleep(0.025)
        return real(*a, **k)

    monkeypatch.setattr(scheduler.decoder, "decode", slow)
    # ignore_eos: a sampled end-of-text token (1 in 320 for the tiny model) would end it before the check
    body = {"model": llama_id, "prompt": PROMPTS[0], "max_tokens": 200, "stream": True, "seed": 0, "ignore_eos": True}
    steps_before = scheduler.steps
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            next(response.iter_lines())  # the first chunk: it is running
            assert len(scheduler.active) == 1
    deadline = time.time() + 5
    while scheduler.active and time.time() < deadline:
        time.sleep(0.02)
    assert scheduler.active == [] and len(scheduler.free) == scheduler.max_concurrency
    assert scheduler.steps - steps_before < 150  # stopped well before its 200 tokens


def test_the_scheduler_keeps_serving_after_a_request_fails(server, client, llama_id, monkeypatch):
    import openai

    import styletune.decoding.scheduler as sched

    real = sched.pick_tokens

    def fails_for_seed_666(cfg, *args):
        if args[-1][0].initial_seed() == 666:
            raise RuntimeError("injected failure")
        return real(cfg, *args)

    monkeypatch.setattr(sched, "pick_tokens", fails_for_seed_666)
    with pytest.raises(openai.InternalServerError, match="injected failure"):
        client.completions.create(model=llama_id, prompt=PROMPTS[0], max_tokens=5, seed=666)
    ok = client.completions.create(model=llama_id, prompt=PROMPTS[0], max_tokens=5, seed=1)
    assert ok.choices[0].finish_reason in ("length", "stop")


# ------------------------------------------------------------------------------- bad requests


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("body,status,param", [
    ({}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"prompt": "x", "stop": [1, 2]}, 400, "stop"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "word " * 250, "max_tokens": 100}, 400, "max_tokens"),  # over the tiny model's 256 positions
])
def test_bad_completion_requests(server, llama_id, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": llama_id, **body})
    assert r.status_code == status
    assert error_of(r)["param"] == param
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_bad_bodies_and_chat(server, llama_id):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20))
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    for messages in (None, [], [{"role": "user"}], [{"role": "robot", "content": "hi"}]):
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": llama_id, "messages": messages})
        assert r.status_code == 400 and error_of(r)["param"] == "messages"
    r = httpx.post(server.url + "/v1/completions", json={"model": llama_id, "prompt": "x", "num_beams": 2,
                                                         "stream": True})
    assert r.status_code == 400 and error_of(r)["param"] == "stream"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_api_key_and_loading(tiny_model_dirs):
    from openai import AuthenticationError, OpenAI

    state = ServerState(api_key="s3cret")
    live = LiveServer(state)  # not loaded yet: every endpoint says so
    try:
        assert httpx.get(live.url + "/health").status_code == 503
        r = httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 503 and error_of(r)["code"] == "loading"
        load_into(state, str(tiny_model_dirs["llama"]), None, max_concurrency=2, device="cpu", dtype="float32")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(live.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=str(tiny_model_dirs["llama"]), prompt="x", max_tokens=2).choices
        assert httpx.get(live.url + "/").status_code == 200  # the page itself needs no key; its API calls do
    finally:
        live.stop()


def test_a_full_queue_is_429(tiny_model_dirs, monkeypatch):
    state = ServerState()
    load_into(state, str(tiny_model_dirs["llama"]), None, max_concurrency=1, device="cpu", dtype="float32")
    live = LiveServer(state)
    try:
        scheduler = next(iter(state.models.values())).scheduler
        real = scheduler.decoder.decode
        monkeypatch.setattr(scheduler.decoder, "decode", lambda *a: time.sleep(0.02) or real(*a))
        body = {"prompt": "x", "max_tokens": 100, "n": 4}  # 1 slot + a queue of 4: the 2nd request overflows
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, live.url + "/v1/completions", json=body, timeout=60)
            deadline = time.time() + 30
            while scheduler.busy < 4 and time.time() < deadline:  # the first request's 4 sequences are in
                time.sleep(0.01)
            second = httpx.post(live.url + "/v1/completions", json=body, timeout=60)
            assert second.status_code == 429 and error_of(second)["type"] == "rate_limit_error"
            assert first.result().status_code == 200
    finally:
        live.stop()


def test_cli_serve_binds_localhost_by_default(tiny_model_dirs):
    from click.testing import CliRunner

    from styletune.cli import main

    r = CliRunner().invoke(main, ["serve", "--help"])
    assert r.exit_code == 0 and "127.0.0.1" in r.output
    bad = CliRunner().invoke(main, ["serve", "--model", "no-such-model"])
    assert bad.exit_code == 2 and "unknown model" in bad.output and bad.output.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(main, ["serve", "--model", str(tiny_model_dirs["llama"]), "--port", str(port)])
    assert busy.exit_code == 2 and f"cannot serve on 127.0.0.1:{port}" in busy.output, busy.output
