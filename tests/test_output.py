"""Clean output: no library deprecation warnings reach the user, and the one-off GGUF conversion
shows one labelled progress bar (on a terminal only)."""

import io
import warnings

import pytest

from styletune.config import DecodingConfig
from styletune.decoding.engine import generate
from styletune.models import load_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("fast_decode", [True, False])
def test_generation_raises_no_deprecation_warning(tiny_model_dirs, family, fast_decode):
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; the old name warns (FutureWarning)
    on every call. The current API is used, not a filter: every warning is recorded here."""
    lm = load_model(str(tiny_model_dirs[family]), device="cpu", dtype="float32")
    lm.fast_decode = fast_decode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(lm, ["Once upon a", "The"], DecodingConfig(max_new_tokens=4, seed=1, num_beams=1))
        generate(lm, ["Once upon a"], DecodingConfig(max_new_tokens=4, num_beams=2))
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class _Log(io.StringIO):
    def isatty(self):
        return False


@pytest.mark.parametrize("stream,shown", [(_Terminal, True), (_Log, False)])
def test_the_gguf_conversion_shows_one_labelled_bar_on_a_terminal(monkeypatch, stream, shown):
    import sys

    import transformers.modeling_gguf_pytorch_utils as gguf_loading

    from styletune.models import _one_progress_bar

    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    original = gguf_loading.tqdm
    with _one_progress_bar("converting model.gguf once"):
        # What transformers' loader does: one bar over the tensors, with its own description.
        for _ in gguf_loading.tqdm(range(272), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert gguf_loading.tqdm is original  # restored
    assert "Converting and de-quantizing" not in err.getvalue()
    assert ("converting model.gguf once" in err.getvalue()) == shown
