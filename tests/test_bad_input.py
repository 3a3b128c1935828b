"""The bad-input matrix: every command, every kind of broken input.

Each case runs the real CLI in-process and checks the contract users rely on: one line on
stderr (``error: ...``), exit status 2, no traceback, and every file that existed before the
command is byte-for-byte unchanged (hashed before and after).
"""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from styletune import checkpoints as ckpt
from styletune.cli import main
from styletune.config import DataConfig, TrainConfig
from styletune.training import read_metrics, train

TEXT = ("The raven sat upon the bust of Pallas above my chamber door. " * 6).strip()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, train_model_dirs):
    """A complete LoRA run over the tiny Llama, with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("bad_input")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join([TEXT] * 12), encoding="utf-8")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STYLETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        train(TrainConfig(out=str(out), model=str(train_model_dirs["llama"]), batch_size=2, max_steps=4,
                          data=DataConfig(sources=[str(corpus)], block_size=16, val_fraction=0.2),
                          save_every=2, eval_max_new_tokens=2, device="cpu", dtype="float32"))
    return out


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# Each case: (id, set-up) where set-up(ws, model, run) makes its inputs in the workspace ``ws``
# and returns (argv, what the error line must contain).


def _file(ws: Path, name: str, data: bytes | str) -> Path:
    p = ws / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


def _train(ws, model, *args):
    return ["train", *map(str, args), "--model", str(model), "--out", str(ws / "new-run"), "--block-size", "16",
            "--max-steps", "2", "--dtype", "float32"]


CASES = {
    # ---- train: the corpus
    "train-empty-csv": lambda ws, m, r: (_train(ws, m, _file(ws, "empty.csv", b"")), "empty"),
    "train-missing-file": lambda ws, m, r: (_train(ws, m, ws / "nope.txt"), "nope.txt"),
    "train-binary-file": lambda ws, m, r: (_train(ws, m, _file(ws, "photo.txt", b"\x89PNG\r\n\x1a\n\x00\x00" * 50)),
                                           "binary"),
    "train-csv-broken-quote": lambda ws, m, r: (
        _train(ws, m, _file(ws, "jokes.csv", 'ID,text\n1,"fine"\n2,"never closed\n3,third\n')),
        'line 3: a quoted field opened here is never closed'),
    "train-jsonl-bad-line": lambda ws, m, r: (
        _train(ws, m, _file(ws, "docs.jsonl", '{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')),
        "line 2, column 15"),
    "train-parquet-not-parquet": lambda ws, m, r: (_train(ws, m, _file(ws, "t.parquet", b"PAR1 but not really")),
                                                   "Parquet magic bytes"),
    "train-wrong-column": lambda ws, m, r: (
        _train(ws, m, _file(ws, "jokes2.csv", "ID,Joke\n1,a\n2,b\n"), "--column", "Text"), "'Text'"),
    "train-wrong-field": lambda ws, m, r: (
        _train(ws, m, _file(ws, "d.jsonl", '{"body": "one"}\n'), "--field", "text"), "'text'"),
    "train-bad-yaml-config": lambda ws, m, r: (
        ["train", "--config", str(_file(ws, "c.yaml", "model: [unclosed\n")), "--out", str(ws / "x")], "not valid YAML"),
    "train-lr-nan": lambda ws, m, r: (_train(ws, m, _file(ws, "c.txt", TEXT), "--lr", "nan"), "--lr must be > 0"),
    "train-lr-inf": lambda ws, m, r: (_train(ws, m, _file(ws, "c.txt", TEXT), "--lr", "inf"), "finite"),
    "train-lr-poisons-the-weights": lambda ws, m, r: (
        _train(ws, m, _file(ws, "c.txt", TEXT * 3), "--lr", "1e30", "--max-steps", "4", "--warmup-fraction", "0"),
        "non-finite at step 1"),
    "train-val-fraction-out-of-range": lambda ws, m, r: (_train(ws, m, _file(ws, "c.txt", TEXT), "--val-fraction", "1.5"),
                                                         "--val-fraction"),
    "train-batch-size-not-a-number": lambda ws, m, r: (_train(ws, m, _file(ws, "c.txt", TEXT), "--batch-size", "many"),
                                                       "'--batch-size'"),
    # ---- train: resuming a damaged run
    "resume-corrupt-state-json": lambda ws, m, r: (
        ["train", "--resume", "--out", str(_corrupt_state(copy_run(r, ws / "run")))], "trainer_state.json is damaged"),
    "resume-pickled-object": lambda ws, m, r: (
        ["train", "--resume", "--out", str(_legacy_with_pickle(copy_run(r, ws / "run")))], "refusing to load"),
    # ---- generate / probe / write
    "generate-truncated-weights": lambda ws, m, r: (
        ["generate", "hi", "--model", str(_truncate(copy_run(r, ws / "run"), "best"))], "is damaged"),
    "generate-deleted-weights": lambda ws, m, r: (
        ["generate", "hi", "--model", str(_delete(copy_run(r, ws / "run"), "best"))], "adapter_model.safetensors is missing"),
    "generate-empty-prompts-file": lambda ws, m, r: (
        ["generate", "--prompts-file", str(_file(ws, "p.txt", "\n\n")), "--model", str(m)], "no prompt"),
    "generate-binary-prompts-file": lambda ws, m, r: (
        ["generate", "--prompts-file", str(_file(ws, "p.bin", b"\xff\xfe\x00\x01" * 64)), "--model", str(m)],
        "not valid utf-8"),
    "generate-huge-prompts-file": lambda ws, m, r: (
        ["generate", "--prompts-file", str(_file(ws, "big.txt", "word " * 200_000)), "--model", str(m)], "context"),
    "generate-top-p-out-of-range": lambda ws, m, r: (["generate", "hi", "--top-p", "2", "--model", str(m)], "--top-p"),
    "generate-unknown-flag": lambda ws, m, r: (["generate", "hi", "--temprature", "1", "--model", str(m)],
                                               "No such option"),
    "probe-missing-gguf": lambda ws, m, r: (["probe", "hi", "--model", str(ws / "model.gguf")], "no such GGUF file"),
    "probe-quantize-is-not-an-option": lambda ws, m, r: (["probe", "hi", "--quantize", "int8", "--model", str(m)],
                                                         "No such option"),
    "write-bad-repetition-penalty": lambda ws, m, r: (["write", "--repetition-penalty", "0", "--model", str(m)],
                                                      "--repetition-penalty"),
    # ---- merge / compare / evaluate / models
    "merge-missing-run": lambda ws, m, r: (["merge", str(ws / "nope"), str(ws / "out")], "no such run"),
    "merge-into-non-empty-dir": lambda ws, m, r: (["merge", str(r), str(_nonempty(ws / "out"))], "not empty"),
    "compare-tokenizer-mismatch": lambda ws, m, r: (
        ["compare", "--tuned", str(_rebase(copy_run(r, ws / "run"), _other_tokenizer_model(ws, m))), "-p", "hi",
         "--dtype", "float32"], "differs from that of its base model"),
    "compare-no-prompts": lambda ws, m, r: (["compare", "--tuned", str(r)], "no prompts"),
    "evaluate-bad-data-file": lambda ws, m, r: (
        ["evaluate", str(r), "--data", str(_file(ws, "v.jsonl", '{"text": "a"}\nnot json\n')), "--report",
         str(ws / "rep"), "--dtype", "float32"], "line 2"),
    "evaluate-missing-run": lambda ws, m, r: (["evaluate", str(ws / "nope"), "--report", str(ws / "rep")], "no such run"),
    "evaluate-samples-zero": lambda ws, m, r: (["evaluate", str(r), "--samples", "0", "--report", str(ws / "rep")],
                                               "--samples"),
    "models-extra-argument": lambda ws, m, r: (["models", "extra"], "unexpected extra argument"),
}


def _corrupt_state(run: Path) -> Path:
    newest = ckpt.newest_checkpoint(run)
    (newest / ckpt.STATE_FILE).write_text('{"step": 4, "total_st')
    return run


def _legacy_with_pickle(run: Path) -> Path:
    """A checkpoint in the old format whose trainer_state.pt carries an arbitrary Python object."""
    newest = ckpt.newest_checkpoint(run)
    state = json.loads((newest / ckpt.STATE_FILE).read_text())
    state.pop("trainer")
    (newest / ckpt.STATE_FILE).write_text(json.dumps(state))
    (newest / ckpt.TENSORS_FILE).unlink()
    torch.save({"optimizer": {}, "rng": {}, "payload": Exploit()}, newest / ckpt.LEGACY_TENSORS_FILE)
    return run


class Exploit:
    """Unpickling this would run ``print``; with weights_only=True it is never constructed."""

    def __reduce__(self):
        return (print, ("unpickled: this must never run",))


def _truncate(run: Path, which: str) -> Path:
    f = run / which / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    return run


def _delete(run: Path, which: str) -> Path:
    (run / which / "adapter_model.safetensors").unlink()
    return run


def _nonempty(path: Path) -> Path:
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    return path


def _rebase(run: Path, base: Path) -> Path:
    """The run's base model replaced since training: its weights dirs now name ``base``."""
    for info in run.rglob("styletune.json"):
        info.write_text(json.dumps({**json.loads(info.read_text()), "base_model": str(base)}))
    return run


