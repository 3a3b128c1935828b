"""Training on tiny models: loss goes down, outputs, exact resume, signals, atomic
checkpoints, non-finite losses, merge, and the bad-input matrix through the CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from styletune import checkpoints as ckpt
from styletune.cli import main
from styletune.config import DataConfig, TrainConfig, load_yaml
from styletune.errors import StyletuneError
from styletune.models import load_model
from styletune.training import read_metrics, train

REPO = Path(__file__).resolve().parents[1]

STORIES = [
    "The raven sat upon the bust of Pallas above my chamber door, and spoke but one word: nevermore.",
    "Once upon a midnight dreary, while I pondered, weak and weary, over many a quaint and curious volume.",
    "The quick brown fox jumps over the lazy dog, and the lazy dog dreams of the quick brown fox.",
    "Why did the chicken cross the road? To get to the other side, where the other chickens were.",
    "Había una vez un gato que vivía en una casa grande, y el gato soñaba con el mar.",
    "In the dark of the night the bells were ringing, ringing, ringing, and nobody could sleep.",
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "stories.txt"
    folder = tmp_path / "stories"
    folder.mkdir()
    for i, story in enumerate(STORIES * 3):
        (folder / f"{i:02d}.txt").write_text(f"{story} (variation {i})\n", encoding="utf-8")
    path.write_text("\n\n".join(STORIES), encoding="utf-8")
    return folder


def config(tmp_path, model_dir, corpus, **kw):
    """A tiny run on the CPU in float32 unless the test asks for another dtype: never `auto`, which
    would pick by this machine's CPU (bf16 on avx512_bf16/AMX) or its GPU."""
    data = DataConfig(sources=[str(corpus)], block_size=kw.pop("block_size", 32), val_fraction=0.2)
    base = dict(out=str(tmp_path / "run"), model=str(model_dir), data=data, batch_size=4, max_steps=8,
                eval_every=4, save_every=4, eval_max_new_tokens=5, seed=1, device="cpu", dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method,lr", [("lora", 1e-2), ("full", 1e-2)])
def test_training_lowers_the_loss(tmp_path, train_model_dirs, corpus, family, method, lr, train_dtype):
    cfg = config(tmp_path, train_model_dirs[family], corpus, method=method, lr=lr, max_steps=20, eval_every=20,
                 save_every=20, warmup_fraction=0.0, dtype=train_dtype)
    result = train(cfg)
    got = losses(cfg.out)
    assert len(got) == 20
    assert sum(got[-3:]) / 3 < 0.9 * sum(got[:3]) / 3, got
    assert result.val_loss is not None and math.isfinite(result.val_loss)


def test_run_directory_contents(tmp_path, tiny_model_dirs, corpus):
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, eval_prompts=["The raven"])
    result = train(cfg)
    out = Path(cfg.out)
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "README.md", "samples.jsonl", "data_summary.json"):
        assert (out / name).is_file(), name
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all({"step", "loss", "lr", "grad_norm", "tokens_seen", "elapsed_s"} <= set(r) for r in steps)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)
    assert steps[-1]["tokens_seen"] == 8 * 4 * 32
    assert [r["step"] for r in evals] == [0, 4, 8]  # step 0: the base model, before training
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-3) for r in evals)
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(4, "The raven"), (8, "The raven")]
    assert load_yaml(out / "config.yaml")["data"]["block_size"] == 32
    card = (out / "README.md").read_text()
    assert str(tiny_model_dirs["llama"]) in card and f"{result.val_loss:.4f}" in card
    assert (out / "best" / "adapter_model.safetensors").is_file()
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-000004", "step-000008"]
    # The run is a model: generate with it.
    lm = load_model(str(out), device="cpu", dtype="float32")
    assert lm.base_name == str(tiny_model_dirs["llama"])


def test_config_yaml_reruns_the_same_training(tmp_path, tiny_model_dirs, corpus):
    cfg = config(tmp_path, tiny_model_dirs["gpt2"], corpus)
    train(cfg)
    again = tmp_path / "again"
    r = CliRunner().invoke(main, ["train", "--config", str(Path(cfg.out) / "config.yaml"), "--out", str(again)])
    assert r.exit_code == 0, r.output
    assert losses(again) == losses(cfg.out)


