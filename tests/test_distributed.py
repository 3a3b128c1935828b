"""Training in several processes: two CPU processes on gloo, started by `styletune train --devices 2`
and by torchrun directly, against one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from styletune import checkpoints as ckpt
from styletune.training import StepPlan, read_metrics, train

from test_train import STORIES, config, corpus, losses  # noqa: F401  (corpus is a fixture)

TIMEOUT = 240  # seconds: a hung rank fails the test instead of the suite


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def torchrun(script: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``script`` in two processes, started by torchrun itself."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "--max-restarts=0", str(script), *args], cwd, **env)


def cli_args(cfg) -> list[str]:
    """The CLI options that make the same run as ``cfg`` (as built by ``test_train.config``)."""
    return [*cfg.data.sources, "--model", cfg.model, "--out", cfg.out, "--block-size", str(cfg.data.block_size),
            "--val-fraction", str(cfg.data.val_fraction), "--batch-size", str(cfg.batch_size),
            "--grad-accum", str(cfg.grad_accum), "--max-steps", str(cfg.max_steps), "--eval-every",
            str(cfg.eval_every), "--save-every", str(cfg.save_every), "--eval-max-new-tokens",
            str(cfg.eval_max_new_tokens), "--seed", str(cfg.seed), "--device", "cpu", "--dtype", "float32",
            "--lora-dropout", str(cfg.lora_dropout), "--lr", "1e-2"]


def write_api_script(tmp_path: Path) -> Path:
    """The ranks train through the public API; each then saves the trainable weights it holds, so
    the test can see that the ranks agree (only rank 0 writes the run)."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        from safetensors.torch import save_file
        from styletune.config import train_config_from_dict
        from styletune.training import train

        cfg = train_config_from_dict(json.loads(open(sys.argv[1]).read()))
        fail_at = int(os.environ.get("FAIL_AT_STEP", "0"))
        held = {}

        def on_step(step, model):
            if step == fail_at and os.environ["RANK"] == "1":
                raise RuntimeError(f"injected failure at step {step}")
            held.clear()
            held.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

        train(cfg, resume="--resume" in sys.argv, on_step=on_step)
        save_file(held, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.safetensors"))
    """))
    return script


def save_config(cfg, path: Path) -> Path:
    from styletune.config import train_config_to_dict

    path.write_text(json.dumps(train_config_to_dict(cfg)))
    return path


def adapter(run_dir: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / name / "adapter_model.safetensors"))


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


def rewind(run_dir: Path, step: int, name: str) -> Path:
    """A copy of a finished run as it was at its step-``step`` checkpoint (later checkpoints and the
    final weights gone), to resume from there."""
    copy = run_dir.with_name(name)
    shutil.copytree(run_dir, copy)
    for later in ckpt.complete_checkpoints(copy):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    shutil.rmtree(copy / "final")
    return copy


def test_step_plan_sees_every_block_once_per_epoch_and_splits_steps_over_ranks():
    n_blocks = 37
    for world, batch_size, global_batch in [(1, 4, 8), (2, 4, 8), (2, 3, 6), (4, 1, 8), (2, 8, 4)]:
        plans = [StepPlan.make(n_blocks, global_batch, batch_size, world, r, seed=3) for r in range(world)]
        assert all(p.micro <= batch_size and p.micro * p.accum * world == global_batch for p in plans)
        single = StepPlan.make(n_blocks, global_batch, global_batch, 1, 0, seed=3)
        seen = []
        for step in range(2 * n_blocks):  # far past the first epochs
            in_step = [b for p in plans for j in range(p.accum) for b in p.blocks(p.micro_positions(step, j))]
            assert in_step == single.blocks(single.micro_positions(step, 0))  # the same blocks, in order
            seen += in_step
        for epoch in range(len(seen) // n_blocks):
            assert sorted(seen[epoch * n_blocks:(epoch + 1) * n_blocks]) == list(range(n_blocks))
    with pytest.raises(Exception, match="cannot be split evenly over 2 processes"):
        StepPlan.make(n_blocks, 5, 4, 2, 0, seed=0)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, train_model_dirs):
    """A 2-process torchrun run (global batch 4 = 2 ranks x 2) and a 1-process run of global batch 4
    (2 x 2 accumulated), LoRA dropout on: its masks follow the blocks' place in the stream."""
    tmp_path = tmp_path_factory.mktemp("two_process_run")
    corpus = tmp_path / "stories"
    corpus.mkdir()
    for i, story in enumerate(STORIES * 3):
        (corpus / f"{i:02d}.txt").write_text(f"{story} (variation {i})\n", encoding="utf-8")
    kw = dict(batch_size=2, max_steps=8, eval_every=4, save_every=4, keep_checkpoints=3, lr=1e-2, lora_dropout=0.1)
    two = config(tmp_path / "two", train_model_dirs["llama"], corpus, **kw)
    out = torchrun(write_api_script(tmp_path), str(save_config(two, tmp_path / "two.json")), str(tmp_path),
                   cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    one = config(tmp_path / "one", train_model_dirs["llama"], corpus, grad_accum=2, **kw)
    train(one)
    return tmp_path, two, one


def test_two_processes_train_like_one_with_the_same_global_batch(two_process_run):
    tmp_path, two, one = two_process_run
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert_close(ranks[0], ranks[1], 0.0)  # DDP: every rank ends with the same weights
    assert losses(two.out) == pytest.approx(losses(one.out), rel=1e-5)
    assert_close(adapter(two.out), adapter(one.out), 1e-5)
    # Written once, by rank 0: one record per step and evaluation, one sample set per evaluation.
    rows = read_metrics(two.out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 4, 8]
    samples = [json.loads(line) for line in (Path(two.out) / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [4, 4, 8, 8]
    assert [p.name for p in ckpt.complete_checkpoints(Path(two.out))] == ["step-000004", "step-000008"]
    state = json.loads((Path(two.out) / "checkpoints/step-000008/trainer_state.json").read_text())
    assert state["global_batch"] == 4 and state["processes"] == 2 and state["tokens_seen"] == 8 * 4 * 32
    assert not list(Path(two.out).rglob(".tmp-*"))


def test_resume_in_two_processes_and_in_one(two_process_run):
    tmp_path, two, one = two_process_run
    straight = losses(two.out)
    # 2 processes -> 2 processes (torchrun), and 2 -> 1 (in this process): accumulation adapts to 2.
    again = rewind(Path(two.out), 4, "again")
    cfg2 = config(tmp_path, two.model, Path(two.data.sources[0]), **{**_kw(two), "out": str(again)})
    out = torchrun(write_api_script(tmp_path), str(save_config(cfg2, tmp_path / "again.json")), str(tmp_path),
                   "--resume", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(again) == pytest.approx(straight, rel=1e-5)
    alone = rewind(Path(two.out), 4, "alone")
    messages = []
    train(config(tmp_path, two.model, Path(two.data.sources[0]), **{**_kw(two), "out": str(alone)}), resume=True,
          echo=messages.append)
    assert any("global batch 4 blocks (2 micro-batches of 2)" in m for m in messages), messages
    assert losses(alone) == pytest.approx(straight, rel=1e-5)
    assert_close(adapter(alone), adapter(two.out), 1e-5)


def _kw(cfg) -> dict:
    return dict(batch_size=cfg.batch_size, max_steps=cfg.max_steps, eval_every=cfg.eval_every,
                save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints, lr=cfg.lr,
                lora_dropout=cfg.lora_dropout)


def test_devices_2_fsdp_and_accelerate_launch(tmp_path, train_model_dirs, corpus):  # noqa: F811
    kw = dict(batch_size=2, max_steps=6, eval_every=3, save_every=3, lr=1e-2, lora_dropout=0.0)
    one = config(tmp_path / "one", train_model_dirs["llama"], corpus, grad_accum=2, **kw)
    train(one)
    styletune = [sys.executable, "-m", "styletune", "train"]
    # accelerate launch with the FSDP config the README gives GPU users, for 2 processes here.
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(Path(__file__).parents[1] / "docs/accelerate-fsdp.yaml"), "--num_processes", "2",
                  "-m", "styletune", "train"]
    for name, before, after, fsdp in (("ddp", styletune, ["--devices", "2"], False),
                                      ("fsdp", styletune, ["--devices", "2", "--fsdp"], True),
                                      ("accelerate-fsdp", accelerate, [], True)):
        cfg = config(tmp_path / name, train_model_dirs["llama"], corpus, **kw)
        out = run([*before, *cli_args(cfg), *after], tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "2 processes on cpu" + (", FSDP" if fsdp else "") in out.stderr
        assert "global batch 4 blocks (2 processes x micro-batches of 2)" in out.stderr
        assert out.stdout.count("trained 6 steps") == 1  # rank 0 speaks for the run
        assert "Traceback" not in out.stderr and "OMP_NUM_THREADS" not in out.stderr
        assert losses(cfg.out) == pytest.approx(losses(one.out), rel=1e-4)
        assert_close(adapter(cfg.out), adapter(one.out), 1e-4)


def test_a_time_budget_in_two_processes(tmp_path, train_model_dirs, corpus):  # noqa: F811
    """Every rank plans the same steps and stops at the same one when the budget is spent (ranks that
    disagreed would wait on each other for ever)."""
    cfg = config(tmp_path, train_model_dirs["llama"], corpus, batch_size=2, max_steps=1, lr=1e-3)
    args = cli_args(cfg)
    i = args.index("--max-steps")
    del args[i:i + 2]
    out = run([sys.executable, "-m", "styletune", "train", *args, "--time-budget", "6s", "--devices", "2"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "time budget 6s:" in out.stderr and "Traceback" not in out.stderr
    rows = [r for r in read_metrics(Path(cfg.out)) if "loss" in r]
    assert rows and rows[-1]["elapsed_s"] < 6.0 + 1.0  # (slack: a step may run long on a shared CPU)
    assert (Path(cfg.out) / "final").is_dir()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C at the launcher
def test_a_signal_stops_every_rank_with_one_checkpoint(tmp_path, train_model_dirs, corpus, sig):  # noqa: F811
    cfg = config(tmp_path, train_model_dirs["llama"], corpus, batch_size=2, max_steps=100000, eval_every=100000,
                 save_every=100000, lr=1e-3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "styletune", "train", *cli_args(cfg), "--lr", "1e-3",
                             "--devices", "2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not [r for r in read_metrics(Path(cfg.out)) if r.get("step", 0) >= 3]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    saved = ckpt.complete_checkpoints(Path(cfg.out))
    assert len(saved) == 1, saved
    step = int(saved[0].name.split("-")[1])
    assert [r["step"] for r in read_metrics(Path(cfg.out)) if "loss" in r][-1] == step
    assert stderr.count(f"{sig.name}: saved a checkpoint at step {step}") == 1
    assert "Traceback" not in stderr and "death signal" not in stderr  # no torchrun log lines


@pytest.mark.parametrize("failure", ["bad file on rank 1", "exception at step 2 on rank 1"])
def test_a_failing_rank_ends_the_run(tmp_path, train_model_dirs, corpus, failure):  # noqa: F811
    cfg = config(tmp_path, train_model_dirs["llama"], corpus, batch_size=2, max_steps=50, save_every=1)
    if failure.startswith("bad file"):
        # Rank 1 is given a file rank 0 never reads (as on a node whose copy of the corpus is damaged).
        bad = tmp_path / "bad.csv"
        bad.write_text('text\n"an unterminated quote\n', encoding="utf-8")
        script = tmp_path / "cli_ranks.py"
        script.write_text(textwrap.dedent(f"""
            import os, sys
            from styletune.cli import main
            args = sys.argv[1:]
            if os.environ["RANK"] == "1":
                args[0] = {str(bad)!r}
            main(["train", *args])
        """))
        t0 = time.monotonic()
        out = torchrun(script, *cli_args(cfg), cwd=tmp_path)
        assert out.returncode != 0
        errors = [line for line in out.stderr.splitlines() if "error:" in line and "bad.csv" in line]
        assert errors == [f"error: [rank 1] could not read {bad}: line 2: a quoted field opened here is never "
                          'closed (unterminated ")'], out.stderr[-3000:]
    else:
        t0 = time.monotonic()
        out = torchrun(write_api_script(tmp_path), str(save_config(cfg, tmp_path / "cfg.json")), str(tmp_path),
                       cwd=tmp_path, FAIL_AT_STEP="2")
        assert out.returncode != 0
        assert "injected failure at step 2" in out.stderr
        # Steps written before the failure are kept: checkpoints 1 (and maybe 2) are complete.
        assert ckpt.complete_checkpoints(Path(cfg.out))
    assert time.monotonic() - t0 < TIMEOUT  # no rank was left waiting for the one that failed



def test_devices_refuses_what_it_can_before_starting_processes(tmp_path, train_model_dirs, corpus):  # noqa: F811
    cfg = config(tmp_path, train_model_dirs["llama"], corpus, max_steps=1)
    train(cfg)
    for extra, message in ((["--devices", "2"], f"error: {cfg.out} already holds a run; pass --resume"),
                           (["--devices", "0", "--overwrite"], "error: --devices must be >= 1, got 0")):
        before = sorted(p.name for p in Path(cfg.out).rglob("*"))
        out = run([sys.executable, "-m", "styletune", "train", *cli_args(cfg), *extra], tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), out.stderr
        assert sorted(p.name for p in Path(cfg.out).rglob("*")) == before
