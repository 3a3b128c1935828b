"""Decode speed of two checkouts of styletune, A against B, in alternating processes.

    .venv/bin/python bench/ab.py OLD_CHECKOUT NEW_CHECKOUT [--model M] [--quantize Q] [--rows N] [--rounds R]

For a change whose effect on ``generate`` is the question (a kernel, a weight format): each round
runs one process per checkout, in turn (A, B, A, B, ...), so both meet the same load on a shared CPU.
Each process loads the model, makes one warm-up call of 16 tokens, then keeps the fastest of three
greedy calls of 128 new tokens for ``--rows`` prompts at one thread. A checkout is a directory
holding ``styletune/`` (``git worktree add /tmp/old <commit>`` makes one). Prints the CPU, each
process's tokens/s, the medians and B / A (above 1: B faster).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PROMPT, PROMPTS_B8, cpu_flags, cpu_model_name, torch_cpu_capability  # noqa: E402

NEW_TOKENS, WARMUP_TOKENS, CALLS = 128, 16, 3


def child(checkout: str, model: str, quantize: str, rows: int) -> None:
    """One measurement, in this process, of the styletune found in ``checkout``."""
    sys.path.insert(0, checkout)
    import torch

    import styletune
    from styletune.config import DecodingConfig
    from styletune.decoding.engine import generate
    from styletune.models import load_model

    if not Path(styletune.__file__).resolve().is_relative_to(Path(checkout).resolve()):
        raise SystemExit(f"imported styletune from {styletune.__file__}, not from {checkout}")
    torch.set_num_threads(1)
    lm = load_model(model, device="cpu", dtype="auto", quantize=quantize)
    prompts = [PROMPT] if rows == 1 else (PROMPTS_B8 * rows)[:rows]
    generate(lm, prompts, DecodingConfig(greedy=True, max_new_tokens=WARMUP_TOKENS, stop_at_eos=False))
    best = float("inf")
    for _ in range(CALLS):
        start = time.perf_counter()
        generate(lm, prompts, DecodingConfig(greedy=True, max_new_tokens=NEW_TOKENS, stop_at_eos=False))
        best = min(best, time.perf_counter() - start)
    print(rows * NEW_TOKENS / best)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="checkout A (the reference)")
    p.add_argument("b", help="checkout B")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantize", default="auto")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.model, args.quantize, args.rows)
    flags = cpu_flags()
    print(f"CPU: {cpu_model_name()}; avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'}, "
          f"amx_bf16: {'yes' if 'amx_bf16' in flags else 'no'}, "
          f"avx512_vnni: {'yes' if 'avx512_vnni' in flags else 'no'}, "
          f"avx2: {'yes' if 'avx2' in flags else 'no'}; torch's CPU kernels: {torch_cpu_capability()}")
    print(f"model {args.model}, --quantize {args.quantize}, {args.rows} prompt(s), {NEW_TOKENS} greedy tokens, "
          f"1 thread, best of {CALLS} calls per process")
    figures: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name, checkout in (("A", args.a), ("B", args.b)):
            cmd = [sys.executable, __file__, args.a, args.b, "--child", checkout, "--model", args.model,
                   "--quantize", args.quantize, "--rows", str(args.rows)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{name} ({checkout}) failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            figures[name].append(float(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name} ({checkout}): {figures[name][-1]:.1f} tokens/s", flush=True)
    a, b = statistics.median(figures["A"]), statistics.median(figures["B"])
    print(f"median A {a:.1f}, B {b:.1f} tokens/s: B / A = {b / a:.2f}x")


if __name__ == "__main__":
    main()