def wait_for_steps(proc, out, steps, timeout=180):
    """Block until the training process has logged ``steps`` optimizer steps; fail (and kill it)
    if it exits or the time runs out first, instead of signalling a process that never trained."""
    deadline = time.time() + timeout
    while len(losses(out)) < steps:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"training logged {len(losses(out))} of {steps} steps before "
                        f"{'exiting' if proc.returncode else 'the timeout'}: {err}")
        time.sleep(0.05)


def interrupt_at(step_to_stop):
    def hook(step, model):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_gives_the_same_losses(tmp_path, tiny_model_dirs, corpus, method, train_dtype):
    """Bitwise in both dtypes: the same kernels on the same inputs, and every piece of state
    (weights, optimizer moments, RNG, step) restored exactly."""
    straight = config(tmp_path / "a", tiny_model_dirs["llama"], corpus, method=method, save_every=100,
                      dtype=train_dtype, lora_dropout=0.2)
    train(straight)
    broken = config(tmp_path / "b", tiny_model_dirs["llama"], corpus, method=method, save_every=100,
                    dtype=train_dtype, lora_dropout=0.2)
    first = train(broken, on_step=interrupt_at(5))
    assert first.interrupted and first.steps == 5
    assert not (Path(broken.out) / "final").exists()
    assert ckpt.newest_checkpoint(Path(broken.out)).name == "step-000005"
    rest = train(broken, resume=True)
    assert rest.steps == 8 and not rest.interrupted
    assert losses(broken.out) == losses(straight.out)
    evals = lambda out: [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert evals(broken.out) == evals(straight.out)


def test_a_compiled_run_resumes_with_the_same_losses(tmp_path, tiny_model_dirs, corpus, train_dtype):
    """A run whose layers are compiled (as a long bf16 run's are by default) compiles them again when
    resumed: bitwise the losses of the run left alone."""
    runs = {}
    for name, stop in (("straight", None), ("broken", 5)):
        cfg = config(tmp_path / name, tiny_model_dirs["llama"], corpus, save_every=100, dtype=train_dtype,
                     compile=True)
        lines = []
        first = train(cfg, echo=lines.append, on_step=stop and interrupt_at(stop))
        if stop:
            assert first.interrupted and first.steps == stop
            train(cfg, resume=True, echo=lines.append)
        starts = [line for line in lines if line.startswith("training ")]
        assert len(starts) == (2 if stop else 1) and all(s.startswith("training lora, compiled") for s in starts), lines
        assert not [line for line in lines if "torch.compile failed" in line], lines
        runs[name] = losses(cfg.out)
    assert len(runs["broken"]) == 8 and runs["broken"] == runs["straight"]


def test_resume_keeps_the_peak_learning_rate_the_run_started_with(tmp_path, tiny_model_dirs, corpus):
    """The default peak is recorded in the checkpoints: a run resumes on its own schedule, and one whose
    checkpoint predates the record (LoRA's default was then 1e-3) continues at that default, not today's."""
    from styletune import training as T
    from styletune.config import LORA_LR

    cfg = config(tmp_path / "a", tiny_model_dirs["llama"], corpus, save_every=100)
    assert cfg.lr is None and cfg.peak_lr == LORA_LR != T._LORA_LR_BEFORE
    train(cfg, on_step=interrupt_at(5))
    state_file = ckpt.newest_checkpoint(Path(cfg.out)) / ckpt.STATE_FILE
    assert json.loads(state_file.read_text())["peak_lr"] == LORA_LR
    old = config(tmp_path / "b", tiny_model_dirs["llama"], corpus, save_every=100)
    train(old, on_step=interrupt_at(5))
    state_file = ckpt.newest_checkpoint(Path(old.out)) / ckpt.STATE_FILE
    saved = json.loads(state_file.read_text())
    del saved["peak_lr"]  # as written before the peak was recorded
    state_file.write_text(json.dumps(saved))
    for run, peak in ((cfg, LORA_LR), (old, T._LORA_LR_BEFORE)):
        result = train(run, resume=True)
        lrs = {r["step"]: r["lr"] for r in read_metrics(run.out) if "lr" in r}
        assert [lrs[s] for s in (6, 7, 8)] == pytest.approx(
            [T.lr_at(s - 1, result.total_steps, run, peak) for s in (6, 7, 8)])
        assert lrs[1] == pytest.approx(T.lr_at(0, result.total_steps, run, LORA_LR))  # both started at today's


def test_resume_survives_a_torn_last_line(tmp_path, tiny_model_dirs, corpus):
    """A SIGKILL mid-write leaves half a JSON line at the end of metrics.jsonl (and samples.jsonl):
    resume drops it with everything after the checkpoint, and the run ends as a straight one does."""
    straight = config(tmp_path / "a", tiny_model_dirs["llama"], corpus, save_every=100)
    train(straight)
    broken = config(tmp_path / "b", tiny_model_dirs["llama"], corpus, save_every=100)
    train(broken, on_step=interrupt_at(5))
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(Path(broken.out) / name, "a", encoding="utf-8") as fh:
            fh.write('{"step": 6, "loss": 6.12')  # killed here
    assert train(broken, resume=True).steps == 8
    assert losses(broken.out) == losses(straight.out)
    assert all(json.loads(line) for line in (Path(broken.out) / "metrics.jsonl").read_text().splitlines())


def test_sigint_from_the_cli_saves_and_resume_continues(tmp_path, tiny_model_dirs, corpus):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "styletune", "train", str(corpus), "--model", str(tiny_model_dirs["llama"]),
            "--out", str(out), "--block-size", "32", "--batch-size", "2", "--max-steps", "100000", "--dtype", "float32",
            "--save-every", "100000", "--eval-every", "100000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    newest = ckpt.newest_checkpoint(out)
    assert newest is not None
    saved_step = int(newest.name.split("-")[1])
    assert saved_step == len(losses(out))
    r = CliRunner().invoke(main, ["train", "--resume", "--out", str(out), "--max-steps", str(saved_step + 2)])
    assert r.exit_code == 0, r.output
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, saved_step + 3))


