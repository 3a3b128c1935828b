"""The exported GGUF against llama.cpp itself (opt-in: `make test-llamacpp`, which builds
llama-cpp-python from source, ~10-20 minutes on 2 cores).

A real tuned run of the bundled SmolLM2-135M is exported in F32, F16 and Q8_0; llama.cpp must
tokenize the prompts as styletune does, continue them greedily with the same 32 tokens (F32
and F16), and give Q8_0 a perplexity within 1% of F32's on held-out text.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = [pytest.mark.llamacpp, pytest.mark.real_model]

PROMPTS = ["Why do programmers prefer dark mode?", "A SQL query walks into a bar", "Once upon a time",
           "My code", "How many programmers does it take to change a light bulb?"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A LoRA run of the bundled model on pyjokes' jokes (a few steps: enough to change the model),
    exported three ways."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make test-llamacpp`")
    import pyjokes

    from styletune.config import DataConfig, TrainConfig
    from styletune.exporting import export
    from styletune.training import train

    mp = pytest.MonkeyPatch()
    mp.delenv("STYLETUNE_CACHE", raising=False)  # the user cache: the bundled model is converted once
    root = tmp_path_factory.mktemp("llamacpp")
    corpus = root / "jokes.txt"
    corpus.write_text("\n\n".join(pyjokes.get_jokes(language="en", category="all")), encoding="utf-8")
    run = root / "run"
    train(TrainConfig(out=str(run), model="smollm2-135m", lr=2e-3, max_steps=6, batch_size=4, seed=0,
                      data=DataConfig(sources=[str(corpus)], block_size=128), save_every=100,
                      eval_max_new_tokens=4, device="cpu"))
    files = {q: export(str(run), str(root / q), quant=q).out / "run.gguf" for q in ("f32", "f16", "q8_0")}
    yield run, files
    mp.undo()


def _llama(path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0)


def _greedy_llamacpp(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _perplexity(llm, ids: list[int]) -> float:
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return math.exp(-np.mean([logp[i, ids[i + 1]] for i in range(len(ids) - 1)]))


def test_llamacpp_continues_as_styletune_does(exported, capsys):
    from styletune.config import DecodingConfig
    from styletune.decoding.engine import generate
    from styletune.models import load_model

    run, files = exported
    lm = load_model(str(run), device="cpu", dtype="float32")
    ours = generate(lm, PROMPTS, DecodingConfig(greedy=True, max_new_tokens=32, stop_at_eos=False))
    report = []
    for quant in ("f32", "f16"):
        llm = _llama(files[quant])
        for prompt, sample in zip(PROMPTS, ours):
            ids = lm.tokenizer(prompt)["input_ids"]
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, prompt
            theirs = _greedy_llamacpp(llm, ids, 32)
            report.append(f"{quant} {prompt!r}: {'same' if theirs == sample.token_ids else 'DIFFERENT'} "
                          f"({sum(a == b for a, b in zip(theirs, sample.token_ids))}/32 tokens)")
            assert theirs == sample.token_ids, (quant, prompt, lm.tokenizer.decode(theirs), sample.text)
    with capsys.disabled():
        print("\n" + "\n".join(report))


def test_q8_0_perplexity_is_within_one_percent_of_f32(exported, capsys):
    """On the run's own validation jokes (held out from training), rebuilt as training split them."""
    from styletune.config import load_yaml, train_config_from_dict
    from styletune.data import prepare_data
    from styletune.models import load_model

    run, files = exported
    cfg = train_config_from_dict(load_yaml(run / "config.yaml"))
    lm = load_model(str(run), device="cpu", dtype="float32")
    val = prepare_data(cfg.data, lm.tokenizer, seed=cfg.seed, max_block_size=lm.context_length).val
    ids = [t for i in range(min(3, len(val))) for t in val[i]["input_ids"].tolist()]
    assert len(ids) >= 256
    ppl = {q: _perplexity(_llama(files[q]), ids) for q in ("f32", "f16", "q8_0")}
    with capsys.disabled():
        print(f"\nllama.cpp perplexity on {len(ids)} held-out tokens: "
              + ", ".join(f"{q} {p:.3f}" for q, p in ppl.items()) + f"; q8_0/f32 = {ppl['q8_0'] / ppl['f32']:.4f}")
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01
