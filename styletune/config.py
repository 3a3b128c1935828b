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