def test_a_kill_mid_save_never_leaves_a_complete_looking_checkpoint(tmp_path, tiny_model_dirs, corpus, monkeypatch):
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, save_every=2, eval_every=100, max_steps=6)
    real_save = ckpt.save_file

    def dying_save(tensors, f, *a, **k):
        # Die while writing the optimizer state of the step-4 checkpoint.
        if "step-000004" in str(f):
            Path(f).write_bytes(b"partial")
            raise KeyboardInterrupt("killed mid-save")
        return real_save(tensors, f, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    out = Path(cfg.out)
    assert not (out / "checkpoints" / "step-000004").exists()
    assert ckpt.newest_checkpoint(out).name == "step-000002"
    monkeypatch.setattr(ckpt, "save_file", real_save)
    result = train(cfg, resume=True)
    assert result.steps == 6
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_sigkill_during_training_leaves_only_complete_checkpoints(tmp_path, tiny_model_dirs, corpus):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "styletune", "train", str(corpus), "--model", str(tiny_model_dirs["llama"]),
            "--out", str(out), "--block-size", "32", "--batch-size", "2", "--max-steps", "100000", "--dtype", "float32",
            "--save-every", "1", "--eval-every", "100000", "--method", "full", "--keep-checkpoints", "3"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, out, 4)
    proc.kill()
    proc.wait()
    for d in (out / "checkpoints").glob("step-*"):
        assert (d / ckpt.STATE_FILE).is_file() and (d / ckpt.TENSORS_FILE).is_file(), d
        state, tensors = ckpt.load_checkpoint(d)  # loads: not truncated
        assert state["step"] == int(d.name.split("-")[1])
    newest = ckpt.newest_checkpoint(out)
    assert newest is not None
    r = CliRunner().invoke(main, ["train", "--resume", "--out", str(out), "--max-steps",
                                  str(int(newest.name.split("-")[1]) + 1)])
    assert r.exit_code == 0, r.output


def test_non_finite_loss_stops_with_the_step_and_writes_no_bad_weights(tmp_path, tiny_model_dirs, corpus):
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, save_every=2, eval_every=100, max_steps=6)

    def poison(step, model):
        if step == 3:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    with pytest.raises(StyletuneError, match="at step 4"):
        train(cfg, on_step=poison)
    out = Path(cfg.out)
    assert not (out / "final").exists()
    assert [d.name for d in ckpt.complete_checkpoints(out)] == ["step-000002"]
    for d in ckpt.complete_checkpoints(out):
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(d / "adapter_model.safetensors").values())


def test_non_finite_weights_are_never_saved(tmp_path, tiny_model_dirs, corpus):
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, save_every=2, eval_every=100, max_steps=6)

    def poison(step, model):
        if step == 2:  # poisoned just before the step-2 checkpoint
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    with pytest.raises(StyletuneError, match="non-finite at step 2"):
        train(cfg, on_step=poison)
    assert ckpt.complete_checkpoints(Path(cfg.out)) == []