def _other_tokenizer_model(ws: Path, model: Path) -> Path:
    """The run's base architecture with a tokenizer trained on other text (a different vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["zebra quagga okapi " * 50], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    other = ws / "other-base"
    AutoModelForCausalLM.from_pretrained(model).save_pretrained(other)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(other)
    return other


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, train_model_dirs, lora_run, capfd):
    ws = tmp_path / "ws"
    ws.mkdir()
    argv, needle = CASES[case](ws, train_model_dirs["llama"], lora_run)
    before_ws, before_run = snapshot(ws), snapshot(lora_run)
    before_model = snapshot(train_model_dirs["llama"])
    r = CliRunner().invoke(main, argv)
    out, err = capfd.readouterr()
    assert r.exit_code == 2, (r.output, r.exception)
    assert "Traceback" not in r.output + out + err and "unpickled" not in r.output + out + err
    # The error is one line, the last; a command that got as far as doing work may have printed its
    # usual progress lines (data summary, "training ...") before it.
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert not [line for line in lines if line.lower().startswith("warning")], r.stderr
    assert needle in errors[0], errors[0]
    after = snapshot(ws)
    assert {k: v for k, v in after.items() if k in before_ws} == before_ws  # nothing that existed was changed
    assert snapshot(lora_run) == before_run and snapshot(train_model_dirs["llama"]) == before_model


def test_unreadable_file(tmp_path, train_model_dirs, monkeypatch):
    """A file the user may not read (as root, chmod cannot show it: the read is made to fail the way it
    would for anyone else)."""
    corpus = _file(tmp_path, "secret.txt", TEXT)
    real = Path.read_bytes

    def denied(self):
        if self == corpus:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    r = CliRunner().invoke(main, _train(tmp_path, train_model_dirs["llama"], corpus))
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    [line] = r.stderr.strip().splitlines()
    assert "secret.txt" in line and "Permission denied" in line


def test_disk_full_while_saving_keeps_what_was_written(tmp_path, train_model_dirs, monkeypatch):
    """The disk fills while the step-4 checkpoint is written: one line, and the step-2 checkpoint
    (complete before) is untouched and still resumes."""
    corpus = _file(tmp_path, "c.txt", "\n\n".join([TEXT] * 12))
    out = tmp_path / "run"
    real = ckpt.save_file

    def full(tensors, filename, *a, **k):
        if "step-000004" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full)
    args = ["train", str(corpus), "--model", str(train_model_dirs["llama"]), "--out", str(out), "--block-size", "16",
            "--batch-size", "2", "--max-steps", "6", "--save-every", "2", "--dtype", "float32"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: could not write") and "No space left on device" in line and "--resume" in line
    assert ckpt.newest_checkpoint(out).name == "step-000002"
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written one was cleaned up
    monkeypatch.setattr(ckpt, "save_file", real)
    resumed = CliRunner().invoke(main, ["train", "--resume", "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.stderr and "at step 2 of 6" in resumed.stderr
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_a_pickled_object_is_never_unpickled(tmp_path, lora_run):
    run = _legacy_with_pickle(copy_run(lora_run, tmp_path / "run"))
    from styletune.errors import StyletuneError

    with pytest.raises(StyletuneError, match="refusing to load .*pickled"):
        ckpt.load_checkpoint(ckpt.newest_checkpoint(run))


def test_an_old_checkpoint_without_pickled_objects_still_resumes(tmp_path, lora_run):
    """Checkpoints written before the safetensors format (a trainer_state.pt of tensors and plain data)
    load with weights_only=True and resume."""
    run = copy_run(lora_run, tmp_path / "run")
    newest = ckpt.newest_checkpoint(run)
    state, tensors = ckpt.load_checkpoint(newest)
    torch.save(tensors, newest / ckpt.LEGACY_TENSORS_FILE)
    (newest / ckpt.TENSORS_FILE).unlink()
    (newest / ckpt.STATE_FILE).write_text(json.dumps(state))  # without the new "trainer" entry
    again, legacy = ckpt.load_checkpoint(newest)
    assert again["step"] == state["step"]
    assert torch.equal(legacy["rng"]["torch"], tensors["rng"]["torch"])
    assert pickle.dumps(legacy["rng"]["python"]) == pickle.dumps(tensors["rng"]["python"])
    r = CliRunner().invoke(main, ["train", "--resume", "--out", str(run), "--max-steps", "5"])
    assert r.exit_code == 0, r.output
