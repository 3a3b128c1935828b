"""Side-by-side runs: the same prompts, decoding settings and seed on several models.

The base model is loaded once.  Every LoRA weights directory trained on that base
(the tuned run, its checkpoints) is attached to it as a named peft adapter and
switched on in turn, so a comparison holds one model plus small adapters in
memory.  Other columns (full fine-tunes, other models) are loaded one at a time
and released before the next.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import DEFAULT_MODEL, DecodingConfig
from .errors import StyletuneError

COMPARE_DEFAULTS = dict(max_new_tokens=60, temperature=0.8, top_p=0.95, seed=0)
"""Decoding defaults for comparisons: sampled (so style shows), reproducible."""


@dataclass
class Column:
    name: str
    """Header: ``base``, ``tuned``, ``step N`` or the --model value."""
    model: str
    """What was loaded: a model name, run or weights directory."""


@dataclass
class CompareRow:
    prompt: str
    outputs: dict[str, str]
    """Column name -> continuation (the prompt is not repeated)."""


@dataclass
class Comparison:
    columns: list[Column]
    rows: list[CompareRow]
    decoding: dict = field(default_factory=dict)

    def to_json(self) -> list[dict]:
        """The stable JSON shape: ``[{prompt, outputs: {column: text}}]``."""
        return [{"prompt": r.prompt, "outputs": dict(r.outputs)} for r in self.rows]


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StyletuneError(f"no such prompts file: {path}") from None
    except UnicodeDecodeError as exc:
        raise StyletuneError(f"{path} is not valid utf-8 at byte {exc.start}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise StyletuneError(f"the prompts file {path} is empty")
    return prompts


def _columns(base: str | None, tuned: str | None, models: list[str], checkpoints: bool) -> tuple[str, list[Column]]:
    from . import checkpoints as ckpt
    from .runs import read_info, run_root, weights_dir

    if tuned is not None:
        tuned_path = Path(tuned)
        if not tuned_path.is_dir():
            raise StyletuneError(f"no such run directory: {tuned}")
        tuned_info = read_info(tuned_path)  # raises a one-line error for an incomplete run
        base = base or tuned_info["base_model"]
    base = base or DEFAULT_MODEL
    columns = [Column("base", base)]
    if tuned is not None:
        if checkpoints:
            for step_dir in ckpt.complete_checkpoints(run_root(Path(tuned)) or Path(tuned)):
                columns.append(Column(f"step {int(step_dir.name.split('-')[1])}", str(step_dir)))
        columns.append(Column("tuned", str(weights_dir(Path(tuned)))))
    elif checkpoints:
        raise StyletuneError("--checkpoints all needs --tuned RUN")
    for m in models:
        columns.append(Column(m, m))
    seen: dict[str, int] = {}
    for c in columns:  # unique headers
        seen[c.name] = seen.get(c.name, 0) + 1
        if seen[c.name] > 1:
            c.name = f"{c.name} ({seen[c.name]})"
    return base, columns


def _same_model(a: str, b: str) -> bool:
    """Whether two --model values mean the same base (names, or paths to one directory)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def compare(prompts: list[str], *, base: str | None = None, tuned: str | None = None, models: list[str] = (),
            checkpoints: bool = False, decoding: DecodingConfig | None = None, device: str = "auto",
            dtype: str = "auto") -> Comparison:
    """Continue every prompt with every model, with the same decoding settings and seed.

    Args:
        prompts: the prompts (rows).
        base: the base model (default: the tuned run's base, else the bundled model).
        tuned: a run directory (column ``tuned``).
        models: more columns, any ``--model`` value.
        checkpoints: add a column per saved checkpoint of the tuned run.
        decoding: shared decoding settings (default :data:`COMPARE_DEFAULTS`).
    """
    from .decoding.engine import generate
    from .models import load_model
    from .runs import read_info

    if not prompts:
        raise StyletuneError("no prompts: pass --prompt TEXT or --prompts FILE")
    dec = (decoding or DecodingConfig(**COMPARE_DEFAULTS)).validate()
    if dec.seed is None:
        dec.seed = COMPARE_DEFAULTS["seed"]
    base, columns = _columns(base, tuned, list(models), checkpoints)
    outputs: dict[str, list[str]] = {}

    def run(lm, column: Column) -> None:
        outputs[column.name] = [s.text for s in generate(lm, prompts, dec)]

    # Columns that are LoRA adapters over this base share its weights.
    def is_adapter(c: Column) -> bool:
        path = Path(c.model)
        if c.name == "base" or not path.is_dir():
            return False
        try:
            info = read_info(path)
        except StyletuneError:
            return False
        return info["method"] == "lora" and _same_model(info["base_model"], base)

    adapters = [c for c in columns if is_adapter(c)]
    others = [c for c in columns if c.name != "base" and c not in adapters]

    base_lm = load_model(base, device=device, dtype=dtype)
    run(base_lm, columns[0])
    if adapters:
        from peft import PeftModel

        from .runs import weights_dir

        from transformers import AutoTokenizer

        from .models import check_same_tokenizer

        peft_model = None
        for c in adapters:
            wdir = str(weights_dir(Path(c.model)))
            check_same_tokenizer(AutoTokenizer.from_pretrained(wdir), base_lm.tokenizer,
                                 f"the tokenizer saved in {wdir}", f"that of its base model {base}")
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(base_lm.model, wdir, adapter_name=c.name)
            else:
                peft_model.load_adapter(wdir, adapter_name=c.name)
        peft_model.eval()
        shared = dataclasses.replace(base_lm, model=peft_model)
        for c in adapters:
            peft_model.set_adapter(c.name)
            run(shared, c)
        del peft_model, shared
    del base_lm
    gc.collect()
    for c in others:
        lm = load_model(c.model, device=device, dtype=dtype)
        run(lm, c)
        del lm
        gc.collect()

    rows = [CompareRow(prompt=p, outputs={c.name: outputs[c.name][i] for c in columns}) for i, p in enumerate(prompts)]
    return Comparison(columns=columns, rows=rows, decoding=asdict(dec))