def test_the_logged_gradient_norm_is_the_one_before_clipping(tmp_path, tiny_model_dirs, corpus):
    """Step 1 starts from the same weights and batch whatever the clipping, so its gradient norm is
    the same; clipping to a tiny norm slows what follows (the loss falls less)."""
    norms, runs = {}, {}
    for clip in (0.0, 1e-3):
        cfg = config(tmp_path / str(clip), tiny_model_dirs["llama"], corpus, grad_clip=clip, max_steps=4, lr=1e-2)
        train(cfg)
        steps = [r for r in read_metrics(Path(cfg.out)) if "loss" in r]
        norms[clip], runs[clip] = [r["grad_norm"] for r in steps], [r["loss"] for r in steps]
    assert norms[1e-3][0] == pytest.approx(norms[0.0][0], rel=1e-6) and norms[0.0][0] > 1e-3 * 10
    assert runs[1e-3][-1] > runs[0.0][-1]


def test_early_stopping(tmp_path, tiny_model_dirs, corpus, monkeypatch):
    import styletune.training as T

    worse = iter([1.0, 2.0, 3.0, 4.0, 5.0])
    monkeypatch.setattr(T._Run, "evaluate", lambda self: next(worse))
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, eval_every=1, max_steps=10, patience=2)
    result = train(cfg)
    assert result.stopped_early and result.steps == 3 and result.best_step == 1


def test_time_budget_plans_steps(tmp_path, tiny_model_dirs, corpus):
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, max_steps=None, time_budget="2s", eval_every=1000)
    messages = []
    result = train(cfg, echo=messages.append)
    assert any("s/step measured" in m for m in messages)
    # the planned steps, or fewer where they took longer than planned (then the budget ended the run)
    assert 1 <= result.steps <= result.total_steps and result.time_up == (result.steps < result.total_steps)


def test_time_budget_is_wall_time(tmp_path, tiny_model_dirs, corpus, monkeypatch):
    """The planned step count is an estimate from one timed pass; when steps turn out slower (here:
    planned as if they were free), the run still ends within its budget, with a last evaluation
    and its checkpoints, and says where it stopped."""
    import styletune.training as T

    monkeypatch.setattr(T, "plan_steps", lambda *a, **k: 100_000)
    monkeypatch.setattr(T, "steps_in_budget", lambda *a, **k: 100_000)  # and so planned again
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, max_steps=None, time_budget="3s", eval_every=1000)
    messages = []
    result = train(cfg, echo=messages.append)
    assert result.time_up and result.stopped_early and result.steps < result.total_steps == 100_000
    # it stopped when the next step and an evaluation would not fit (slack: a step may run long on a shared CPU)
    assert result.elapsed_s < 3.0 + 1.0
    assert any(f"stopped at step {result.steps} of 100000" in m for m in messages)
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == result.steps and "val_loss" in r for r in rows)  # the last evaluation
    assert (Path(cfg.out) / "final").is_dir() and (Path(cfg.out) / "best").is_dir()


def test_a_time_budget_is_planned_again_from_the_first_steps(tmp_path, tiny_model_dirs, corpus, monkeypatch):
    """A plan made before training far too cautious (here: 4 steps for a 4 s budget of
    millisecond steps) is made again after the first steps, so the run uses its budget, with
    its learning rate decayed over the new plan and its evaluations spread over it."""
    import styletune.training as T

    monkeypatch.setattr(T, "plan_steps", lambda *a, **k: 4)
    # How many evaluations fit a tenth of a budget depends on how fast this machine evaluates (a CI
    # machine once fitted one); fixed here, so the test sees where they fall over the new plan.
    monkeypatch.setattr(T, "planned_evaluations", lambda *a, **k: 6)
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, max_steps=None, time_budget="4s", eval_every=None)
    messages = []
    result = train(cfg, echo=messages.append)
    assert result.total_steps > 4 and result.steps > 4
    plans = [m for m in messages if m.startswith("time budget 4s: the last")]
    assert plans and plans[0].startswith("time budget 4s: the last 2 steps took"), messages  # after step 3
    assert plans[-1].endswith(f"-> {result.total_steps} steps")  # (and again at evaluations)
    assert 2.0 < result.elapsed_s < 4.0 + 1.0
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # step s trains at lr_at(s - 1): the new plan's schedule
    assert lrs[result.steps] == pytest.approx(T.lr_at(result.steps - 1, result.total_steps, cfg.validate()))
    evals = [r["step"] for r in rows if "val_loss" in r]
    every = round(result.total_steps / 6)  # the new plan's interval (the old one's was every step)
    assert every > 1 and evals[0] == 0 and evals[-1] == result.steps  # the baseline and the last
    # from the step that planned again on, the evaluations are spread over the new plan (planned again
    # at each of them, so the interval moves with it; the old plan's was every step): about six in
    # all, the last wherever the budget ran out
    after = [s for s in evals if s >= T._REPLAN_AT]
    gaps = [b - a for a, b in zip(after, after[1:-1])]
    assert 3 <= len(evals) - 1 <= 6 + 2 and gaps and min(gaps) > 1, (evals, every)


