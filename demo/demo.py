"""`make demo`: fine-tune the bundled SmolLM2-135M on the jokes that PyPI's pyjokes
ships, then show base and tuned model side by side with their validation perplexity.

The same with your own CSV:
    styletune train my.csv --column text --out runs/mine --time-budget 10m
    styletune generate "Once upon a time" --model runs/mine
"""

from __future__ import annotations

import csv
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import pyjokes

from styletune import DataConfig, DecodingConfig, compare, load_model
from styletune.config import TrainConfig
from styletune.data import prepare_data
from styletune.runs import read_info, weights_dir
from styletune.training import evaluate_loss, train

ROOT = Path(os.environ.get("STYLETUNE_DEMO_DIR", "runs/demo"))
BUDGET = os.environ.get("STYLETUNE_DEMO_BUDGET", "3m")
PROMPTS = ["Why do programmers", "A SQL query walks into", "My code", "How many programmers does it take"]


def write_corpus(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Joke"])
        for i, joke in enumerate(pyjokes.get_jokes(language="en", category="all")):
            writer.writerow([i, joke])


def say(msg: str = "") -> None:
    print(msg, flush=True)


def main() -> None:
    corpus = ROOT / "jokes.csv"
    write_corpus(corpus)
    cfg = TrainConfig(out=str(ROOT / "run"), model="smollm2-135m",
                      data=DataConfig(sources=[str(corpus)], column="Joke", block_size=128),
                      batch_size=8, time_budget=BUDGET, save_every=50, seed=0, patience=3,
                      eval_prompts=PROMPTS[:2])
    say(f"$ styletune train {corpus} --column Joke --block-size 128 --batch-size 8 "
        f"--time-budget {BUDGET} --patience 3 --out {cfg.out} --overwrite")
    t0 = time.time()
    result = train(cfg, overwrite=True, echo=lambda m: say(textwrap.indent(m, "  ")), progress=sys.stderr.isatty())
    say(f"  done in {time.time() - t0:.0f} s: {result.steps} steps, {result.tokens_seen:,} tokens")
    say()

    # `--model runs/NAME` means the run's best/ weights (lowest validation loss), not the last step's:
    # with faster steps the budget can run past the point where it starts to overfit the jokes.
    tuned = weights_dir(Path(cfg.out))
    tuned_label = f"{tuned.relative_to(cfg.out)}/, step {read_info(tuned)['step']}"

    # The same prompts, settings and seed on both models (LoRA: one base, adapter on/off).
    dec = DecodingConfig(max_new_tokens=30, temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=1,
                         stop=["\n"])
    cmp = compare(PROMPTS, tuned=cfg.out, decoding=dec, dtype="float32")
    width = 48
    say(f"{'base smollm2-135m':<{width}} | tuned on {result.summary['records']} jokes ({tuned_label})")
    say(f"{'-' * width}-+-{'-' * width}")
    for row in cmp.rows:
        left = textwrap.wrap(row.prompt + row.outputs["base"], width) or [""]
        right = textwrap.wrap(row.prompt + row.outputs["tuned"], width) or [""]
        for i in range(max(len(left), len(right))):
            say(f"{left[i] if i < len(left) else '':<{width}} | {right[i] if i < len(right) else ''}")
        say(f"{'-' * width}-+-{'-' * width}")

    # Perplexity of both models on the same held-out jokes (the run's validation blocks).
    ppl = {}
    for name in ("smollm2-135m", cfg.out):
        lm = load_model(name, device="cpu", dtype="float32")
        data = prepare_data(cfg.data, lm.tokenizer, seed=cfg.seed, max_block_size=lm.context_length)
        ppl[name] = math.exp(evaluate_loss(lm.model, data.val, cfg.batch_size, "cpu", None))
        del lm
    say(f"validation perplexity ({data.summary['val_tokens']:,} held-out tokens): "
        f"base {ppl['smollm2-135m']:.2f}  ->  tuned {ppl[cfg.out]:.2f} ({tuned_label})")
    say(f"run directory: {cfg.out} (README.md, loss.png, metrics.jsonl, samples.jsonl)")


if __name__ == "__main__":
    main()
