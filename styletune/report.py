"""Human-readable files written from plain data: the run's model card."""

from __future__ import annotations

import json
from pathlib import Path

from .config import train_config_to_dict


def _samples_at_last_step(out: Path) -> list[dict]:
    path = out / "samples.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return []
    last = rows[-1]["step"]
    return [r for r in rows if r["step"] == last]


def write_model_card(out: Path, cfg, result, base_name: str) -> Path:
    """``README.md`` in the run directory: base model, data, hyperparameters, metrics, samples."""
    summary = result.summary
    conf = train_config_to_dict(cfg)
    data = conf.pop("data")
    lines = [
        f"# {out.name}",
        "",
        f"A {'LoRA adapter for' if cfg.method == 'lora' else 'full fine-tune of'} `{base_name}`, trained with styletune.",
        "",
        "## Use it",
        "",
        "```",
        f"styletune generate \"Once upon a time\" --model {out}",
        f"styletune merge {out} {out}-merged   # a plain transformers directory",
        "```",
        "",
        "## Data",
        "",
        f"- sources: {', '.join(data['sources']) or '-'}",
        f"- data hash (tokenised cache key): `{summary.get('cache_key', '')}`",
        f"- {summary.get('records', '?')} documents ({summary.get('train_docs', '?')} train, "
        f"{summary.get('val_docs', '?')} validation), {summary.get('tokens', '?')} tokens, "
        f"blocks of {summary.get('block_size', '?')} tokens",
        "",
        "## Results",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| steps | {result.steps} of {result.total_steps} |",
        f"| tokens seen | {result.tokens_seen:,} |",
        f"| time | {result.elapsed_s:.0f} s |",
        f"| final training loss | {result.train_loss:.4f} |" if result.train_loss is not None else "| final training loss | - |",
        f"| final validation loss | {result.val_loss:.4f} (perplexity {result.val_ppl:.2f}) |"
        if result.val_loss is not None else "| final validation loss | - |",
        f"| best validation loss | {result.best_val_loss:.4f} at step {result.best_step} |"
        if result.best_val_loss is not None else "| best validation loss | - |",
        "",
        "![loss](loss.png)",
        "",
        "## Hyperparameters",
        "",
        "| option | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in conf.items() if k != "out"]
    lines += [f"| data.{k} | {v} |" for k, v in data.items()]
    samples = _samples_at_last_step(out)
    if samples:
        lines += ["", f"## Samples at step {samples[0]['step']} (fixed seed)", ""]
        for s in samples:
            lines += [f"> **{s['prompt']}**{s['text']}".replace("\n", "\n> "), ""]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