def _budget_run_with_slow_first_steps(tmp_path, tiny_model_dirs, corpus, monkeypatch, evaluations: int):
    """A ``--time-budget 4s`` run whose first four steps take 0.15 s each (then milliseconds), with
    ``evaluations`` planned: (its result, its plan lines, the step counts they planned, metrics rows)."""
    import styletune.training as T

    real_step = T._Run.step

    def step(self):
        if self.state.step < 4:
            time.sleep(0.15)
        return real_step(self)

    monkeypatch.setattr(T._Run, "step", step)
    monkeypatch.setattr(T, "planned_evaluations", lambda *a, **k: evaluations)
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, max_steps=None, time_budget="4s", eval_every=None)
    messages = []
    result = train(cfg, echo=messages.append)
    plans = [m for m in messages if m.startswith("time budget 4s: the last")]
    totals = [int(m.rsplit("-> ", 1)[1].split()[0]) for m in plans]
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    return result, plans, totals, rows


def test_a_time_budget_is_planned_again_at_its_evaluations(tmp_path, tiny_model_dirs, corpus, monkeypatch):
    """Steps that turn faster after the first plans (here: 0.15 s each for the first four, then
    milliseconds) do not leave the budget unused: the step count is planned again at each evaluation
    from the steps since the last plan, and the run goes on to about its budget."""
    result, plans, totals, rows = _budget_run_with_slow_first_steps(tmp_path, tiny_model_dirs, corpus, monkeypatch,
                                                                    evaluations=4)
    assert plans[0].startswith("time budget 4s: the last 2 steps took"), plans  # steps 2 and 3, slow
    assert float(plans[0].split(" took ")[1].split()[0]) >= 0.15
    # planned again after an evaluation, from the fast steps: more steps than the slow ones allowed
    assert len(plans) >= 2 and max(totals[1:]) > totals[0], plans
    assert 3.0 < result.elapsed_s < 4.0 + 1.0
    assert any(r["step"] == result.steps and "val_loss" in r for r in rows)  # the last evaluation


def test_steps_in_budget_leave_room_for_the_evaluations():
    from styletune.training import steps_in_budget

    # 3 steps took 15 s; 4.8 s per step from here; one 30 s evaluation; a margin of 9 s (3% of 300)
    steps = steps_in_budget(300, 3, 15.0, 4.8, 1, 30.0)
    assert steps == 3 + int((300 - 15 - 30 - 9) / 4.8)
    assert 15 + (steps - 3) * 4.8 + 30 <= 300 < 15 + (steps - 2) * 4.8 + 30 + 9
    assert steps_in_budget(300, 3, 290.0, 4.8, 1, 30.0) == 4  # over already: one more, the loop stops it
    assert steps_in_budget(300, 0, 0.0, 20.0, 2, 30.0) == 0 + int((300 - 60 - 20) / 20)  # the margin: one step


def test_a_time_budget_with_only_its_last_evaluation_is_planned_again_between_steps(tmp_path, tiny_model_dirs,
                                                                                     corpus, monkeypatch):
    """With one evaluation planned (the last, as a short budget with slow evaluations gets), steps that
    turn faster after the first plan (0.15 s each for the first four, then milliseconds) are still
    planned again, about ten times over the run: the run goes on to about its budget instead of
    stopping at the count the slow steps allowed."""
    result, plans, totals, rows = _budget_run_with_slow_first_steps(tmp_path, tiny_model_dirs, corpus, monkeypatch,
                                                                    evaluations=1)
    assert len(plans) >= 2 and max(totals[1:]) > totals[0], plans
    assert 3.0 < result.elapsed_s < 4.0 + 1.0
    assert [r["step"] for r in rows if "val_loss" in r] == [0, result.steps]  # the baseline and the last only


