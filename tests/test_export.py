"""styletune export: GGUF files that transformers' own GGUF loader reads back to the same model
(logits, greedy tokens, tokenizer), Ollama/llama.cpp side files, and the plain transformers format."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from styletune.cli import main
from styletune.config import DataConfig, TrainConfig
from styletune.errors import StyletuneError
from styletune.exporting import _permute, export
from styletune.models import load_model
from styletune.training import train

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXTS = ["Había una vez un gato, ¿verdad? Ça va, naïve café.", "emoji 🐈‍⬛ 🎉 and 日本語",
         "whitespace   runs\t\ttabs\n\n\nnewlines    end  ", "The raven<|endoftext|>Once upon"]
PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44], [100, 3]]

# Tolerances, relative to the largest reference logit. F32 stores the weights exactly, so the only
# difference is transformers' own arithmetic on the reloaded model. F16 rounds every matrix to 11
# significant bits (relative error 2**-11 = 4.9e-4 per weight); through two layers that stays
# near 2e-3 of the logit scale on these models. Q8_0 stores 8 bits per weight with one scale per
# 32 values (worst weight error ~0.4% of its block's largest value); these tiny random models
# (hidden size 32, weights drawn at 0.2) amplify that to ~7% of the logit scale, so Q8_0 is checked
# against 15% here, and against llama.cpp's perplexity on the real model in the opt-in test.
TOLERANCE = {"f32": 1e-5, "f16": 1e-2, "q8_0": 0.15}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """A LoRA run over a tiny Llama (with a ChatML chat template) and over a tiny GPT-2, and a full
    fine-tuning run over the Llama."""
    from conftest import build_gpt2, build_llama

    root = tmp_path_factory.mktemp("export")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(["The raven sat upon the bust of Pallas above my chamber door."] * 12))
    bases = {}
    # GPT-2 with its real context of 1024 positions: transformers' GGUF loader reads the context length
    # into `n_ctx` and leaves `n_positions` at its default of 1024, so a smaller one does not reload.
    for family, model in (("llama", build_llama(len(tokenizer), initializer_range=0.2)),
                          ("gpt2", build_gpt2(len(tokenizer), initializer_range=0.2, n_positions=1024))):
        bases[family] = root / f"base-{family}"
        model.save_pretrained(bases[family])
        tok = type(tokenizer).from_pretrained(_save_tokenizer(tokenizer, root / "tok"))
        if family == "llama":
            tok.chat_template = CHATML
        tok.save_pretrained(bases[family])
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STYLETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        for name, family, method in (("llama-lora", "llama", "lora"), ("gpt2-lora", "gpt2", "lora"),
                                     ("llama-full", "llama", "full")):
            out[name] = root / name
            train(TrainConfig(out=str(out[name]), model=str(bases[family]), method=method, lr=2e-2, max_steps=4,
                              batch_size=2, data=DataConfig(sources=[str(corpus)], block_size=16, val_fraction=0.2),
                              save_every=2, eval_max_new_tokens=2, device="cpu", dtype="float32"))
    return out


def _save_tokenizer(tokenizer, path: Path) -> Path:
    tokenizer.save_pretrained(path)
    return path


def _reload(out: Path, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = f"{name}.gguf"
    return (AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(out, gguf_file=gguf_file))


def _greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0].tolist()


@pytest.mark.parametrize("run", ["llama-lora", "gpt2-lora", "llama-full"])
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_through_transformers(runs, tmp_path, run, quant):
    out = tmp_path / "out"
    result = export(str(runs[run]), str(out), format="gguf", quant=quant)
    assert result.files == ["Modelfile", "README.md", f"{run}.gguf"] and result.weights == "best"
    ours = load_model(str(runs[run]), device="cpu", dtype="float32")
    theirs, their_tokenizer = _reload(out, run)
    for ids in PROMPTS:
        with torch.no_grad():
            ref, got = ours.model(torch.tensor([ids])).logits, theirs(torch.tensor([ids])).logits
        assert (got - ref).abs().max() <= TOLERANCE[quant] * ref.abs().max(), quant
        if quant != "q8_0":
            top2 = ref[0].topk(2, dim=-1).values
            if ((top2[:, 0] - top2[:, 1]) > 2 * TOLERANCE[quant] * ref.abs().max()).all():  # no near-tie
                assert _greedy(theirs, ids) == _greedy(ours.model, ids)
    for text in TEXTS:
        assert their_tokenizer(text)["input_ids"] == ours.tokenizer(text)["input_ids"], text
        assert their_tokenizer.decode(their_tokenizer(text)["input_ids"]) == text


def test_greedy_continuations_match_in_f32(runs, tmp_path):
    """Token for token, not only where margins allow: F32 is the same model."""
    for run in ("llama-lora", "gpt2-lora"):
        export(str(runs[run]), str(tmp_path / run), quant="f32")
        theirs, _ = _reload(tmp_path / run, run)
        ours = load_model(str(runs[run]), device="cpu", dtype="float32")
        for ids in PROMPTS:
            assert _greedy(theirs, ids, 16) == _greedy(ours.model, ids, 16)


def test_gguf_metadata_and_layout(runs, tmp_path):
    from gguf import GGUFReader

    export(str(runs["llama-lora"]), str(tmp_path / "out"), quant="f32")
    reader = GGUFReader(str(tmp_path / "out" / "llama-lora.gguf"))
    field = lambda key: reader.get_field(key).contents()
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2" and field("tokenizer.chat_template") == CHATML
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("tokenizer.ggml.eos_token_id") == 0
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    assert tokens[0] == "<|endoftext|>" and types[0] == 3  # CONTROL
    assert len(field("tokenizer.ggml.merges")) > 0
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    # Q and K in llama.cpp's interleaved rotary layout, V as it is.
    lm = load_model(str(runs["llama-lora"]), device="cpu", dtype="float32")
    attn = lm.model.model.layers[1].self_attn
    stored = lambda name: torch.from_numpy(tensors[name].data.copy()).reshape(tuple(reversed(tensors[name].shape)))
    assert torch.equal(stored("blk.1.attn_q.weight"), torch.from_numpy(_permute(attn.q_proj.weight.numpy(), 4)))
    assert torch.equal(stored("blk.1.attn_k.weight"), torch.from_numpy(_permute(attn.k_proj.weight.numpy(), 2)))
    assert torch.equal(stored("blk.1.attn_v.weight"), attn.v_proj.weight)
    assert not torch.equal(stored("blk.1.attn_q.weight"), attn.q_proj.weight)


def test_gpt2_gguf_has_the_tied_head_and_transposed_projections(runs, tmp_path):
    from gguf import GGUFReader

    export(str(runs["gpt2-lora"]), str(tmp_path / "out"), quant="f32")
    reader = GGUFReader(str(tmp_path / "out" / "gpt2-lora.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.get_field("general.architecture").contents() == "gpt2"
    assert {"token_embd.weight", "position_embd.weight", "output.weight", "blk.0.attn_qkv.weight",
            "blk.0.attn_qkv.bias", "blk.1.ffn_down.weight", "output_norm.bias"} <= set(tensors)
    assert not [n for n in tensors if n.endswith("attn.bias")]  # no causal-mask buffers
    assert (tensors["output.weight"].data == tensors["token_embd.weight"].data).all()
    assert tuple(reversed(tensors["blk.0.attn_qkv.weight"].shape)) == (96, 32)  # (out, in), not Conv1D's (in, out)


def test_modelfile_and_readme(runs, tmp_path):
    export(str(runs["llama-lora"]), str(tmp_path / "out"))
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./llama-lora.gguf\n")
    assert 'TEMPLATE """' in modelfile and "<|im_start|>{{ .Role }}" in modelfile  # the ChatML template
    for line in ("PARAMETER temperature 0.8", "PARAMETER top_p 0.95", "PARAMETER repeat_penalty 1.1",
                 'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"'):
        assert line in modelfile
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "llama-cli -m llama-lora.gguf" in readme and "llama-server -m llama-lora.gguf" in readme
    assert "ollama create llama-lora -f Modelfile" in readme
    gpt2 = export(str(runs["gpt2-lora"]), str(tmp_path / "gpt2"))
    assert "TEMPLATE" not in (gpt2.out / "Modelfile").read_text()  # no chat template, none written


