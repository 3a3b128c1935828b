"""Every command through click's CliRunner, including bad input (one line, exit 2)."""

import csv
import json

import pytest
from click.testing import CliRunner

from styletune.cli import main
from styletune.config import DecodingConfig
from styletune.decoding.engine import generate
from styletune.models import load_model


@pytest.fixture
def run():
    def _run(*args, input=None):
        return CliRunner().invoke(main, [str(a) for a in args], input=input)

    return _run


@pytest.fixture(scope="module")
def gpt2_dir(tiny_model_dirs):
    return str(tiny_model_dirs["gpt2"])


def one_line_error(result):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_generate_json(run, gpt2_dir):
    r = run("generate", "Once upon", "The quick", "--model", gpt2_dir, "-n", "6", "--seed", "3",
            "--num-samples", "2", "--json")
    assert r.exit_code == 0, r.output
    objs = [json.loads(l) for l in r.output.splitlines()]
    assert len(objs) == 4
    assert [o["prompt"] for o in objs] == ["Once upon", "Once upon", "The quick", "The quick"]
    for o in objs:
        assert len(o["token_ids"]) == 6 or o["finish_reason"] != "length"
        assert isinstance(o["text"], str) and "steps" not in o
    again = run("generate", "Once upon", "The quick", "--model", gpt2_dir, "-n", "6", "--seed", "3",
                "--num-samples", "2", "--json")
    assert again.output == r.output