def test_plans_made_between_evaluations_do_not_put_the_next_one_off(tmp_path, tiny_model_dirs, corpus, monkeypatch):
    """Every plan here moves the step count (100, 120, 100, ... steps: beyond the 5% tolerance), and
    plans come about every tenth of the run, more often than the six evaluations: the evaluations still
    come about every sixth of the run, counted from the last one, not from the latest plan."""
    import itertools

    import styletune.training as T

    counts = itertools.cycle([100, 120])
    # (budget, steps done, ...) -> the count, at least one more step, as the real function gives
    monkeypatch.setattr(T, "steps_in_budget", lambda budget, done, *a: max(done + 1, next(counts)))
    monkeypatch.setattr(T, "planned_evaluations", lambda *a, **k: 6)
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, max_steps=None, time_budget="10m", eval_every=None,
                 save_every=1000)
    messages = []
    result = train(cfg, echo=messages.append)
    assert len([m for m in messages if m.startswith("time budget 10m: the last")]) >= 8  # planned again, often
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "val_loss" in r]
    gaps = [b - a for a, b in zip(evals[1:], evals[2:])]
    assert evals[0] == 0 and evals[-1] == result.steps and 5 <= len(evals) - 1 <= 8, evals
    assert max(gaps) <= 20, evals  # the longest interval either plan gives (120 / 6)


@pytest.mark.parametrize("budget,eval_s,evals", [(600, 37.0, 1), (600, 20.0, 3), (300, 22.0, 1), (600, 1.0, 10),
                                                 (60, 100.0, 1), (None, 37.0, 10)])
def test_a_time_budget_keeps_its_evaluations_within_a_tenth_of_it(budget, eval_s, evals):
    from styletune.training import planned_evaluations

    cfg = TrainConfig(out="x", time_budget=f"{budget}s" if budget else None)
    assert planned_evaluations(cfg, eval_s) == evals


def test_slow_evaluations_in_a_time_budget_are_fewer(tmp_path, tiny_model_dirs, corpus, monkeypatch):
    """Each evaluation made 0.5 s slower: a 5 s budget plans one (the last) instead of ten, and the
    run still ends with it."""
    import styletune.training as T

    real = T._Run.evaluate
    monkeypatch.setattr(T._Run, "evaluate", lambda self: time.sleep(0.5) or real(self))
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, max_steps=None, time_budget="5s", eval_every=None)
    messages = []
    result = train(cfg, echo=messages.append)
    assert any("-> " in m and " 1 evaluation at " in m for m in messages), messages
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "val_loss" in r]
    assert evals[0] == 0 and evals[-1] == result.steps and len(evals) <= 3  # the baseline, the last, at most one more


@pytest.mark.parametrize("change,compiles", [
    ({}, True),  # LoRA without dropout, bf16 on a CPU with native bf16, one process, 100,000 tokens
    ({"tokens": 99_999}, False),  # too short to pay for the compilation
    ({"time_budget": "4m"}, True),
    ({"time_budget": "3m59s"}, False),  # too short a budget, however many tokens it planned
    ({"amp_dtype": None}, False),  # fp32: the products dominate
    ({"lora_dropout": 0.05}, False),  # the compiled step was no faster
    ({"method": "full"}, False),  # not measured
    ({"device": "cuda"}, False),
    ({"world": 2}, False),
    ({"native_bf16": False}, False),  # bf16 emulated
    ({"compiler": False}, False),  # inductor needs a C++ compiler on a CPU
])
def test_the_layers_are_compiled_by_default_where_it_was_measured_to_pay(monkeypatch, change, compiles):
    import torch._inductor.cpp_builder as cpp_builder

    import styletune.models
    from styletune.training import _COMPILE_FROM_TOKENS, compiles_by_default

    args = {"device": "cpu", "amp_dtype": torch.bfloat16, "world": 1, "tokens": _COMPILE_FROM_TOKENS}
    options = {"method": "lora", "lora_dropout": 0.0, "time_budget": None}
    for key, value in change.items():
        if key in args or key in options:
            (args if key in args else options)[key] = value
    monkeypatch.setattr(styletune.models, "cpu_has_bf16", lambda: change.get("native_bf16", True))

    def compiler():
        if not change.get("compiler", True):
            raise RuntimeError("no C++ compiler found")
        return "g++"

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", compiler)
    assert compiles_by_default(TrainConfig(out="x", **options), **args) is compiles


