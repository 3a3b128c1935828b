"""styletune compare: same settings and seed per column, shared base weights, outputs."""

import json

import pytest
from click.testing import CliRunner

import styletune.models
from styletune.cli import main
from styletune.comparison import compare
from styletune.config import DataConfig, DecodingConfig, TrainConfig
from styletune.models import load_model
from styletune.training import train

PROMPTS = ["The raven", "Why did the <chicken> & the fox"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, train_model_dirs):
    root = tmp_path_factory.mktemp("compare")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(["The raven sat upon the bust of Pallas above my chamber door. Nevermore."] * 20))
    out = root / "run"
    train(TrainConfig(out=str(out), model=str(train_model_dirs["llama"]),
                      data=DataConfig(sources=[str(corpus)], block_size=32, val_fraction=0.0),
                      batch_size=4, max_steps=12, lr=2e-2, eval_every=100, save_every=6, eval_max_new_tokens=4,
                      device="cpu", dtype="float32"))
    return out


GREEDY = DecodingConfig(greedy=True, max_new_tokens=8, stop_at_eos=False)


def test_columns_and_shape(lora_run):
    cmp = compare(PROMPTS, tuned=str(lora_run), checkpoints=True, decoding=GREEDY, dtype="float32")
    assert [c.name for c in cmp.columns] == ["base", "step 6", "step 12", "tuned"]
    data = cmp.to_json()
    assert [d["prompt"] for d in data] == PROMPTS
    assert all(list(d["outputs"]) == ["base", "step 6", "step 12", "tuned"] for d in data)
    assert all(isinstance(t, str) for d in data for t in d["outputs"].values())
    # Training changed the model, and the last checkpoint is the final weights.
    assert any(d["outputs"]["tuned"] != d["outputs"]["base"] for d in data)
    assert all(d["outputs"]["step 12"] == d["outputs"]["tuned"] for d in data)


def test_shared_adapters_equal_separately_loaded_models(lora_run, train_model_dirs):
    """Switching adapters over one base gives what loading each run on its own gives."""
    from styletune.decoding.engine import generate

    cmp = compare(PROMPTS, tuned=str(lora_run), decoding=GREEDY, dtype="float32")
    for column, model in (("tuned", str(lora_run)), ("base", str(train_model_dirs["llama"]))):
        alone = generate(load_model(model, dtype="float32"), PROMPTS, GREEDY)
        assert [r.outputs[column] for r in cmp.rows] == [s.text for s in alone]


def test_base_is_loaded_once(lora_run, monkeypatch):
    calls = []
    real = styletune.models.load_model
    monkeypatch.setattr(styletune.models, "load_model", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    compare(PROMPTS, tuned=str(lora_run), checkpoints=True, decoding=GREEDY, dtype="float32")
    assert len(calls) == 1


def test_same_seed_same_columns(lora_run, train_model_dirs):
    dec = DecodingConfig(max_new_tokens=8, temperature=1.5, seed=4, stop_at_eos=False)
    a = compare(PROMPTS, tuned=str(lora_run), models=[str(train_model_dirs["llama"])], decoding=dec, dtype="float32")
    b = compare(PROMPTS, tuned=str(lora_run), models=[str(train_model_dirs["llama"])], decoding=dec, dtype="float32")
    assert a.to_json() == b.to_json()
    # A column with the base model itself gives exactly the base column: only the model differs.
    extra = str(train_model_dirs["llama"])
    assert all(r.outputs[extra] == r.outputs["base"] for r in a.rows)


def test_cli_formats_and_html(lora_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    html = tmp_path / "report.html"
    r = CliRunner().invoke(main, ["compare", "--dtype", "float32", "--tuned", str(lora_run), "--checkpoints", "all", "--prompts",
                                  str(prompts), "-n", "6", "--format", "json", "--html", str(html)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [d["prompt"] for d in data] == PROMPTS
    page = html.read_text()
    assert page.startswith("<!doctype html>") and "http" not in page.split("<body>")[1]
    assert "Why did the &lt;chicken&gt; &amp; the fox" in page
    for name in ("base", "step 6", "step 12", "tuned"):
        assert f"<th>{name}</th>" in page
    for d in data:
        for text in d["outputs"].values():
            from html import escape

            from styletune.report import visible_text

            # control characters a tiny model may write are shown as control pictures
            assert escape(visible_text(text)) in page
    md = CliRunner().invoke(main, ["compare", "--dtype", "float32", "--tuned", str(lora_run), "-p", "The raven", "-n", "4", "--format", "md"])
    assert md.exit_code == 0 and md.output.startswith("| prompt | base | tuned |")
    text = CliRunner().invoke(main, ["compare", "--dtype", "float32", "--tuned", str(lora_run), "-p", "The raven", "-n", "4"])
    assert text.exit_code == 0 and "tuned" in text.output and "The raven" in text.output


def one_line_error(r):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    return r.output


def test_bad_input(lora_run, tmp_path):
    run = lambda *a: CliRunner().invoke(main, ["compare", *map(str, a)])
    assert "no such run" in one_line_error(run("--tuned", tmp_path / "nope", "-p", "x"))
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.yaml").write_text("model: x\n")
    assert "not a complete styletune run" in one_line_error(run("--tuned", incomplete, "-p", "x"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "empty" in one_line_error(run("--tuned", lora_run, "--prompts", empty))
    assert "no prompts" in one_line_error(run("--tuned", lora_run))
    assert "nothing to compare" in one_line_error(run("-p", "x"))
