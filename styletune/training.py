"""The training loop, top to bottom: data, model, plan, schedule, steps, evaluation, checkpoints.

Written as one plain loop (nanoGPT style) rather than on top of transformers'
Trainer: packed blocks need no collator or padding, exact resume is a matter of
saving (optimizer, RNG, step) because the data position is derived from the
step, and the whole thing stays readable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import checkpoints as ckpt
from .architectures import architecture_of, default_lora_targets
from .config import TrainConfig, parse_duration, save_yaml, train_config_to_dict
from .errors import StyletuneError
from .losses import causal_lm_loss
from .lora import lean_lora
from .runs import has_run, write_info

Echo = Callable[[str], None]

@dataclass
class TrainResult:
    """What a run did; everything else is in its directory."""

    out: Path
    steps: int
    total_steps: int
    tokens_seen: int
    elapsed_s: float
    train_loss: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    interrupted: bool = False
    stopped_early: bool = False
    summary: dict = field(default_factory=dict)


def lora_targets(model, cfg: TrainConfig):
    return cfg.lora_targets or default_lora_targets(model)


def layer_stack(model) -> tuple[str, torch.nn.ModuleList]:
    """The transformer blocks, bottom to top, and their module name: where the architecture's record
    says, else (an architecture styletune has no record for) the model's longest ModuleList."""
    arch = architecture_of(model)
    if arch is not None:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        prefix = "base_model.model." if inner is not model else ""
        try:
            return prefix + arch.layers, inner.get_submodule(arch.layers)
        except AttributeError:
            pass
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise StyletuneError(f"--train-layers: found no stack of transformer layers in {type(model).__name__}")
    return max(lists, key=lambda item: len(item[1]))


def top_layers(model, n: int | None) -> list[int] | None:
    """Indices of the top ``n`` layers, or None for all of them."""
    if n is None:
        return None
    total = len(layer_stack(model)[1])
    if n > total:
        raise StyletuneError(f"--train-layers {n}: the model has only {total} layers")
    return list(range(total - n, total)) if n < total else None


def freeze_below(model, layers: list[int]) -> None:
    """Full fine-tuning of the top layers only: everything else is frozen except the norms
    above the stack (and an untied output head). No frozen tensor below the first trained
    layer needs a gradient, so autograd records nothing there and backward stops early."""
    _, stack = layer_stack(model)
    in_stack = {id(p) for p in stack.parameters()}
    trained = {id(p) for i in layers for p in stack[i].parameters()}
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained or (id(p) not in in_stack and id(p) not in embeddings))


def compile_layers(model) -> list[torch.nn.Module]:
    """Regional compilation: each transformer layer through ``torch.compile`` (one graph, reused
    by every layer of the same shape), the rest of the model eager.

    Random operations (LoRA's dropout) stay torch's own (``fallback_random``): inductor's
    generated random kernels were the slowest part of a compiled CPU step (a step took 18.0 s
    against 16.6 s with torch's, 20 s eager), and with torch's generator a compiled run draws
    the same masks as an eager one and its checkpoints' RNG state resumes it exactly.
    """
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    layers = list(layer_stack(model)[1])
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=False)
    return layers