@pytest.mark.parametrize("dtype,compiles", [("bfloat16", True), ("float32", False)])
def test_a_long_enough_bf16_run_compiles_its_layers_without_being_asked(tmp_path, tiny_model_dirs, corpus,
                                                                          monkeypatch, dtype, compiles):
    """The run's planned tokens decide (here every run is long enough), before its first step; the
    training line says so; --no-compile keeps it eager. Compiling itself (and --compile) is tested
    against eager training in test_losses."""
    import torch._inductor.cpp_builder as cpp_builder

    import styletune.models
    import styletune.training as T

    monkeypatch.setattr(T, "_COMPILE_FROM_TOKENS", 8 * 4 * 32)  # this run's: 8 steps of 4 blocks of 32 tokens
    monkeypatch.setattr(styletune.models, "cpu_has_bf16", lambda: True)  # whatever this CPU is
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")  # and whatever it has installed
    compiled = []
    monkeypatch.setattr(T, "compile_layers", lambda model: compiled.append(model) or list(T.layer_stack(model)[1]))
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, dtype=dtype, eval_every=100, save_every=100)
    lines = []
    result = train(cfg, echo=lines.append)
    assert result.steps == 8 and len(compiled) == int(compiles)
    start = [line for line in lines if line.startswith("training ")]
    assert len(start) == 1 and start[0].startswith("training lora, compiled on cpu") == compiles, start
    monkeypatch.setattr(T, "_COMPILE_FROM_TOKENS", 8 * 4 * 32 + 1)  # one token short
    train(config(tmp_path, tiny_model_dirs["llama"], corpus, dtype=dtype, out=str(tmp_path / "short")))
    assert len(compiled) == int(compiles)
    monkeypatch.setattr(T, "_COMPILE_FROM_TOKENS", 8 * 4 * 32)  # long enough again, but --no-compile
    train(config(tmp_path, tiny_model_dirs["llama"], corpus, dtype=dtype, out=str(tmp_path / "no"), compile=False))
    assert len(compiled) == int(compiles)


def test_merge_gives_the_same_logits(tmp_path, tiny_model_dirs, corpus):
    from transformers import AutoModelForCausalLM

    cfg = config(tmp_path, tiny_model_dirs["gpt2"], corpus, lr=1e-2)
    train(cfg)
    merged = tmp_path / "merged"
    r = CliRunner().invoke(main, ["merge", cfg.out, str(merged)])
    assert r.exit_code == 0, r.output
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not (merged / "styletune.json").exists() and not (merged / "adapter_config.json").exists()
    lm = load_model(cfg.out, device="cpu", dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, lm.model(ids).logits)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).eval()
        assert not torch.allclose(base(ids).logits, plain(ids).logits)  # training changed something


