"""Options for every styletune command, as plain dataclasses.

No torch import here: the CLI builds these, the library consumes them, and a
training run saves its :class:`TrainConfig` as ``config.yaml`` beside its weights
so that ``styletune train --config runs/NAME/config.yaml`` re-runs it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StyletuneError

DEFAULT_MODEL = "smollm2-135m"

# Default peak learning rates. LoRA's was 1e-3 until 2e-3 learned faster on both corpora it was
# measured on (SmolLM2-135M, r 16, block 128 x batch 8, 80 steps of the default schedule): held-out
# perplexity 17.49 against 17.91 on the King James Bible, 9.45 against 10.62 on Python's documentation
# (pydoc's topics). 3e-3 gave 17.44 and 8.80 at step 80 but was behind 2e-3 early on the Bible (20.21
# against 19.62 at step 20): 2e-3 is the smaller step that keeps most of the gain. A run keeps the peak
# it started with (its checkpoints record it), so a resumed run never changes schedule.
LORA_LR = 2e-3
FULL_LR = 5e-5

QUANTIZE_CHOICES = ("auto", "none", "fp16", "int4", "int8", "int8-dynamic")
"""``--quantize`` values: the fastest storage that keeps quality on this CPU (int4 for matrices
already on a 4-bit grid, fp16 for the rest; fp16 throughout where torch runs at AVX2 only and
styletune's int kernels do not), exact
decoding, fp16 weights with fp32 arithmetic, group-wise int4, weight-only int8, int8 weights and
activations."""


def check_quantize(value: str | None, compile: bool = False) -> str | None:
    """The ``--quantize`` value as the decoder takes it (``None`` for exact), or a clear error (also for
    ``fp16`` with ``--compile``: FBGEMM's packed weights cannot be inputs of a compiled step)."""
    if value is not None and value not in QUANTIZE_CHOICES:
        raise StyletuneError(f"--quantize must be {', '.join(QUANTIZE_CHOICES[:-1])} or {QUANTIZE_CHOICES[-1]}, "
                             f"got {value}")
    if compile and value == "fp16":
        raise StyletuneError("--compile does not take --quantize fp16 (FBGEMM's packed weights cannot be inputs "
                             "of a compiled step); use it without --compile, or --compile with auto, int4 or int8")
    return None if value in (None, "none") else value


@dataclass
class DecodingConfig:
    """How the next token is chosen. Validated by :meth:`validate`."""

    max_new_tokens: int = 100
    """Tokens to generate after the prompt."""
    greedy: bool = False
    """Always take the most likely token (sampling flags are ignored)."""
    temperature: float = 1.0
    """Divide logits by this before sampling; < 1 sharpens, > 1 flattens."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches p."""
    min_p: float | None = None
    """Drop tokens less likely than min_p times the most likely token."""
    eps: float | None = None
    """Epsilon-greedy: with probability eps take the most likely token, else sample.
    eps=1 is greedy, eps=0 is plain sampling."""
    num_beams: int = 1
    """Beam search with this many beams (deterministic; sampling flags are ignored)."""
    length_penalty: float = 1.0
    """Beam search: scores are divided by length**length_penalty."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty (> 1 discourages tokens already in the text)."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size (0 = off)."""
    stop: list[str] = field(default_factory=list)
    """Stop a sample when its text contains any of these strings (not included)."""
    num_samples: int = 1
    """Samples per prompt."""
    seed: int | None = None
    """Makes sampled output reproducible; sample i of a prompt uses seed + i."""
    stop_at_eos: bool = True
    """Stop a sample at the model's end-of-sequence token."""

    def validate(self) -> "DecodingConfig":
        def bad(msg: str) -> None:
            raise StyletuneError(msg)

        if self.max_new_tokens < 0:
            bad(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature > 0:
            bad(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            bad(f"--top-k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.eps is not None and not 0 <= self.eps <= 1:
            bad(f"--eps must be in [0, 1], got {self.eps}")
        if self.num_beams < 1:
            bad(f"--num-beams must be >= 1, got {self.num_beams}")
        if self.num_samples < 1:
            bad(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.num_beams > 1 and self.num_samples > self.num_beams:
            bad(f"--num-samples ({self.num_samples}) cannot exceed --num-beams ({self.num_beams})")
        if not self.repetition_penalty > 0:
            bad(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            bad(f"--no-repeat-ngram-size must be >= 0, got {self.no_repeat_ngram_size}")
        return self

    @property
    def mode(self) -> str:
        """One of ``greedy``, ``beam``, ``eps`` or ``sample``."""
        if self.num_beams > 1:
            return "beam"
        if self.greedy:
            return "greedy"
        if self.eps is not None:
            return "eps"
        return "sample"


def to_dict(obj: Any) -> dict:
    """A dataclass as plain data (paths as strings), for YAML and JSON."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(cls, data: dict):
    """Build ``cls`` from a dict, refusing keys it does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise StyletuneError(f"unknown option(s) in config: {', '.join(unknown)}")
    return cls(**data)


@dataclass
class DataConfig:
    """Where the training texts come from and how they are cleaned and split."""

    sources: list[str] = dataclasses.field(default_factory=list)
    """Files, folders, `datasets` directories or hub dataset names."""
    column: str | None = None
    """CSV/TSV/Parquet/datasets column holding the text (default: `text`)."""
    field: str | None = None
    """JSON/JSONL field holding the text (default: `text`)."""
    split: str | None = None
    """Dataset split, e.g. `train[:1%]` (datasets directories and hub names)."""
    config: str | None = None
    """Hub dataset configuration name."""
    filter: list[str] = dataclasses.field(default_factory=list)
    """Keep only rows where COL=VALUE (several: all must match)."""
    glob: str = "**/*"
    """Which files of a folder to read (recursive)."""
    encoding: str = "utf-8"
    """Encoding of text files."""
    normalize: bool = True
    """Unicode NFC normalisation."""
    strip_control: bool = True
    """Remove control characters (keeps newlines and tabs)."""
    collapse_whitespace: bool = True
    """Collapse runs of spaces/tabs within a line; trim lines."""
    ascii_only: bool = False
    """Drop every non-ASCII character."""
    strip_gutenberg: bool = False
    """Remove Project Gutenberg headers and footers."""
    dedupe: bool = True
    """Drop exact duplicate records."""
    val_fraction: float = 0.1
    """Share of documents held out for validation."""
    min_val_docs: int = 1
    """At least this many validation documents (when the corpus has > 1)."""
    val: str | None = None
    """An explicit validation file (same formats); disables the split."""
    block_size: int = 256
    """Tokens per training example (capped by the model's context)."""


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.yaml`` in the run directory."""

    out: str = ""
    """Run directory (``runs/NAME``)."""
    model: str = DEFAULT_MODEL
    """Base model: registry name, hub id, model directory or .gguf file."""
    method: str = "lora"
    """``lora`` (adapters through peft) or ``full`` fine-tuning."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on LoRA's input. 0, as in peft's ``LoraConfig`` and Unsloth: in runs of 80 steps of
    SmolLM2, 0.05 reached no lower held-out perplexity (King James Bible 17.49 both; Python docs 9.45
    against 9.40 at 0), and its masks cost 4-8% of a step's speed at block 128 (alternating runs, one
    thread), nothing measurable at 256."""
    lora_targets: list[str] | None = None
    """Module names to adapt; default chosen per architecture."""
    compile: bool | None = None
    """``torch.compile`` each transformer layer for the training steps (evaluation and samples stay eager).
    None (the default): where it was measured to pay, a long enough LoRA run in bf16 on a CPU
    (``training.compiles_by_default``)."""
    train_layers: int | None = None
    """Train only the top N transformer layers (LoRA or full); backward stops below them.
    Default: every layer."""
    batch_size: int = 8
    """Blocks per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float | None = None
    """Peak learning rate; default ``LORA_LR`` (2e-3) for LoRA, ``FULL_LR`` (5e-5) for full fine-tuning."""
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    """Share of the steps spent warming the learning rate up linearly."""
    min_lr_fraction: float = 0.1
    """Cosine decay ends at lr * min_lr_fraction."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = off)."""
    epochs: float | None = None
    """Passes over the training blocks (default 1 when no other length is given)."""
    max_steps: int | None = None
    """Optimizer steps (caps --epochs and --time-budget)."""
    time_budget: str | None = None
    """Wall-clock budget like ``10m``, ``90s`` or ``1h``; steps are planned from measured speed, and the run
    stops (with a last evaluation) when the next step would not fit."""
    eval_every: int | None = None
    """Evaluate (validation loss, samples) every N steps, and at the end; default: about ten times
    over the run. The base model's validation loss is always measured first, as step 0."""
    save_every: int = 100
    """Write a resumable checkpoint every N steps, and at the end."""
    keep_checkpoints: int = 2
    """Keep this many newest step checkpoints (best and final are kept apart)."""
    patience: int | None = None
    """Stop after this many evaluations without a better validation loss."""
    eval_prompts: list[str] = dataclasses.field(default_factory=list)
    """Prompts completed at each evaluation (default: openings of validation documents)."""
    eval_max_new_tokens: int = 40
    fsdp: bool = False
    """Shard the weights, gradients and optimizer over the processes with FSDP2 (``fully_shard``),
    for a model that does not fit one device; the default with several processes is DDP."""
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    """Autocast dtype for training: ``auto`` = bf16 where the hardware has it, else fp32."""

    def validate(self) -> "TrainConfig":
        def bad(msg: str) -> None:
            raise StyletuneError(msg)

        if not self.out:
            bad("--out is required: the run directory to write")
        if self.method not in ("lora", "full"):
            bad(f"--method must be lora or full, got {self.method}")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "lora_r"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not 0 < self.lr < float("inf"):
            bad(f"--lr must be > 0 and finite, got {self.lr}")
        if self.epochs is not None and not self.epochs > 0:
            bad(f"--epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            bad(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.data.block_size < 8:
            bad(f"--block-size must be >= 8, got {self.data.block_size}")
        if not 0 <= self.data.val_fraction < 1:
            bad(f"--val-fraction must be in [0, 1), got {self.data.val_fraction}")
        if not 0 <= self.lora_dropout < 1:
            bad(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.train_layers is not None and self.train_layers < 1:
            bad(f"--train-layers must be >= 1, got {self.train_layers}")
        if self.patience is not None and self.patience < 1:
            bad(f"--patience must be >= 1, got {self.patience}")
        return self

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return LORA_LR if self.method == "lora" else FULL_LR


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``1.5h``, ``1h30m`` or plain seconds -> seconds."""
    import re

    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|s)", s)
    if not parts or "".join(n + u for n, u in parts) != s.replace(" ", ""):
        raise StyletuneError(f"--time-budget must look like 90s, 10m, 1h or 1h30m, got {text!r}")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise StyletuneError(f"--time-budget must be positive, got {text!r}")
    return seconds


def train_config_to_dict(cfg: TrainConfig) -> dict:
    d = to_dict(cfg)
    d["data"] = to_dict(cfg.data)
    return d


def train_config_from_dict(d: dict) -> TrainConfig:
    d = dict(d)
    data = from_dict(DataConfig, d.pop("data", {}) or {})
    cfg = from_dict(TrainConfig, d)
    cfg.data = data
    return cfg


def save_yaml(path: str | Path, data: dict) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def load_yaml(path: str | Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StyletuneError(f"no such config file: {path}") from None
    except yaml.YAMLError as exc:
        raise StyletuneError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise StyletuneError(f"{path} does not hold a mapping of options")
    return data
