"""The training loop, top to bottom: data, model, plan, schedule, steps, evaluation, checkpoints.

Written as one plain loop (nanoGPT style) rather than on top of transformers'
Trainer: packed blocks need no collator or padding, exact resume is a matter of
saving (optimizer, RNG, step) because the data position is derived from the
step, and the whole thing stays readable.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from . import attention
from . import checkpoints as ckpt
from .architectures import architecture_of, default_lora_targets
from .config import TrainConfig, parse_duration, save_yaml, train_config_to_dict
from .errors import StyletuneError
from .losses import LossOf
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
    time_up: bool = False
    """Stopped before the planned steps because --time-budget was spent (``stopped_early`` too)."""
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


_COMPILE_FROM_TOKENS = 100_000
"""A run that says neither --compile nor --no-compile compiles its layers from this many training
tokens on (where :func:`compiles_by_default` allows): about 4 minutes of SmolLM2-135M's eager bf16
steps on a 2-core AMD EPYC (435 tokens/s, one thread), of which compiling saves ~35 s for a first
compilation of ~17 s."""
_COMPILE_FROM_BUDGET_S = 240
"""... and, under --time-budget, from a budget this long: a shorter one leaves too little time to pay
the compilation back (the demo's 3 minutes, which plan about 100,000 tokens of jokes, stay eager)."""


def compiles_by_default(cfg: TrainConfig, device: str, amp_dtype, world: int, tokens: int) -> bool:
    """Whether a run that says neither --compile nor --no-compile compiles its layers for training:
    where it was measured to pay, LoRA without dropout, bf16 autocast on a CPU with native bf16,
    one process, at least ``_COMPILE_FROM_TOKENS`` tokens to train (and a ``--time-budget``, if any, of
    ``_COMPILE_FROM_BUDGET_S`` or more), and a C++ compiler for inductor.

    Measured in ``make bench`` (SmolLM2-135M, block 256 x batch 8, one thread, a 2-core AMD EPYC
    with avx512_bf16; bench/results/2026-12-07-vm-train-compile-auto.md): compiled steps ran 516
    tokens/s against 435 eager (1.18x), at 3.6 GB peak memory against 5.0; a bf16 compute floor of
    541 was measured there earlier. The first step pays the compilation, ~17 s (~3 s when torch's
    on-disk cache already has it): too much for a short run, so the run's length decides, in tokens
    (for a run of set length, --max-steps or --epochs, the same choice on every run of a config and
    on its resumption, which so continues with the same arithmetic; under --time-budget the tokens
    are as planned from the timed pass). Not where it did not pay: in fp32 the products dominate
    (148 against 145 tokens/s, the same report); with LoRA dropout 0.05 the gain was unsteady (best
    of two rounds 1.13x, but the rounds crossed: eager 328 and 401 tokens/s, compiled 454 and 355;
    bench/results/2026-12-07-vm-train-compile-dropout.md). Full fine-tuning gained less (1.09x: a
    median 5.87 s a step compiled against 6.36 and 6.43 eager in alternating scratch runs of 8 steps,
    one thread), so it stays eager too. GPUs, several processes and an AMX CPU were not measured."""
    from .models import cpu_has_bf16

    if not (cfg.method == "lora" and cfg.lora_dropout == 0 and amp_dtype == torch.bfloat16 and device == "cpu"
            and cpu_has_bf16() and world == 1 and tokens >= _COMPILE_FROM_TOKENS
            and (not cfg.time_budget or parse_duration(cfg.time_budget) >= _COMPILE_FROM_BUDGET_S)):
        return False
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()  # raises where there is none
    except Exception:  # noqa: BLE001 - no compiler (or no inductor): train eagerly, as --no-compile
        return False
    return True


def uncompile_layers(layers: list[torch.nn.Module]) -> None:
    for layer in layers:
        if "forward" in vars(layer):
            del layer.forward  # back to the class's own forward
    layers.clear()


_LORA_LR_BEFORE = 1e-3
"""LoRA's default peak learning rate before checkpoints recorded the peak (``LoopState.peak_lr``): what a
run started then, with no --lr, continues at."""


def lr_at(step: int, total: int, cfg: TrainConfig, peak: float | None = None) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_fraction`` of the peak (default: the config's)."""
    peak = cfg.peak_lr if peak is None else peak
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
    A second Ctrl-C stops at once, unless ``escalate`` is off: with several processes the
    launcher passes each signal on to every rank and ends them itself if they take too long."""

    def __init__(self, escalate: bool = True):
        self.requested: str | None = None
        self.escalate = escalate
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT and self.escalate:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclass
class LoopState:
    """What the loop knows between optimizer steps. A checkpoint saves it (as JSON) and --resume
    restores it; with the step number it is everything needed to continue exactly."""

    step: int = 0
    total_steps: int = 0
    global_batch: int = 0
    """Blocks per optimizer step, all processes together; kept when the process count changes."""
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    eval_every: int = 0
    """Steps between evaluations as planned at the start (0: a checkpoint from before it was kept)."""
    peak_lr: float = 0.0
    """The learning rate schedule's peak, as the run started (0: a checkpoint from before it was kept)."""

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "LoopState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


@functools.lru_cache(maxsize=4)
def _epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


@dataclass(frozen=True)
class StepPlan:
    """Which blocks each optimizer step trains on, and this process's share of them.

    The blocks form an endless stream, reshuffled every epoch (``n_blocks`` positions), and step
    ``s`` takes positions ``[s * global_batch, (s + 1) * global_batch)``: every block once per
    epoch, the same blocks in the same order whatever the number of processes. Rank ``r`` takes
    the ``r``-th consecutive share of a step, as ``accum`` micro-batches of ``micro`` blocks. A pure
    function of the step number, so resuming needs no saved data position.
    """

    n_blocks: int
    global_batch: int
    micro: int
    accum: int
    rank: int = 0
    world: int = 1
    seed: int = 0

    @classmethod
    def make(cls, n_blocks: int, global_batch: int, batch_size: int, world: int, rank: int,
             seed: int) -> "StepPlan":
        """Each rank's share is ``global_batch / world`` blocks, in as few micro-batches of at most
        ``batch_size`` blocks as divide it evenly (accumulation adapts to the process count)."""
        if global_batch % world:
            raise StyletuneError(f"the global batch of {global_batch} blocks per step cannot be split evenly over "
                                 f"{world} processes; use a process count that divides it")
        share = global_batch // world
        accum = next(a for a in range(-(-share // batch_size), share + 1) if share % a == 0)
        return cls(n_blocks, global_batch, share // accum, accum, rank, world, seed)

    def micro_positions(self, step: int, j: int) -> int:
        """Stream position of the first block of this rank's micro-batch ``j`` of step ``step``."""
        return step * self.global_batch + self.rank * self.micro * self.accum + j * self.micro

    def blocks(self, start: int) -> list[int]:
        """The block indices at stream positions ``start .. start + micro``."""
        out = []
        for p in range(start, start + self.micro):
            epoch, i = divmod(p, self.n_blocks)
            out.append(int(_epoch_order(self.n_blocks, self.seed, epoch)[i]))
        return out

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.n_blocks / self.global_batch))

    def describe(self) -> str:
        procs = f"{self.world} processes x " if self.world > 1 else ""
        accum = f"{self.accum} micro-batches of {self.micro}" if self.accum > 1 else f"micro-batches of {self.micro}"
        return f"global batch {self.global_batch} blocks ({procs}{accum})"


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None: a new run), or the error for what ``out`` holds."""
    if has_run(out):
        if resume:
            resume_from = ckpt.newest_checkpoint(out)
            if resume_from is None:
                raise StyletuneError(f"{out} has no complete checkpoint to resume from; use --overwrite to start over")
            return resume_from
        if not overwrite:
            raise StyletuneError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    elif resume:
        raise StyletuneError(f"nothing to resume: {out} holds no run")
    return None


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, echo: Echo | None = None,
          progress: bool = False, on_step: Callable[[int, object], None] | None = None) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the run to ``config.out``.

    Under torchrun or ``accelerate launch`` (or ``styletune train --devices N``) every process calls
    this; they share the work (see :mod:`styletune.distributed`) and rank 0 writes the run.

    Args:
        config: every option (see :class:`~styletune.config.TrainConfig`).
        resume: continue from the newest complete checkpoint in ``config.out``.
        overwrite: replace a run already in ``config.out``.
        echo: where to send human-readable progress lines (default: nowhere; rank 0 only).
        progress: show a progress bar on stderr (rank 0 only).
        on_step: called as ``on_step(step, model)`` after each optimizer step (for callers' own
            logging, and for tests that interrupt a run at a chosen step).

    On a CPU this process's allocator keeps the memory it frees from then on (see
    :func:`keep_freed_memory`): its footprint stays at the training peak after ``train`` returns.
    """
    from .distributed import Processes, fsdp_from_environment
    from .models import pick_device

    cfg = config.validate()
    procs = Processes.start(pick_device(cfg.device))
    if procs.device == "cpu":
        keep_freed_memory()
    fsdp = (cfg.fsdp or fsdp_from_environment()) and procs.world > 1  # one process has nothing to shard over
    quiet = (lambda _msg: None)
    try:
        run = _Run(cfg, procs, fsdp, resume, overwrite, (echo or quiet) if procs.main else quiet)
        result = run.loop(progress and procs.main, on_step)
        procs.barrier()  # the run directory is complete when train() returns, on every rank
        return result
    finally:
        procs.close()


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of giving it back to the system:
    no ``mmap`` for large blocks, no trimming of the heap. A CPU training step allocates and frees
    hundreds of MB of activations; given back, every step faults them in again, zero-filled (SmolLM2,
    batch 8 x 256, one EPYC core: ~78,000 page faults per step, 0.3-0.7 s of system time; with this,
    a few hundred at the same peak, 5.3 GB). PyTorch's performance tuning guide recommends jemalloc
    or tcmalloc on CPUs for the same reason. Returns False where the C library is not glibc."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class _Run:
    """One training run: its pieces (model, optimizer, data, plan, state) and the three things the
    loop does with them, :meth:`step`, :meth:`evaluate` and :meth:`save`. The loop itself is
    :meth:`loop`, top to bottom. ``procs`` is the distributed layer: where this process trains
    alone it does nothing."""

    def __init__(self, cfg: TrainConfig, procs, fsdp: bool, resume: bool, overwrite: bool, echo: Echo):
        from .data import format_summary, prepare_data
        from .models import context_length, load_plain, prepare_tokenizer, resolve

        self.cfg, self.procs, self.fsdp, self.echo = cfg, procs, fsdp, echo
        self.out = out = Path(cfg.out)
        resume_from = check_run_dir(out, resume, overwrite)
        if resume_from:
            saved, saved_tensors = ckpt.load_checkpoint(resume_from)  # a damaged one fails here, before any work
        procs.barrier()  # every rank has looked at the run directory before rank 0 changes it

        # ---- model and data (nothing is written until both are known to be good)
        self.device = device = procs.device
        self.amp_dtype = autocast_dtype(cfg, device)
        source = resolve(cfg.model)
        if source.kind == "run":
            raise StyletuneError(f"--model {cfg.model} is a styletune run; train from its base model, "
                                 "or continue the run with --resume")
        model, tokenizer = load_plain(source, torch.float32)
        self.tokenizer = tokenizer = prepare_tokenizer(tokenizer)
        if tokenizer.eos_token_id is None:
            raise StyletuneError(f"the tokenizer of {cfg.model} has no end-of-text token to separate documents")
        # Rank 0 tokenises and packs into the cache; the others then find it there.
        if not procs.main:
            procs.barrier()
        self.data = data = prepare_data(cfg.data, tokenizer, seed=cfg.seed, max_block_size=context_length(model.config))
        if procs.main:
            procs.barrier()
        data.summary["cache_key"] = data.cache_key
        echo(format_summary(data.summary))

        if procs.main:
            if overwrite and not resume and out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
        # Base model recorded as an absolute path when it is one, so the run loads from anywhere.
        self.base_name = str(Path(cfg.model).resolve()) if source.kind in ("dir", "gguf") else cfg.model
        if procs.main and not resume_from:
            save_yaml(out / "config.yaml", train_config_to_dict(cfg))
            (out / "data_summary.json").write_text(json.dumps(data.summary, indent=1, default=str))

        if resume_from and cfg.method == "full":
            # Full fine-tuning: the checkpoint holds the whole model.
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(resume_from, dtype=torch.float32, use_safetensors=True)
        # Seeds LoRA's initialisation (the same on every rank); dropout is seeded per micro-batch.
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
        attention.use_for_training(model)  # the faster CPU attention for short bf16 blocks; sdpa otherwise
        model.to(device)
        model.config.use_cache = False
        self.model = model

        # The base model's validation loss, the baseline the curve starts from (step 0); measured before
        # the layers are compiled or sharded, since evaluation always runs eagerly.
        self.loss_of, self.compiled = LossOf(model), []
        t0 = time.perf_counter()
        self.baseline = None if resume_from else self.evaluate()
        # What one evaluation costs, the slowest rank's: --time-budget plans the evaluations from it.
        self.eval_s = procs.max(time.perf_counter() - t0)
        # --compile compiles before the time-budget probe, which then times compiled steps; the
        # default decides once the run's length is known, below.
        self.compiled = compile_layers(model) if cfg.compile else []
        self.wrapped = procs.wrap(model, layer_stack(model)[1], fsdp)
        if fsdp:
            self.loss_of = self.wrapped  # the sharded model answers only through its own forward

        # AdamW with weight decay on matrices only (not on norms and biases), as nanoGPT does.
        self.params = params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # torch's fused kernel, on CPU too: one pass over each tensor instead of a chain of foreach
        # ops (an AdamW step over LoRA's 4.9M parameters took 4.9 ms fused against 18.3 ms, over the
        # full model's 134.5M 82 ms against 507, one thread here). Not for FSDP's sharded parameters.
        fused = device.startswith("cuda") or (device == "cpu" and not fsdp)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), fused=fused)

        # ---- how many steps, and each step's blocks
        n_blocks = len(data.train)
        if resume_from:
            self.state = state = LoopState.from_checkpoint(saved)
            if not state.global_batch:  # a checkpoint from before multi-process training
                state.global_batch = cfg.batch_size * cfg.grad_accum
            self.plan = StepPlan.make(n_blocks, state.global_batch, cfg.batch_size, procs.world, procs.rank, cfg.seed)
            ckpt.load_optimizer(self.optimizer, model, saved_tensors["optimizer"], full=fsdp)
            ckpt.set_rng_state(saved_tensors["rng"])
            if cfg.lr is not None:
                state.peak_lr = cfg.lr
            elif not state.peak_lr:  # a checkpoint from before the peak was kept: the default of its day
                state.peak_lr = _LORA_LR_BEFORE if cfg.method == "lora" else cfg.peak_lr
            total = state.total_steps
            if cfg.max_steps and cfg.max_steps != total and cfg.max_steps > state.step:
                echo(f"note: steps 1-{state.step} followed a learning-rate schedule planned for {total} steps and the "
                     f"rest follows one planned for {cfg.max_steps}, so the losses will differ from those of a run "
                     f"planned for {cfg.max_steps} steps from the start")
                state.total_steps = cfg.max_steps
            if procs.main:
                _truncate_metrics(out / "metrics.jsonl", state.step)
            echo(f"resuming {out} at step {state.step} of {state.total_steps}")
        else:
            global_batch = cfg.batch_size * cfg.grad_accum * procs.world
            self.plan = StepPlan.make(n_blocks, global_batch, cfg.batch_size, procs.world, procs.rank, cfg.seed)
            self.state = state = LoopState(global_batch=global_batch, peak_lr=cfg.peak_lr)
            state.total_steps = plan_steps(cfg, self.plan, lambda: self._falling_back(lambda: self._micro_step(0, 0)),
                                           self.wrapped, echo, procs, eval_s=self.eval_s)
        if cfg.compile is None and compiles_by_default(cfg, device, self.amp_dtype, procs.world,
                                                       state.total_steps * self.plan.global_batch * data.block_size):
            self.compiled = compile_layers(model)  # (one process: the loop's module calls these layers as they are)
        # About ten evaluations over the run whatever its length (fewer in a short --time-budget),
        # unless --eval-every says otherwise; a resumed run keeps its planned interval.
        if not state.eval_every:
            state.eval_every = max(1, round(state.total_steps / planned_evaluations(cfg, self.eval_s)))
        self.eval_every = cfg.eval_every or state.eval_every
        # The next evaluation: the next multiple of the interval (a plan made again under --time-budget
        # moves it; see ``_replan``).
        self.next_eval = (state.step // self.eval_every + 1) * self.eval_every
        self.evaluated_at = state.step  # the step of the latest evaluation (or where the run starts)
        self.prompts = cfg.eval_prompts or default_prompts(data, tokenizer)
        which = (f" (top {cfg.train_layers} layers)" if cfg.train_layers else "") + (", compiled" if self.compiled else "")
        where = f"{procs.world} processes on {device.split(':')[0]}" if procs.world > 1 else device
        echo(f"training {cfg.method}{which} on {where}{', FSDP' if fsdp else ''}"
             f"{' with bf16 autocast' if self.amp_dtype else ''}: {state.total_steps} steps, "
             f"{n_blocks} blocks of {data.block_size} tokens, {self.plan.describe()}, "
             f"{self.plan.global_batch * data.block_size} tokens/step")

    # ---- one optimizer step

    def _micro_step(self, step: int, j: int) -> tuple[float, int]:
        """Forward and backward of this rank's micro-batch ``j`` of step ``step`` (its share of the
        step's gradient): (its loss, its tokens). LoRA's dropout is seeded by the micro-batch's
        place in the stream, so its masks do not depend on how many processes share the step."""
        plan = self.plan
        start = plan.micro_positions(step, j)
        batch = self.data.train[plan.blocks(start)]["input_ids"].to(self.device)  # (micro, T)
        torch.manual_seed(self.cfg.seed * 1_000_003 + start)
        last = j == plan.accum - 1
        # DDP all-reduces the gradient in the last micro-batch's backward only.
        sync = self.wrapped.no_sync() if hasattr(self.wrapped, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with torch.autocast(device_type=self.device.split(":")[0], dtype=self.amp_dtype,
                                enabled=self.amp_dtype is not None):
                loss = self.wrapped(batch)
            (loss / plan.accum).backward()
        return loss.item(), batch.numel()

    def _falling_back(self, work: Callable[[], object]):
        """``work()``: forward and backward passes. If a compiled layer fails in either (no C++
        compiler, an operation inductor cannot lower; a backward is compiled at its first call),
        training goes on eagerly: the failed attempt's gradients are undone and ``work`` runs again."""
        if not self.compiled:
            return work()
        try:
            return work()
        except Exception as exc:  # noqa: BLE001 - a compiler failure means: train eagerly
            self.echo(f"warning: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                      "training without it")
            uncompile_layers(self.compiled)
            self.model.zero_grad(set_to_none=True)
            return work()

    def step(self) -> tuple[float, int, float]:
        """Optimizer step ``state.step + 1``: (its loss over every process, this rank's tokens, lr).
        Stops with an error, on every rank together, before a non-finite weight can be saved."""
        cfg, state = self.cfg, self.state
        lr = lr_at(state.step, state.total_steps, cfg, state.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        def grads():
            loss_sum, tokens = 0.0, 0
            for j in range(self.plan.accum):
                loss, n = self._micro_step(state.step, j)
                loss_sum, tokens = loss_sum + loss, tokens + n
            return loss_sum, tokens

        loss_sum, tokens = self._falling_back(grads)
        loss_sum, all_tokens = self.procs.sum(loss_sum, tokens)
        loss = loss_sum / (self.plan.accum * self.procs.world)
        if not math.isfinite(loss):
            # Stop before the optimizer step, so no non-finite weight is ever written.
            raise StyletuneError(f"the loss became {loss} at step {state.step + 1}; stopped without "
                                 "saving these weights (try a lower --lr)")
        # The gradient's norm before clipping, logged as transformers' Trainer logs it.
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, cfg.grad_clip, norm)
        self.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += int(all_tokens)
        # A finite loss can still take a step that overflows (a learning rate far too high).
        local_bad = not all(torch.isfinite(norm).all() for norm in torch._foreach_norm(
            [p.to_local() if hasattr(p, "to_local") else p for p in self.params]))
        if self.procs.any(local_bad):
            raise StyletuneError(f"the weights became non-finite at step {state.step}; stopped without saving "
                                 "them (try a lower --lr)")
        return loss, int(all_tokens), lr

    # ---- evaluation

    def evaluate(self) -> float | None:
        """Mean next-token loss over every validation token, the ranks sharing the blocks (under
        FSDP each rank goes through all of them: a sharded forward needs every rank in step)."""
        val = self.data.val
        if val is None or len(val) == 0:
            return None
        share = range(len(val)) if self.fsdp else range(self.procs.rank, len(val), self.procs.world)
        with self._eager():
            loss_sum, tokens = _loss_sums(self.loss_of, [val[i]["input_ids"] for i in share], self.cfg.batch_size,
                                          self.device, self.amp_dtype)
        self.model.train()
        if not self.fsdp:
            loss_sum, tokens = self.procs.sum(loss_sum, tokens)
        return loss_sum / tokens if tokens else None

    def _eager(self):
        """Evaluation and sampling run eagerly: their shapes change, and compiling them would not pay."""
        return torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext()

    def samples(self) -> list[dict] | None:
        """The fixed prompts completed (rank 0; not under FSDP, whose weights are in pieces)."""
        if not self.procs.main or self.fsdp:
            return None
        with self._eager():
            samples = sample_prompts(self.model, self.tokenizer, self.prompts, self.cfg, self.device)
        self.model.train()
        return samples

    # ---- saving (rank 0 writes; under FSDP every rank first helps gather the full weights)

    def _full_weights(self) -> dict | None:
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _save_weights(self, path: Path, weights: dict | None) -> None:
        if weights is None:
            for p in self.params:
                if not torch.isfinite(p).all():
                    raise StyletuneError(f"the weights became non-finite at step {self.state.step}; "
                                         "refusing to save them")
        if weights is None:
            self.model.save_pretrained(path)
        else:  # FSDP: the full weights every rank helped gather
            self.model.save_pretrained(path, state_dict=weights)
        self.tokenizer.save_pretrained(path)
        write_info(path, self.base_name, self.cfg.method, self.state.step)

    def save(self) -> None:
        """A resumable checkpoint of the current step (weights, optimizer, loop state)."""
        weights = self._full_weights()
        optimizer = ckpt.optimizer_state(self.optimizer, self.model, full=self.fsdp)
        if self.procs.main:
            with _disk_errors(self.out):
                ckpt.save_checkpoint(self.out, self.state.step, lambda p: self._save_weights(p, weights), optimizer,
                                     {**dataclasses.asdict(self.state), "block_size": self.data.block_size,
                                      "processes": self.procs.world})
                ckpt.prune_checkpoints(self.out, self.cfg.keep_checkpoints)

    def keep(self, name: str) -> None:
        """``best/`` or ``final/``, replaced only once the new one is complete."""
        weights = self._full_weights()
        if self.procs.main:
            with _disk_errors(self.out):
                ckpt.write_atomically(self.out / name, lambda p: self._save_weights(p, weights))

    # ---- the loop

    def _replan(self, recent: list[float], budget: float, elapsed: float, evals_made: int, eval_s: float,
                tolerance: float = 0.0) -> int:
        """--time-budget's step count planned again from the ``recent`` steps' times (this process's;
        the slowest rank's count), ``elapsed`` seconds into the budget, with room for the evaluations
        still to come at ``eval_s`` each; the evaluation interval follows unless --eval-every fixed it.
        A new count within ``tolerance`` (a fraction) of the current one leaves the plan as it is (the
        noise of a shared CPU would otherwise move the learning rate schedule at every evaluation).
        Returns the new total (also in the loop state)."""
        cfg, state, procs = self.cfg, self.state, self.procs
        per_step = procs.max(sum(recent) / len(recent))
        evals = planned_evaluations(cfg, self.eval_s)
        left = max(0, evals - evals_made)
        fit = steps_in_budget(budget, state.step, procs.max(elapsed), per_step, left, procs.max(eval_s))
        total = min([fit, *length_caps(cfg, self.plan)])
        if abs(total - state.total_steps) > tolerance * state.total_steps:
            self.echo(f"time budget {cfg.time_budget}: the last {len(recent)} steps took {per_step:.2f} s "
                      f"each -> {total} steps")
            state.total_steps = total
            # the interval of the planned number over the new plan, from this step (a plan that shrank
            # drops evaluations rather than crowd them into the steps left)
            state.eval_every = max(1, round(total / evals))
            if not cfg.eval_every:
                # counted from the last evaluation, so that plans made between evaluations do not keep
                # putting the next one off
                self.eval_every = state.eval_every
                self.next_eval = max(state.step + 1, self.evaluated_at + state.eval_every)
        return state.total_steps

    def loop(self, progress: bool, on_step) -> TrainResult:
        cfg, state, out, echo, procs = self.cfg, self.state, self.out, self.echo, self.procs
        total = state.total_steps
        main = procs.main
        metrics = open(out / "metrics.jsonl", "a", encoding="utf-8") if main else None
        bar = _progress(total, state.step, progress)
        result = TrainResult(out=out, steps=state.step, total_steps=total, tokens_seen=state.tokens_seen,
                             elapsed_s=state.elapsed_s, summary=self.data.summary)
        last_val = None
        budget = parse_duration(cfg.time_budget) if cfg.time_budget else None
        eval_cost = self.eval_s  # the latest evaluation's wall time (samples and checkpoint included)
        t_start = time.perf_counter() - state.elapsed_s
        try:
            with _StopRequests(escalate=procs.world == 1) as stop:
                if self.baseline is not None:
                    _write_metric(metrics, {"step": 0, "val_loss": round(self.baseline, 6),
                                            "val_ppl": round(math.exp(self.baseline), 4)})
                    echo(f"step 0/{total}: val loss {self.baseline:.4f} (ppl {math.exp(self.baseline):.2f}) "
                         "before training")
                self.wrapped.train()
                # Under --time-budget the step count is planned again from the steps' own times: after
                # the first few, and after every evaluation from the steps since the last plan (steps
                # run faster once warm, and a shared CPU changes speed: the first plan alone left a
                # fifth to a third of a 5-minute budget unused).
                step_times, evals_made, planned_at = [], 0, 1
                while state.step < total:
                    t0 = time.perf_counter()
                    loss, step_tokens, lr = self.step()
                    step = state.step
                    dt = time.perf_counter() - t0
                    state.elapsed_s = time.perf_counter() - t_start
                    _write_metric(metrics, {"step": step, "loss": round(loss, 6), "lr": lr,
                                            "grad_norm": round(self.grad_norm, 4),
                                            "tokens_seen": state.tokens_seen, "elapsed_s": round(state.elapsed_s, 3),
                                            "tokens_per_s": round(step_tokens / dt, 1)})
                    step_times.append(dt)
                    if budget is not None and len(step_times) == _REPLAN_AT and step < total:
                        total = self._replan(step_times[planned_at:], budget, state.elapsed_s, evals_made,
                                             self.eval_s)
                        bar.total, planned_at = total, len(step_times)
                    result.train_loss = loss
                    if on_step:
                        on_step(step, self.model)
                    # --time-budget is wall time: when the next step and a last evaluation would not fit,
                    # this step is the last (the planned step count was an estimate).
                    time_up = (budget is not None and step < total
                               and procs.any(state.elapsed_s + dt + eval_cost >= budget))
                    last = step == total or time_up
                    evaluating = step >= self.next_eval or last
                    if evaluating:
                        t_eval, evals_made = time.perf_counter(), evals_made + 1
                        val = self.evaluate()
                        if val is not None:
                            last_val = val
                            if state.best_val_loss is None or val < state.best_val_loss:
                                state.best_val_loss, state.best_step, state.evals_since_best = val, step, 0
                                self.keep("best")
                            else:
                                state.evals_since_best += 1
                            _write_metric(metrics, {"step": step, "val_loss": round(val, 6),
                                                    "val_ppl": round(math.exp(val), 4)})
                        samples = self.samples()
                        if main:
                            if samples is not None:
                                _log_samples(out, step, samples)
                            plot_losses(out)
                        echo(f"step {step}/{total}: loss {loss:.4f}"
                             + (f", val loss {val:.4f} (ppl {math.exp(val):.2f})" if val is not None else ""))
                        if cfg.patience and state.evals_since_best >= cfg.patience:
                            echo(f"early stop: no better validation loss in {cfg.patience} evaluations")
                            result.stopped_early = True
                        eval_cost = time.perf_counter() - t_eval
                        self.next_eval, self.evaluated_at = step + self.eval_every, step
                    # Planned again at each evaluation, and about ten times over the run between them
                    # (a short budget makes few: one, the last, in the bench's 5 minutes on the King
                    # James Bible), from the steps since the last plan.
                    since = len(step_times) - planned_at
                    due = _REPLAN_AT - 1 if evaluating else max(_REPLAN_AT - 1, total // _EVALUATIONS)
                    if budget is not None and not last and not result.stopped_early and since >= due:
                        total = self._replan(step_times[planned_at:], budget, time.perf_counter() - t_start,
                                             evals_made, eval_cost, tolerance=_REPLAN_TOLERANCE)
                        bar.total, planned_at = total, len(step_times)
                    # Every rank stops at the same step: a signal may reach them at different moments.
                    stopping = procs.any(stop.requested is not None)
                    if step % cfg.save_every == 0 or last or result.stopped_early or stopping:
                        self.save()
                    bar.update(1)
                    bar.set_postfix_str(f"loss {loss:.3f}" + (f" val {last_val:.3f}" if last_val else "")
                                        + f" {step_tokens / dt:.0f} tok/s")
                    if stopping:
                        echo(f"{stop.requested or 'stop requested'}: saved a checkpoint at step {step}; "
                             "continue with --resume")
                        result.interrupted = True
                        break
                    if time_up and not result.stopped_early:
                        echo(f"time budget {cfg.time_budget} spent: stopped at step {step} of {total}")
                        result.stopped_early = result.time_up = True
                    if result.stopped_early:
                        break
        finally:
            bar.close()
            if metrics:
                metrics.close()

        result.steps, result.total_steps = state.step, total
        result.tokens_seen, result.elapsed_s = state.tokens_seen, state.elapsed_s
        result.best_val_loss, result.best_step = state.best_val_loss, state.best_step
        if last_val is not None:
            result.val_loss, result.val_ppl = last_val, math.exp(last_val)
        if not result.interrupted:
            self.keep("final")
            if main:
                plot_losses(out)
                from .report import write_model_card

                write_model_card(out, cfg, result, self.base_name)
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


_EVALUATIONS = 10
"""Evaluations over a run, its last one included, unless --eval-every says otherwise."""
_EVAL_SHARE = 0.10
"""The most of a --time-budget its planned evaluations may take."""


def planned_evaluations(cfg: TrainConfig, eval_s: float) -> int:
    """How many evaluations the run makes, its last one included: ten, or, under --time-budget, as
    many as fit in a tenth of it at ``eval_s`` each (at least one). Without the cap, ten evaluations of
    the bench's King James corpus (~37 s each with their samples) took half of a 10-minute budget. At
    15% of it a 5-minute budget made two (one halfway) and 49 steps; at a tenth, one (the last) and 54
    steps, with held-out perplexity 15.58 against 15.70 (the two runs side by side, one thread each,
    block 256 x batch 8, on a 2-core AMD EPYC)."""
    if not cfg.time_budget or eval_s <= 0:
        return _EVALUATIONS
    return max(1, min(_EVALUATIONS, int(_EVAL_SHARE * parse_duration(cfg.time_budget) / eval_s)))


_REPLAN_AT = 3
"""Under --time-budget the step count is planned again after this step, from the steps after the
first (which warms up): the pass timed before training ran about 15% slower than the steps did.
After that, again at every evaluation from the steps since (at least ``_REPLAN_AT - 1`` of them), and
every tenth of the planned steps between evaluations, where the count moves by more than
``_REPLAN_TOLERANCE`` of it."""

_REPLAN_TOLERANCE = 0.05
"""On the EPYC the 3-minute demo's evaluations planned 69, 60, 65, 63 and 61 steps in turn: a shared
CPU's step times vary by about that much."""


def steps_in_budget(budget: float, done: int, elapsed: float, per_step: float, evals: int, eval_s: float) -> int:
    """Optimizer steps in all that fit ``budget`` seconds when ``done`` steps took ``elapsed`` s and
    each further one takes ``per_step`` s, leaving room for ``evals`` more evaluations of ``eval_s``
    each and a margin of one step or 3% of the budget (samples, checkpoints, a slow step), whichever
    is larger. At least ``done + 1``: the loop's own check ends a run whose budget is spent."""
    room = budget - elapsed - evals * eval_s - max(per_step, 0.03 * budget)
    return done + max(1, int(room / per_step))


def length_caps(cfg: TrainConfig, plan: StepPlan) -> list[int]:
    """The step counts --max-steps and --epochs allow."""
    return ([cfg.max_steps] if cfg.max_steps else []) + ([plan.steps_for_epochs(cfg.epochs)] if cfg.epochs else [])


def plan_steps(cfg: TrainConfig, plan: StepPlan, one_pass: Callable[[], object], model, echo: Echo,
               procs=None, eval_s: float = 0.0) -> int:
    """Total optimizer steps from --max-steps, --epochs and --time-budget (the smallest wins).

    For a time budget, ``one_pass`` (a micro-batch's forward and backward) is timed twice (the
    first warms up, the second is measured; with several processes, the slowest one's); gradients
    and the RNG are restored afterwards, so planning does not change what training does. The plan
    keeps room for the evaluations (:func:`planned_evaluations`) at ``eval_s`` (the base model's,
    measured, the slowest rank's) each (:func:`steps_in_budget`). It is an estimate: the loop plans
    again from its first steps (:data:`_REPLAN_AT`), and stops when the budget is spent
    (:meth:`_Run.loop`).
    """
    candidates = length_caps(cfg, plan)
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
        per_step = (procs.max(timings[-1]) if procs else timings[-1]) * plan.accum
        evals = planned_evaluations(cfg, eval_s)
        steps = steps_in_budget(budget, 0, 0.0, per_step, evals, eval_s)
        echo(f"time budget {cfg.time_budget}: {per_step:.2f} s/step measured -> {steps} steps, "
             f"{evals} evaluation{'s' if evals != 1 else ''} at {eval_s:.1f} s")
        candidates.append(steps)
    if not candidates:
        candidates.append(plan.steps_for_epochs(1))  # one epoch
    return min(candidates)


@torch.no_grad()
def evaluate_loss(model, blocks, batch_size: int, device: str, amp_dtype) -> float | None:
    """Mean next-token loss over every validation token (blocks may differ in length)."""
    if blocks is None or len(blocks) == 0:
        return None
    loss_sum, tokens = _loss_sums(LossOf(model), [blocks[i]["input_ids"] for i in range(len(blocks))], batch_size,
                                  device, amp_dtype)
    return loss_sum / tokens if tokens else None


@torch.no_grad()
def _loss_sums(loss_of, rows: list[torch.Tensor], batch_size: int, device: str, amp_dtype) -> tuple[float, int]:
    """(summed next-token loss, predicted tokens) over ``rows``, in batches of consecutive rows of
    one length (only the last block of a set may be shorter)."""
    loss_of.eval()
    total_loss, total_tokens = 0.0, 0
    i = 0
    while i < len(rows):
        j = i
        while j < len(rows) and j - i < batch_size and len(rows[j]) == len(rows[i]):
            j += 1
        batch = torch.stack(rows[i:j]).to(device)  # (B, T)
        i = j
        if batch.shape[1] < 2:
            continue
        with torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_of(batch).float()
        n = batch.shape[0] * (batch.shape[1] - 1)
        total_loss += loss.item() * n
        total_tokens += n
    return total_loss, total_tokens


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
    if fh is None:  # a rank other than 0: it writes nothing
        return
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
