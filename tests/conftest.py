"""Shared fixtures: offline first, then tiny models and a tiny tokenizer built here.

HF_HUB_OFFLINE must be set before transformers is imported anywhere, and any
socket connection fails the test, so nothing in the suite can reach a hub.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# An empty Hugging Face cache: what the suite sees must not depend on what this machine downloaded
# before (a cached gpt2 would turn "not in the local cache" tests into downloads-that-fail-offline).
import tempfile  # noqa: E402

os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="styletune-tests-hf-")

import socket  # noqa: E402

import pytest  # noqa: E402

CORPUS = (
    "Once upon a midnight dreary, while I pondered, weak and weary, "
    "over many a quaint and curious volume of forgotten lore. "
    "Había una vez un gato que vivía en una casa grande. "
    "The quick brown fox jumps over the lazy dog! Why did the chicken cross the road? "
    "To get to the other side. 0123456789 \n\t\"'()[]{}<>-_=+*/\\|@#$%^&~`;:,.?"
)


class _NoNetwork(socket.socket):
    def connect(self, address):  # pragma: no cover - only hit by a bug
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to reach the network: {address}")
        return super().connect(address)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setattr(socket, "socket", _NoNetwork)
    # Keep every cache (model conversions, tokenised data) inside the test tmp dir,
    # unless a test is explicitly about the real bundled model.
    if "STYLETUNE_TEST_REAL_CACHE" not in os.environ:
        monkeypatch.setenv("STYLETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def build_tokenizer(path=None):
    """A byte-level BPE tokenizer (~300 tokens) trained on CORPUS in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if path is not None:
        fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def build_gpt2(vocab_size, seed=0, n_positions=128, initializer_range=0.02):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0, initializer_range=initializer_range)
    return GPT2LMHeadModel(cfg).eval()


def build_llama(vocab_size, seed=0, max_positions=256, initializer_range=0.02):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True,
                      initializer_range=initializer_range)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer):
    return build_gpt2(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return build_llama(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer, tiny_gpt2, tiny_llama):
    """Both tiny models saved as ordinary Hugging Face directories (with the tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, model in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        d = root / name
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs[name] = d
    return dirs


@pytest.fixture(scope="session")
def train_model_dirs(tmp_path_factory, tokenizer):
    """Tiny models with larger initial weights (0.2, not 0.02): with near-zero weights the
    activations are so small that LoRA, which adapts them, has almost nothing to learn from."""
    root = tmp_path_factory.mktemp("train_models")
    dirs = {}
    for name, model in (("gpt2", build_gpt2(len(tokenizer), initializer_range=0.2)),
                        ("llama", build_llama(len(tokenizer), initializer_range=0.2))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: thread start-up costs more than their maths, and on a
    busy machine two threads per process oversubscribe the cores (tests ran 10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Both numeric paths on every machine. bf16 runs on any CPU (emulated, slower, where it has no
# avx512_bf16/AMX), so a test that takes `train_dtype` runs once in each, whatever this CPU is,
# and no test leaves the dtype to `auto` (which picks by the CPU).

DTYPES = ("float32", "bfloat16")

REORDER_RTOL = {"float32": 1e-4, "bfloat16": 1e-2}
"""Relative tolerance between two computations of the same training losses that differ only in
how floating-point operations are ordered or fused (compiled against eager kernels, 4 steps).
float32: unit roundoff 6e-8; reordered sums over a few thousand terms and four optimizer steps
stay near 1e-6, so 1e-4 is a wide margin that still catches a wrong mask or a missed update.
bfloat16: unit roundoff 2**-8 = 3.9e-3; eager autocast rounds every product's output to bf16
while inductor keeps fused intermediates in fp32, so the losses may differ by about one bf16
rounding of the logits (9.6e-4 measured on an AMX Xeon); 1e-2 is ~2.5 roundings."""


@pytest.fixture(params=DTYPES)
def train_dtype(request):
    """``--dtype`` for a training test that must hold in both numeric paths."""
    return request.param