# ---------------------------------------------------------------------------- bad input, via the CLI


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [l for l in r.output.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, r.output
    return errors[0]


@pytest.fixture
def model_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


def test_bad_input_empty_corpus(tmp_path, model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    line = one_line_error(run_cli("train", empty, "--model", model_dir, "--out", tmp_path / "r"))
    assert "no text" in line
    assert not (tmp_path / "r").exists()


def test_bad_input_missing_file(tmp_path, model_dir):
    line = one_line_error(run_cli("train", tmp_path / "nope.txt", "--model", model_dir, "--out", tmp_path / "r"))
    assert "nope.txt" in line


def test_bad_input_csv_without_column(tmp_path, model_dir):
    csv_path = tmp_path / "jokes.csv"
    csv_path.write_text("ID,Joke\n1,A joke\n2,Another joke\n")
    line = one_line_error(run_cli("train", csv_path, "--model", model_dir, "--out", tmp_path / "r"))
    assert "ID" in line and "Joke" in line
    line = one_line_error(run_cli("train", csv_path, "--column", "Text", "--model", model_dir, "--out", tmp_path / "r"))
    assert "'Text'" in line


def test_bad_input_non_utf8(tmp_path, model_dir):
    bad = tmp_path / "latin.txt"
    bad.write_bytes(("Había una vez " * 20).encode("latin-1"))
    line = one_line_error(run_cli("train", bad, "--model", model_dir, "--out", tmp_path / "r"))
    assert "latin.txt" in line and "byte 3" in line and "--encoding" in line
    ok = run_cli("train", bad, "--encoding", "latin-1", "--model", model_dir, "--out", tmp_path / "r",
                 "--block-size", "16", "--max-steps", "1")
    assert ok.exit_code == 0, ok.output


def test_binary_file_in_folder_is_skipped(tmp_path, model_dir, corpus):
    (corpus / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    r = run_cli("train", corpus, "--model", model_dir, "--out", tmp_path / "r", "--block-size", "32", "--max-steps", "1")
    assert r.exit_code == 0, r.output
    assert "picture.png" in r.output  # reported, not silently dropped
    summary = json.loads((tmp_path / "r" / "data_summary.json").read_text())
    assert any("picture.png" in str(f) for f in summary["skipped_files"])


def test_corpus_smaller_than_a_block(tmp_path, model_dir):
    small = tmp_path / "small.txt"
    small.write_text("The raven sat upon the bust of Pallas above my chamber door and spoke.")
    r = run_cli("train", small, "--model", model_dir, "--out", tmp_path / "r", "--block-size", "128",
                "--max-steps", "1", "--val-fraction", "0")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "r" / "data_summary.json").read_text())
    assert summary["block_size"] < 128 and summary["train_blocks"] >= 1
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Hi.")
    line = one_line_error(run_cli("train", tiny, "--model", model_dir, "--out", tmp_path / "r2", "--val-fraction", "0"))
    assert "tokens" in line


def test_existing_run_is_refused_and_kept(tmp_path, model_dir, corpus):
    out = tmp_path / "r"
    assert run_cli("train", corpus, "--model", model_dir, "--out", out, "--block-size", "32",
                   "--max-steps", "2").exit_code == 0
    before = (out / "metrics.jsonl").read_text()
    line = one_line_error(run_cli("train", corpus, "--model", model_dir, "--out", out, "--max-steps", "2"))
    assert "--resume" in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_text() == before
    # --overwrite with bad data fails before anything is deleted.
    one_line_error(run_cli("train", tmp_path / "missing.txt", "--model", model_dir, "--out", out, "--overwrite"))
    assert (out / "metrics.jsonl").read_text() == before
    r = run_cli("train", corpus, "--model", model_dir, "--out", out, "--block-size", "32", "--max-steps", "3",
                "--overwrite")
    assert r.exit_code == 0 and len(losses(out)) == 3


def test_block_size_above_context(tmp_path, model_dir, corpus):
    line = one_line_error(run_cli("train", corpus, "--model", model_dir, "--out", tmp_path / "r",
                                  "--block-size", "4096"))
    assert "context" in line and "256" in line


@pytest.mark.parametrize("args,needle", [
    (["--max-steps", "0"], "--max-steps"),
    (["--time-budget", "ten minutes"], "--time-budget"),
    (["--lr", "-1"], "--lr"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--filter", "nonsense"], "filter"),
    (["--train-layers", "0"], "--train-layers"),
    (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--train-layers", "3"], "only 2 layers"),
])
def test_bad_options(tmp_path, model_dir, corpus, args, needle):
    line = one_line_error(run_cli("train", corpus, "--model", model_dir, "--out", tmp_path / "r", *args))
    assert needle in line


def test_resume_without_a_run(tmp_path, model_dir, corpus):
    line = one_line_error(run_cli("train", corpus, "--model", model_dir, "--out", tmp_path / "r", "--resume"))
    assert "nothing to resume" in line


def test_incomplete_run_as_model(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: x\n")
    line = one_line_error(run_cli("generate", "hi", "--model", run))
    assert "not a complete styletune run" in line


def test_a_kill_mid_prune_leaves_no_half_deleted_checkpoint(tmp_path, tiny_model_dirs, corpus, monkeypatch):
    cfg = config(tmp_path, tiny_model_dirs["llama"], corpus, save_every=1, eval_every=100, max_steps=3,
                 keep_checkpoints=1)

    real_rmtree = ckpt.shutil.rmtree

    def dies_after_one_file(path, ignore_errors=False):
        if not Path(path).name.startswith(".tmp-deleting-"):
            return real_rmtree(path, ignore_errors=ignore_errors)
        # Delete one file of the old checkpoint, then "get killed".
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()
        raise KeyboardInterrupt("killed mid-delete")

    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    out = Path(cfg.out)
    steps = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in steps] == ["step-000002"]  # step 1 was renamed away before deletion began
    state, _ = ckpt.load_checkpoint(steps[0])
    assert state["step"] == 2 and (steps[0] / "adapter_model.safetensors").is_file()