def test_generate_trace_json_and_export(run, gpt2_dir, tmp_path):
    csv_path, json_path = tmp_path / "trace.csv", tmp_path / "trace.json"
    r = run("generate", "Once upon", "--model", gpt2_dir, "-n", "5", "--seed", "1", "--json", "--trace",
            "--trace-top", "3", "--trace-out", csv_path)
    assert r.exit_code == 0, r.output
    [obj] = [json.loads(l) for l in r.output.splitlines()]
    assert len(obj["steps"]) == len(obj["token_ids"]) == 5
    for step, tid in zip(obj["steps"], obj["token_ids"]):
        assert set(step) >= {"chosen_id", "chosen_token", "chosen_prob", "rank", "entropy", "top"}
        assert step["chosen_id"] == tid and len(step["top"]) == 3
        assert set(step["top"][0]) == {"id", "token", "prob"}
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["chosen_id"]) for r in rows] == obj["token_ids"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    r = run("generate", "Once upon", "--model", gpt2_dir, "-n", "4", "--seed", "1", "--trace", "--trace-out", json_path)
    assert r.exit_code == 0 and "top candidates" in r.output
    assert len(json.loads(json_path.read_text())) == 4


def test_generate_plain_output_and_file(run, gpt2_dir, tmp_path):
    out = tmp_path / "samples.txt"
    r = run("generate", "Once upon", "--model", gpt2_dir, "-n", "5", "--greedy", "--output", out)
    assert r.exit_code == 0
    assert r.output.startswith("Once upon") and out.read_text().startswith("Once upon")
    assert r.output.strip() == out.read_text().strip()


def test_generate_streams(run, gpt2_dir):
    plain = run("generate", "Once upon", "--model", gpt2_dir, "-n", "8", "--seed", "4", "--no-stream")
    streamed = run("generate", "Once upon", "--model", gpt2_dir, "-n", "8", "--seed", "4", "--stream")
    assert streamed.exit_code == 0 and streamed.output == plain.output


def test_generate_reads_stdin(run, gpt2_dir):
    r = run("generate", "--model", gpt2_dir, "-n", "3", "--greedy", "--json", input="Once upon\nThe quick\n")
    assert [json.loads(l)["prompt"] for l in r.output.splitlines()] == ["Once upon", "The quick"]


def test_probe(run, gpt2_dir):
    r = run("probe", "Once upon", "--model", gpt2_dir, "--top", "5", "--json")
    assert r.exit_code == 0, r.output
    cands = json.loads(r.output)
    assert len(cands) == 5 and set(cands[0]) == {"id", "token", "prob"}
    probs = [c["prob"] for c in cands]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    table = run("probe", "Once upon", "--model", gpt2_dir, "--top", "3")
    assert table.exit_code == 0 and "rank" in table.output and repr(cands[0]["token"]) in table.output


def write_passages(run, gpt2_dir, topics):
    """What `write` should print for each topic: `generate` with write's defaults and turn i's seed."""
    texts = []
    for i, topic in enumerate(topics):
        r = run("generate", topic, "--model", gpt2_dir, "-n", "5", "--seed", str(1 + i), "--temperature", "0.8",
                "--top-p", "0.95", "--repetition-penalty", "1.1", "--json")
        assert r.exit_code == 0, r.output
        sample = json.loads(r.output)
        assert sample["token_ids"]  # the model wrote something after the topic
        texts.append(topic + sample["text"])
    return texts


def test_write_loop_until_empty_line(run, gpt2_dir):
    r = run("write", "--model", gpt2_dir, "-n", "5", "--seed", "1", input="The sea\nA storm\n\nnever reached\n")
    assert r.exit_code == 0, r.output
    # Each topic continued by the model, in order (not just the topic echoed back), and nothing after the empty line.
    first, second = write_passages(run, gpt2_dir, ["The sea", "A storm"])
    assert first in r.output and second in r.output and r.output.index(first) < r.output.index(second)
    assert "never reached" not in r.output


def test_write_ends_at_eof(run, gpt2_dir):
    r = run("write", "--model", gpt2_dir, "-n", "5", "--seed", "1", input="The sea\n")
    assert r.exit_code == 0, r.output
    assert write_passages(run, gpt2_dir, ["The sea"])[0] in r.output


def test_models_json(run):
    r = run("models", "--json")
    assert r.exit_code == 0
    data = json.loads(r.output)
    names = [m["name"] for m in data["models"]]
    assert "smollm2-135m" in names and "gpt2" in names
    assert all({"name", "source", "cached", "path"} <= set(m) for m in data["models"])


@pytest.mark.parametrize("args,needle", [
    (["generate", "hi", "--model", "no-such-model"], "unknown model"),
    (["generate", "hi", "--model", "gpt2"], "not in the local Hugging Face cache"),
    (["generate", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["generate", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "hi", "--eps", "2"], "--eps"),
    (["generate", "hi", "--dtype", "float8"], "--dtype"),
    (["probe", "hi", "--top", "0"], "--top"),
    (["generate", "hi", "--model", "/no/such/dir"], "no model at"),
])
def test_bad_input_is_one_line(run, args, needle, gpt2_dir):
    if "--model" not in args:
        args = args + ["--model", gpt2_dir]
    line = one_line_error(run(*args))
    assert needle in line


def test_prompt_longer_than_context(run, gpt2_dir):
    line = one_line_error(run("generate", "word " * 300, "--model", gpt2_dir, "-n", "5"))
    assert "context of 128 tokens" in line


def test_output_is_not_clobbered_on_error(run, gpt2_dir, tmp_path):
    out = tmp_path / "keep.txt"
    out.write_text("precious")
    one_line_error(run("generate", "word " * 300, "--model", gpt2_dir, "-n", "5", "--output", out))
    assert out.read_text() == "precious"


def test_generate_quantized(run, tiny_model_dirs, monkeypatch):
    """The command line decodes with ``--quantize auto`` unless told otherwise; ``none`` is the exact
    model (the library's default), token for token; an unknown format is a one-line error."""
    import styletune.models as models

    loaded = []
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: loaded.append(kw["quantize"]) or load_model(*a, **kw))
    args = ("generate", "Once upon", "--model", tiny_model_dirs["llama"], "-n", "4", "--greedy", "--json")
    for extra in ((), ("--quantize", "int8"), ("--quantize", "none")):
        r = run(*args, *extra)
        assert r.exit_code == 0, r.output
        assert len(json.loads(r.output)["token_ids"]) == 4
    assert loaded == ["auto", "int8", "none"]
    lm = load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32")
    [exact] = generate(lm, ["Once upon"], DecodingConfig(greedy=True, max_new_tokens=4))
    assert json.loads(r.output)["token_ids"] == exact.token_ids
    bad = run("generate", "Once upon", "--model", tiny_model_dirs["llama"], "--quantize", "int3")
    assert bad.exit_code == 2


def test_write_ctrl_c_stops_only_the_passage(run, gpt2_dir, monkeypatch):
    import styletune.decoding.engine as engine

    real = engine.generate
    calls = []

    def interrupted_once(lm, prompts, cfg, **kw):
        calls.append(prompts[0])
        if len(calls) == 1:
            kw["on_text"](0, "half a sentence")
            raise KeyboardInterrupt
        return real(lm, prompts, cfg, **kw)

    monkeypatch.setattr(engine, "generate", interrupted_once)
    r = run("write", "--model", gpt2_dir, "-n", "3", "--seed", "1", input="The sea\nA storm\n\n")
    assert r.exit_code == 0, r.output
    assert calls == ["The sea", "A storm"]
    assert "half a sentence [stopped]" in r.output and "A storm" in r.output


def test_threads_option(run, gpt2_dir):
    import torch

    before = torch.get_num_threads()
    try:
        r = run("--threads", "1", "generate", "Once", "--model", gpt2_dir, "-n", "2", "--greedy")
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    bad = run("--threads", "0", "models")
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_help_and_version_do_not_import_torch():
    """``--help`` and ``--version`` answer at once: no command's help loads torch (about a second here)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from styletune.cli import main\n"
            "for args in (['--help'], ['--version'], *[[name, '--help'] for name in main.commands]):\n"
            "    try:\n"
            "        main(args, standalone_mode=False)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(len(main.commands), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    count, torch_loaded = out.split()[-2:]
    assert int(count) >= 8 and torch_loaded == "False", out[-500:]