def uncompile_layers(layers: list[torch.nn.Module]) -> None:
    for layer in layers:
        if "forward" in vars(layer):
            del layer.forward  # back to the class's own forward
    layers.clear()


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_fraction`` of the peak."""
    peak = cfg.peak_lr
    warmup = round(cfg.warmup_fraction * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = peak * cfg.min_lr_fraction
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast_dtype(cfg: TrainConfig, device: str):
    """bf16 autocast where the hardware runs bf16 natively, else none (fp32)."""
    from .models import pick_dtype

    dtype = pick_dtype(cfg.dtype, device, training=True)
    return dtype if dtype == torch.bfloat16 else None


class _StopRequests:
    """Ctrl-C / SIGTERM set a flag; the loop saves at the next step boundary and exits.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, echo: Echo | None = None,
          progress: bool = False, on_step: Callable[[int, object], None] | None = None) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the run to ``config.out``.

    Args:
        config: every option (see :class:`~styletune.config.TrainConfig`).
        resume: continue from the newest complete checkpoint in ``config.out``.
        overwrite: replace a run already in ``config.out``.
        echo: where to send human-readable progress lines (default: nowhere).
        progress: show a progress bar on stderr.
        on_step: called as ``on_step(step, model)`` after each optimizer step (for callers' own
            logging, and for tests that interrupt a run at a chosen step).
    """
    from .data import format_summary, prepare_data
    from .models import context_length, load_plain, pick_device, prepare_tokenizer, resolve

    cfg = config.validate()
    echo = echo or (lambda _msg: None)
    out = Path(cfg.out)
    resume_from = None
    if has_run(out):
        if resume:
            resume_from = ckpt.newest_checkpoint(out)
            if resume_from is None:
                raise StyletuneError(f"{out} has no complete checkpoint to resume from; use --overwrite to start over")
            saved, saved_tensors = ckpt.load_checkpoint(resume_from)  # a damaged one fails here, before any work
        elif not overwrite:
            raise StyletuneError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    elif resume:
        raise StyletuneError(f"nothing to resume: {out} holds no run")

    # ---- model and data (nothing is written until both are known to be good)
    device = pick_device(cfg.device)
    amp_dtype = autocast_dtype(cfg, device)
    source = resolve(cfg.model)
    if source.kind == "run":
        raise StyletuneError(f"--model {cfg.model} is a styletune run; train from its base model, "
                             "or continue the run with --resume")
    model, tokenizer = load_plain(source, torch.float32)
    tokenizer = prepare_tokenizer(tokenizer)
    if tokenizer.eos_token_id is None:
        raise StyletuneError(f"the tokenizer of {cfg.model} has no end-of-text token to separate documents")
    data = prepare_data(cfg.data, tokenizer, seed=cfg.seed, max_block_size=context_length(model.config))
    data.summary["cache_key"] = data.cache_key
    echo(format_summary(data.summary))

    if overwrite and not resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # Base model recorded as an absolute path when it is one, so the run loads from anywhere.
    base_name = str(Path(cfg.model).resolve()) if source.kind in ("dir", "gguf") else cfg.model
    if not resume_from:
        save_yaml(out / "config.yaml", train_config_to_dict(cfg))
        (out / "data_summary.json").write_text(json.dumps(data.summary, indent=1, default=str))

    if resume_from and cfg.method == "full":
        # Full fine-tuning: the checkpoint holds the whole model.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resume_from, dtype=torch.float32, use_safetensors=True)
    # Seeds LoRA's initialisation and dropout; a resumed run restores the RNG from its checkpoint.
    torch.manual_seed(cfg.seed)
    layers = top_layers(model, cfg.train_layers)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_targets(model, cfg), task_type="CAUSAL_LM",
                          layers_to_transform=layers,
                          layers_pattern=layer_stack(model)[0].rsplit(".", 1)[-1] if layers else None)
        with warnings_quiet():
            model = get_peft_model(model, lcfg)
        if resume_from:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(resume_from / "adapter_model.safetensors"))
        lean_lora(model)
    elif layers is not None:
        freeze_below(model, layers)
    model.to(device)
    model.config.use_cache = False

    # AdamW with weight decay on matrices only (not on norms and biases), as nanoGPT does.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))

    train_blocks = data.train
    n_blocks = len(train_blocks)
    micro_per_epoch = math.ceil(n_blocks / cfg.batch_size)

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch: int) -> torch.Tensor:
        return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))

    def micro_batch(m: int) -> torch.Tensor:
        """Micro-batch number ``m`` of an endless, per-epoch reshuffled stream: (B, T).
        A pure function of m, so resuming at a step needs no saved data position."""
        epoch, i = divmod(m, micro_per_epoch)
        idx = epoch_order(epoch)[i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()
        return train_blocks[idx]["input_ids"].to(device)

    # The base model's validation loss, the baseline the curve starts from (step 0); measured before
    # the layers are compiled, since evaluation always runs eagerly.
    baseline = None if resume_from else evaluate_loss(model, data.val, cfg.batch_size, device, amp_dtype)
    compiled = compile_layers(model) if cfg.compile else []

    def loss_backward(batch: torch.Tensor) -> float:
        """Forward and backward of one micro-batch (its share of the step's gradient); its loss."""
        with torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = causal_lm_loss(model, batch)
        (loss / cfg.grad_accum).backward()
        return loss.item()

    def falling_back(work: Callable[[], object]):
        """``work()``: forward and backward passes. If a compiled layer fails in either (no C++
        compiler, an operation inductor cannot lower; a backward is compiled at its first call),
        training goes on eagerly: the failed attempt's gradients and random draws are undone and
        ``work`` runs again."""
        if not compiled:
            return work()
        rng = ckpt.rng_state()
        try:
            return work()
        except Exception as exc:  # noqa: BLE001 - a compiler failure means: train eagerly
            echo(f"warning: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                 "training without it")
            uncompile_layers(compiled)
            model.zero_grad(set_to_none=True)
            ckpt.set_rng_state(rng)
            return work()

    def step_grads(step: int) -> tuple[float, int]:
        """The gradient of optimizer step ``step`` (0-based) over its micro-batches: (summed loss, tokens)."""
        loss_sum, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            batch = micro_batch(step * cfg.grad_accum + micro)
            loss_sum += loss_backward(batch)
            tokens += batch.numel()
        return loss_sum, tokens

    def eager():
        """Evaluation and sampling run eagerly: their shapes change, and compiling them would not pay."""
        return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()

    # ---- how many steps
    state = {"tokens_seen": 0, "elapsed_s": 0.0, "best_val_loss": None, "best_step": None, "evals_since_best": 0}
    start_step = 0
    if resume_from:
        optimizer.load_state_dict(saved_tensors["optimizer"])
        ckpt.set_rng_state(saved_tensors["rng"])
        start_step, total = saved["step"], saved["total_steps"]
        state.update({k: saved[k] for k in state if k in saved})
        if cfg.max_steps and cfg.max_steps != total and cfg.max_steps > start_step:
            echo(f"note: steps 1-{start_step} followed a learning-rate schedule planned for {total} steps and the "
                 f"rest follows one planned for {cfg.max_steps}, so the losses will differ from those of a run "
                 f"planned for {cfg.max_steps} steps from the start")
            total = cfg.max_steps
        _truncate_metrics(out / "metrics.jsonl", start_step)
        echo(f"resuming {out} at step {start_step} of {total}")
    else:
        total = plan_steps(cfg, micro_per_epoch, lambda: falling_back(lambda: loss_backward(micro_batch(0))),
                           model, echo)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * data.block_size
    # About ten evaluations over the run whatever its length, unless --eval-every says otherwise.
    eval_every = cfg.eval_every or max(1, round(total / 10))
    which = (f" (top {cfg.train_layers} layers)" if cfg.train_layers else "") + (", compiled" if compiled else "")
    echo(f"training {cfg.method}{which} on {device}{' with bf16 autocast' if amp_dtype else ''}: {total} steps, "
         f"{n_blocks} blocks of {data.block_size} tokens, ~{tokens_per_step} tokens/step")

    prompts = cfg.eval_prompts or default_prompts(data, tokenizer)

    def save_weights(path: Path) -> None:
        for p in params:
            if not torch.isfinite(p).all():
                raise StyletuneError(f"the weights became non-finite at step {step}; refusing to save them")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        write_info(path, base_name, cfg.method, step)

    def checkpoint() -> None:
        with _disk_errors(out):
            ckpt.save_checkpoint(out, step, save_weights, optimizer,
                                 {**state, "total_steps": total, "block_size": data.block_size})
            ckpt.prune_checkpoints(out, cfg.keep_checkpoints)

    def keep(name: str) -> None:
        """``best/`` or ``final/``, replaced only once the new one is complete."""
        with _disk_errors(out):
            ckpt.write_atomically(out / name, save_weights)

    # ---- the loop
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")
    bar = _progress(total, start_step, progress)
    result = TrainResult(out=out, steps=start_step, total_steps=total, tokens_seen=state["tokens_seen"],
                         elapsed_s=state["elapsed_s"], summary=data.summary)
    step = start_step
    last_val = None
    t_start = time.perf_counter() - state["elapsed_s"]
    try:
        with _StopRequests() as stop:
            if baseline is not None:
                _write_metric(metrics, {"step": 0, "val_loss": round(baseline, 6),
                                        "val_ppl": round(math.exp(baseline), 4)})
                echo(f"step 0/{total}: val loss {baseline:.4f} (ppl {math.exp(baseline):.2f}) before training")
            model.train()
            while step < total:
                t0 = time.perf_counter()
                lr = lr_at(step, total, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, step_tokens = falling_back(lambda: step_grads(step))
                state["tokens_seen"] += step_tokens
                loss_value = loss_sum / cfg.grad_accum
                if not math.isfinite(loss_value):
                    # Stop before the optimizer step, so no non-finite weight is ever written.
                    raise StyletuneError(f"the loss became {loss_value} at step {step + 1}; stopped without "
                                         "saving these weights (try a lower --lr)")
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if not all(torch.isfinite(norm) for norm in torch._foreach_norm(params)):
                    # A finite loss can still take a step that overflows (a learning rate far too high).
                    raise StyletuneError(f"the weights became non-finite at step {step}; stopped without saving "
                                         "them (try a lower --lr)")
                dt = time.perf_counter() - t0
                state["elapsed_s"] = time.perf_counter() - t_start
                record = {"step": step, "loss": round(loss_value, 6), "lr": lr, "tokens_seen": state["tokens_seen"],
                          "elapsed_s": round(state["elapsed_s"], 3), "tokens_per_s": round(step_tokens / dt, 1)}
                _write_metric(metrics, record)
                result.train_loss = loss_value
                if on_step:
                    on_step(step, model)
                last = step == total
                if step % eval_every == 0 or last:
                    with eager():
                        val = evaluate_loss(model, data.val, cfg.batch_size, device, amp_dtype)
                    model.train()
                    if val is not None:
                        last_val = val
                        better = state["best_val_loss"] is None or val < state["best_val_loss"]
                        if better:
                            state["best_val_loss"], state["best_step"], state["evals_since_best"] = val, step, 0
                            keep("best")
                        else:
                            state["evals_since_best"] += 1
                        _write_metric(metrics, {"step": step, "val_loss": round(val, 6), "val_ppl": round(math.exp(val), 4)})
                    with eager():
                        samples = sample_prompts(model, tokenizer, prompts, cfg, device)
                    model.train()
                    _log_samples(out, step, samples)
                    echo(f"step {step}/{total}: loss {loss_value:.4f}"
                         + (f", val loss {val:.4f} (ppl {math.exp(val):.2f})" if val is not None else ""))
                    plot_losses(out)
                    if cfg.patience and state["evals_since_best"] >= cfg.patience:
                        echo(f"early stop: no better validation loss in {cfg.patience} evaluations")
                        result.stopped_early = True
                if step % cfg.save_every == 0 or last or result.stopped_early or stop.requested:
                    checkpoint()
                bar.update(1)
                bar.set_postfix_str(f"loss {loss_value:.3f}" + (f" val {last_val:.3f}" if last_val else "")
                                    + f" {step_tokens / dt:.0f} tok/s")
                if stop.requested:
                    echo(f"{stop.requested}: saved a checkpoint at step {step}; continue with --resume")
                    result.interrupted = True
                    break
                if result.stopped_early:
                    break
    finally:
        bar.close()
        metrics.close()

    result.steps, result.total_steps = step, total
    result.tokens_seen, result.elapsed_s = state["tokens_seen"], state["elapsed_s"]
    result.best_val_loss, result.best_step = state["best_val_loss"], state["best_step"]
    if last_val is not None:
        result.val_loss, result.val_ppl = last_val, math.exp(last_val)
    if not result.interrupted:
        keep("final")
        plot_losses(out)
        from .report import write_model_card

        write_model_card(out, cfg, result, base_name)
    return result


# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _disk_errors(out: Path):
    """A write that fails (disk full, read-only, permissions) as one line: what failed, and that every
    checkpoint completed before it is intact (writes go to temporaries that are renamed when whole)."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or out
        raise StyletuneError(f"could not write {where}: {exc.strerror or exc}; the checkpoints written before are "
                             f"intact: free space and continue with `styletune train --resume --out {out}`") from None


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def plan_steps(cfg: TrainConfig, micro_per_epoch: int, one_pass: Callable[[], object], model, echo: Echo) -> int:
    """Total optimizer steps from --max-steps, --epochs and --time-budget (the smallest wins).

    For a time budget, ``one_pass`` (a micro-batch's forward and backward) is timed twice (the
    first warms up, the second is measured); gradients and the RNG are restored afterwards, so
    planning does not change what training does.
    """
    candidates = []
    if cfg.max_steps:
        candidates.append(cfg.max_steps)
    if cfg.epochs:
        candidates.append(max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum)))
    if cfg.time_budget:
        budget = parse_duration(cfg.time_budget)
        rng = ckpt.rng_state()
        model.train()
        timings = []
        for _ in range(2):
            t0 = time.perf_counter()
            one_pass()
            timings.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        ckpt.set_rng_state(rng)
        per_step = timings[-1] * cfg.grad_accum
        # Keep ~15% of the budget for evaluations, samples and checkpoints.
        steps = max(1, int(0.85 * budget / per_step))
        echo(f"time budget {cfg.time_budget}: {per_step:.2f} s/step measured -> {steps} steps")
        candidates.append(steps)
    if not candidates:
        candidates.append(max(1, math.ceil(micro_per_epoch / cfg.grad_accum)))  # one epoch
    return min(candidates)


@torch.no_grad()
def evaluate_loss(model, blocks, batch_size: int, device: str, amp_dtype) -> float | None:
    """Mean next-token loss over every validation token (blocks may differ in length)."""
    if blocks is None or len(blocks) == 0:
        return None
    model.eval()
    total_loss, total_tokens = 0.0, 0
    rows = [blocks[i]["input_ids"] for i in range(len(blocks))]
    i = 0
    while i < len(rows):
        # Group consecutive blocks of one length (only the last block may be shorter).
        j = i
        while j < len(rows) and j - i < batch_size and len(rows[j]) == len(rows[i]):
            j += 1
        batch = torch.stack(rows[i:j]).to(device)
        i = j
        if batch.shape[1] < 2:
            continue
        with torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = causal_lm_loss(model, batch).float()
        n = batch.shape[0] * (batch.shape[1] - 1)
        total_loss += loss.item() * n
        total_tokens += n
    return total_loss / total_tokens if total_tokens else None


def default_prompts(data, tokenizer, n: int = 2) -> list[str]:
    """Openings of validation (else training) documents: the first few words after an EOS."""
    blocks = data.val if data.val is not None and len(data.val) else data.train
    eos = tokenizer.eos_token_id
    prompts = []
    for i in range(min(len(blocks), 50)):
        ids = blocks[i]["input_ids"].tolist()
        starts = [0] if i == 0 else []
        starts += [k + 1 for k, t in enumerate(ids) if t == eos and k + 1 < len(ids)]
        for s in starts:
            words = tokenizer.decode(ids[s:s + 12], skip_special_tokens=True).split()[:4]
            text = " ".join(words)
            if text and text not in prompts:
                prompts.append(text)
            if len(prompts) >= n:
                return prompts
    return prompts or [""]


def sample_prompts(model, tokenizer, prompts: list[str], cfg: TrainConfig, device: str) -> list[dict]:
    """Complete the fixed prompts with a fixed seed, so runs and steps can be compared."""
    from .config import DecodingConfig
    from .decoding.engine import generate
    from .models import LoadedModel, context_length

    model.eval()
    model.config.use_cache = True
    lm = LoadedModel(model=model, tokenizer=tokenizer, name="training", source=None, device=device,
                     dtype=torch.float32, context_length=context_length(model.config))
    dec = DecodingConfig(max_new_tokens=cfg.eval_max_new_tokens, temperature=0.8, top_p=0.95, seed=cfg.seed)
    try:
        samples = generate(lm, prompts, dec)
    finally:
        model.config.use_cache = False
    return [{"prompt": s.prompt, "text": s.text} for s in samples]


def _write_metric(fh, record: dict) -> None:
    fh.write(json.dumps(record) + "\n")
    fh.flush()


def _log_samples(out: Path, step: int, samples: list[dict]) -> None:
    with open(out / "samples.jsonl", "a", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n")


def _records(path: Path) -> list[dict]:
    """The JSON lines of ``path``. A process killed mid-write leaves a torn last line: it is dropped
    (every complete line was flushed before the next one was started)."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop what the interrupted run logged after its checkpoint (and a torn last line)."""
    for p in (path, path.with_name("samples.jsonl")):
        if not p.exists():
            continue
        kept = [r for r in _records(p) if r.get("step", 0) <= step]
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(p)


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return _records(path) if path.exists() else []


def plot_losses(out: Path) -> None:
    """``loss.png``: training loss per step and validation loss per evaluation."""
    from .report import figure

    rows = read_metrics(out)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return
    fig = figure(7, 4)
    ax = fig.add_subplot()
    ax.plot(*zip(*train), label="train loss", color="#4477aa", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#ee6677", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(out.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / ".loss.png.tmp.png"
    fig.savefig(tmp)
    tmp.replace(out / "loss.png")


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