def test_export_of_chosen_weights(runs, tmp_path):
    """A run means best/; final/ or a checkpoint when named; each exports its own weights."""
    from gguf import GGUFReader

    digests = {}
    for which in ("", "final", "checkpoints/step-000002"):
        result = export(str(runs["llama-lora"] / which), str(tmp_path / (which.replace("/", "-") or "run")), quant="f32")
        assert result.weights == (which or "best")
        reader = GGUFReader(str(result.out / "llama-lora.gguf"))
        digests[which] = hashlib.sha256(b"".join(t.data.tobytes() for t in reader.tensors)).hexdigest()
    assert digests["final"] != digests["checkpoints/step-000002"]


def test_hf_export_loads_without_styletune(runs, tmp_path):
    out = tmp_path / "hf"
    r = CliRunner().invoke(main, ["export", str(runs["gpt2-lora"]), str(out), "--format", "hf"])
    assert r.exit_code == 0, r.output
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists() and not (out / "styletune.json").exists()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["temperature"] == 0.8 and generation["top_p"] == 0.95 and generation["do_sample"] is True
    ours = load_model(str(runs["gpt2-lora"]), device="cpu", dtype="float32")
    with torch.no_grad():
        expected = ours.model(torch.tensor([PROMPTS[1]])).logits[0, -1].tolist()
    script = f"""
import sys, json, torch
sys.modules["styletune"] = None  # no styletune: importing it would fail
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr(), "tied embeddings lost"
with torch.no_grad():
    print(json.dumps(m(torch.tensor([{PROMPTS[1]}])).logits[0, -1].tolist()))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-5)


def test_refuses_a_non_empty_directory_and_keeps_it(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    r = CliRunner().invoke(main, ["export", str(runs["llama-lora"]), str(out)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--overwrite" in r.output, r.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    r = CliRunner().invoke(main, ["export", str(runs["llama-lora"]), str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "llama-lora.gguf"]


def test_an_interrupted_export_leaves_nothing_that_looks_complete(runs, tmp_path, monkeypatch):
    import gguf

    out = tmp_path / "out"
    export(str(runs["llama-lora"]), str(out), quant="f32")
    before = (out / "llama-lora.gguf").read_bytes()

    def killed(self, *a, **k):
        raise KeyboardInterrupt("killed while writing tensors")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", killed)
    with pytest.raises(KeyboardInterrupt):
        export(str(runs["llama-lora"]), str(out), quant="q8_0", overwrite=True)
    assert (out / "llama-lora.gguf").read_bytes() == before  # the old export, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    with pytest.raises(KeyboardInterrupt):
        export(str(runs["llama-lora"]), str(tmp_path / "fresh"), quant="q8_0")
    assert not (tmp_path / "fresh").exists()


def test_unsupported_architecture_and_quantisation(tmp_path, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    base = tmp_path / "mistral"
    MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
                       ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    corpus = tmp_path / "c.txt"
    corpus.write_text("The raven sat upon the bust of Pallas. " * 20)
    train(TrainConfig(out=str(tmp_path / "run"), model=str(base), max_steps=1, batch_size=2, device="cpu",
                      dtype="float32", data=DataConfig(sources=[str(corpus)], block_size=16, val_fraction=0)))
    with pytest.raises(StyletuneError, match="GGUF export supports the gpt2, llama architectures; .* mistral"):
        export(str(tmp_path / "run"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(StyletuneError, match="--quant must be one of f32, f16, q8_0, got q4_k"):
        export(str(tmp_path / "run"), str(tmp_path / "out"), quant="q4_k")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "run"), str(tmp_path / "out"), "--quant", "q4_k"])
    assert r.exit_code == 2 and "q8_0" in r.output and r.output.count("\n") == 1
    hf = export(str(tmp_path / "run"), str(tmp_path / "hf"), format="hf")  # any architecture exports as hf
    assert (hf.out / "model.safetensors").is_file()
