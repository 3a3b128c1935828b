"""Human-readable files written from plain data: the run's model card."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from .config import train_config_to_dict

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def figure(width: float = 6.4, height: float = 3.6):
    """A matplotlib figure on the Agg canvas: no pyplot state, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


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


# ------------------------------------------------------------------------------------ comparisons


def visible_text(text: str) -> str:
    """``text`` with control characters (other than newline and tab) shown as Unicode control
    pictures (U+2400 block), so a report stays valid HTML and shows what the model wrote."""
    return _CONTROL.sub(lambda m: chr(0x2421) if m.group() == "\x7f" else chr(0x2400 + ord(m.group())), text)


def md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: HTML-escaped, pipes escaped, newlines as <br>."""
    return md_text(text).replace("|", "&#124;").replace("\n", "<br>") or " "


def md_text(text: str) -> str:
    """Text safe in Markdown: control characters made visible, ``< > &`` escaped (renderers pass HTML through)."""
    return html.escape(visible_text(text), quote=False)


def html_text(text: str) -> str:
    """Text safe in HTML element content and attribute values."""
    return html.escape(visible_text(text))


def comparison_markdown(cmp) -> str:
    """A Markdown table: one row per prompt, one column per model."""
    names = [c.name for c in cmp.columns]
    lines = ["| prompt | " + " | ".join(md_cell(n) for n in names) + " |",
             "| --- | " + " | ".join("---" for _ in names) + " |"]
    for row in cmp.rows:
        lines.append(f"| **{md_cell(row.prompt)}** | " + " | ".join(md_cell(row.outputs[n]) for n in names) + " |")
    lines += ["", "Models: " + "; ".join(f"`{c.name}` = {c.model}" for c in cmp.columns) + ".",
              "Decoding: " + _decoding_line(cmp.decoding) + "."]
    return "\n".join(lines) + "\n"


def _decoding_line(d: dict) -> str:
    """The settings that differ from the defaults, plus length and seed."""
    from .config import DecodingConfig

    default = DecodingConfig()
    shown = [k for k, v in d.items() if k in ("max_new_tokens", "seed") or v != getattr(default, k, v)]
    return ", ".join(f"{k}={d[k]}" for k in shown)


def comparison_html(cmp, title: str = "styletune comparison") -> str:
    """A self-contained HTML page (no external resources) with the side-by-side table."""
    escape = html_text
    names = [c.name for c in cmp.columns]
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    body = []
    for row in cmp.rows:
        cells = "".join(f"<td>{escape(row.outputs[n])}</td>" for n in names)
        body.append(f"<tr><th class=prompt>{escape(row.prompt)}</th>{cells}</tr>")
    models = "".join(f"<li><b>{escape(c.name)}</b>: {escape(c.model)}</li>" for c in cmp.columns)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; table-layout: fixed; }}
th, td {{ border: 1px solid #ccc; padding: .5em .7em; vertical-align: top; white-space: pre-wrap; text-align: left; }}
thead th {{ background: #f2f2f2; }}
th.prompt {{ background: #fafafa; font-weight: 600; }}
.meta {{ color: #555; font-size: .9em; }}
</style></head><body>
<h1>{escape(title)}</h1>
<table><thead><tr><th>prompt</th>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<div class=meta><p>Same decoding settings and seed for every column: {escape(_decoding_line(cmp.decoding))}.</p>
<ul>{models}</ul></div>
</body></html>
"""
