"""The ``styletune`` command: parse options, call one library function, print.

No tensors here.  A :class:`~styletune.errors.StyletuneError` from the library
becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

import click

from .config import DEFAULT_MODEL, QUANTIZE_CHOICES, DecodingConfig
from .errors import StyletuneError
from .exporting import FORMATS as EXPORT_FORMATS, QUANTS as EXPORT_QUANTS


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StyletuneError as exc:
            from .distributed import rank_prefix

            raise UserError(rank_prefix() + str(exc)) from None
        except click.UsageError as exc:  # a bad flag or value: one line too, pointing at --help
            if isinstance(exc, click.exceptions.NoArgsIsHelpError):
                raise
            where = exc.ctx.command_path if exc.ctx else ctx.command_path
            raise UserError(f"{exc.format_message().rstrip('.')} (see `{where} --help`)") from None
        except (click.exceptions.Exit, click.ClickException):  # --help, --version, our own one-line errors
            raise
        except Exception as exc:
            # One of several training processes whose collective failed because another one stopped:
            # that process reports its own error; this one says only why it stopped too.
            from .distributed import launched, peer_failure, rank_prefix

            if launched() and peer_failure(exc):
                click.echo(f"{rank_prefix()}stopped: another process of this run failed", err=True)
                sys.exit(1)
            raise


@click.group(cls=Group)
@click.version_option(package_name="styletune")
@click.option("--threads", type=click.IntRange(min=1), envvar="STYLETUNE_THREADS",
              help="CPU threads for torch [default: torch's choice, one per core]. On a machine shared "
                   "with other work, fewer threads are often faster.")
def main(threads):
    """Teach a small language model to write in someone's style, and inspect what it learned."""
    import warnings

    if threads:
        import torch

        torch.set_num_threads(threads)

    # Our own warnings (a skipped binary file, ...) as one plain line, not Python's source-line format.
    def show(message, category, filename, lineno, file=None, line=None):
        if category is UserWarning and "styletune" in filename:
            click.echo(f"warning: {message}", err=True)

    warnings.showwarning = show


# ------------------------------------------------------------------------------- shared options


def model_options(f):
    @click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                  help="Registry name, hub id, model directory, styletune run directory or .gguf file.")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
    @click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


# Generation only: the quantised copies serve the decode step; probe reads the exact model.
quantize_option = click.option(
    "--quantize", type=click.Choice(QUANTIZE_CHOICES), default="auto", show_default=True,
    help="Weights of the CPU decode step (Llama and GPT-2 families). auto: the fastest storage within "
         "1% of exact perplexity on this CPU: "
         "int4 for matrices already on a 4-bit grid (a model from a Q4 GGUF, the default one included: "
         "nothing lost) and fp16 for the rest; where styletune's int kernels run, llama.cpp's Q8_0 for "
         "the rest in steps of one or two sequences (perplexity within 0.1%) (fp16 throughout where "
         "torch runs at AVX2 only and styletune's int kernels do not; with --compile, int8 for the "
         "layers off the grid: perplexity within ~0.5%); none: the exact fp32 model; fp16: fp16 weights, "
         "fp32 arithmetic (FBGEMM, x86-64); int4: "
         "group-wise int4 everywhere (lossy for other models); int8: weight-only int8; int8-dynamic: int8 "
         "activations too (perplexity ~+2%).")


DECODING_FLAGS = ("max_new_tokens", "greedy", "temperature", "top_k", "top_p", "min_p", "eps", "num_beams",
                  "length_penalty", "repetition_penalty", "no_repeat_ngram_size", "stop", "num_samples", "seed")


def decoding_options(f):
    """The decoding flags shared by generate, write and compare (None = the command's default)."""
    options = [
        click.option("--max-new-tokens", "-n", type=int, help="Tokens to generate [default: 100]."),
        click.option("--greedy", is_flag=True, default=None, help="Always take the most likely token."),
        click.option("--temperature", "-t", type=float, help="Sampling temperature [default: 1.0]."),
        click.option("--top-k", type=int, help="Sample among the k most likely tokens."),
        click.option("--top-p", type=float, help="Nucleus sampling threshold, in (0, 1]."),
        click.option("--min-p", type=float, help="Drop tokens below min_p x the top probability."),
        click.option("--eps", type=float, help="Epsilon-greedy: take the top token with probability eps, else sample."),
        click.option("--num-beams", type=int, help="Beam search with this many beams."),
        click.option("--length-penalty", type=float, help="Beam search length penalty [default: 1.0]."),
        click.option("--repetition-penalty", type=float, help="> 1 discourages repeating tokens."),
        click.option("--no-repeat-ngram-size", type=int, help="Never repeat an n-gram of this size."),
        click.option("--stop", multiple=True, help="Stop at this string (repeatable)."),
        click.option("--num-samples", type=int, help="Samples per prompt [default: 1]."),
        click.option("--seed", type=int, help="Random seed; same seed, same text."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def build_decoding(kwargs: dict, **defaults) -> DecodingConfig:
    """A DecodingConfig from the flags given, the command's defaults, then the dataclass defaults."""
    values = dict(defaults)
    for name in DECODING_FLAGS:
        v = kwargs.pop(name, None)
        if v is not None and v != ():
            values[name] = list(v) if name == "stop" else v
    return DecodingConfig(**values).validate()


def _load(model, device, dtype, quantize="none", compile_step=False):
    from .models import load_model

    return load_model(model, device=device, dtype=dtype, quantize=quantize, compile=compile_step)


compile_option = click.option(
    "--compile", "compile_step", is_flag=True,
    help="Compile the decode step ahead of time (Llama and GPT-2 families, CPU): ~40 s once per model "
         "shape, format and length bucket, kept in the styletune cache (later runs load it in ~0.2 s); "
         "then the fastest tokens.")


def echo_stream(row: int, text: str) -> None:
    """Streaming callback: print text as it arrives."""
    click.echo(text, nl=False)
    sys.stdout.flush()


def write_atomic(path: str, text: str) -> None:
    """Write a whole file or nothing: an interrupted write never clobbers an old file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)


# ------------------------------------------------------------------------------------- generate


@main.command()
@click.argument("prompts", nargs=-1)
@model_options
@quantize_option
@decoding_options
@compile_option
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), help="One prompt per line.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample per line.")
@click.option("--trace", is_flag=True, help="Show each step: candidates, chosen token, rank, entropy.")
@click.option("--trace-top", type=int, default=5, show_default=True, help="Candidates per step in the trace.")
@click.option("--trace-out", type=click.Path(dir_okay=False), help="Also write the trace to FILE (.csv or .json).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write all samples to FILE.")
@click.option("--stream/--no-stream", default=None, help="Print tokens as they arrive [default: on a terminal].")
def generate(prompts, model, device, dtype, quantize, compile_step, prompts_file, as_json, trace, trace_top, trace_out, output, stream,
             **kwargs):
    """Continue PROMPTS with the model (reads prompts from stdin when none are given)."""
    from .decoding.engine import generate as run_generate

    prompts = list(prompts)
    if prompts_file:
        try:
            text = Path(prompts_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{prompts_file} is not valid utf-8 at byte {exc.start}: one prompt per line of text") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts and not sys.stdin.isatty():
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompt given: pass PROMPT arguments, --prompts-file or text on stdin")
    if trace_top < 1:
        raise UserError(f"--trace-top must be >= 1, got {trace_top}")
    if trace_out and not trace_out.endswith((".csv", ".json")):
        raise UserError("--trace-out must end in .csv or .json")
    cfg = build_decoding(kwargs)
    if cfg.seed is None:
        from .decoding.engine import new_seed

        cfg.seed = new_seed()
    if stream is None:
        stream = sys.stdout.isatty() and not as_json
    lm = _load(model, device, dtype, quantize, compile_step)
    top = trace_top if (trace or trace_out) else 0

    samples = []
    if stream and not as_json:
        # Stream one sample at a time; per-sample seeds make this the same text as a batch.
        for p, prompt in enumerate(prompts):
            for i in range(cfg.num_samples if cfg.mode != "beam" else 1):
                if len(prompts) * cfg.num_samples > 1:
                    click.secho(f"--- prompt {p + 1}, sample {i + 1}", fg="cyan", err=False)
                click.secho(prompt, bold=True, nl=False)
                one = dataclasses.replace(cfg, seed=cfg.seed + i,
                                          num_samples=1 if cfg.mode != "beam" else cfg.num_samples)
                got = run_generate(lm, [prompt], one, trace_top=top, on_text=echo_stream)
                for s in got:  # sample i of this prompt (its seed, cfg.seed + i, is already right)
                    s.prompt_index, s.sample_index = p, s.sample_index + i
                click.echo()
                samples += got
                if trace:
                    for s in got:
                        print_trace(s)
    else:
        samples = run_generate(lm, prompts, cfg, trace_top=top)
        for s in samples:
            if as_json:
                click.echo(json.dumps(s.to_dict(trace=trace), ensure_ascii=False))
            else:
                if len(samples) > 1:
                    click.echo(f"--- prompt {s.prompt_index + 1}, sample {s.sample_index + 1}")
                click.echo(s.prompt + s.text)
                if trace:
                    print_trace(s)
    if output:
        if as_json:
            write_atomic(output, "".join(json.dumps(s.to_dict(trace=trace), ensure_ascii=False) + "\n" for s in samples))
        else:
            write_atomic(output, "\n\n".join(s.prompt + s.text for s in samples) + "\n")
    if trace_out:
        write_trace(trace_out, samples)


def print_trace(sample) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"trace: prompt {sample.prompt_index + 1}, sample {sample.sample_index + 1}",
                  show_lines=False)
    for col in ("step", "text so far", "chosen", "prob", "rank", "entropy", "top candidates"):
        table.add_column(col, justify="right" if col in ("step", "prob", "rank", "entropy") else "left")
    for n, st in enumerate(sample.steps or [], 1):
        so_far = (sample.prompt + st.text)[-30:]
        cands = "  ".join(f"{c['token']!r} {c['prob']:.3f}" for c in st.top)
        table.add_row(str(n), repr(so_far), repr(st.chosen_token), f"{st.chosen_prob:.3f}", str(st.rank),
                      f"{st.entropy:.2f}", cands)
    Console(width=max(140, Console().width)).print(table)


def write_trace(path: str, samples) -> None:
    rows = []
    for s in samples:
        for n, st in enumerate(s.steps or [], 1):
            rows.append({"prompt_index": s.prompt_index, "sample": s.sample_index, "step": n,
                         "text_so_far": s.prompt + st.text, "chosen_id": st.chosen_id, "chosen_token": st.chosen_token,
                         "chosen_prob": st.chosen_prob, "rank": st.rank, "entropy": st.entropy, "top": st.top})
    if path.endswith(".json"):
        write_atomic(path, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
        return
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["prompt_index", "sample", "step", "text_so_far", "chosen_id", "chosen_token", "chosen_prob",
                     "rank", "entropy", "top"])
    for r in rows:
        writer.writerow([r["prompt_index"], r["sample"], r["step"], r["text_so_far"], r["chosen_id"], r["chosen_token"],
                         f"{r['chosen_prob']:.6f}", r["rank"], f"{r['entropy']:.6f}",
                         " | ".join(f"{c['token']}:{c['prob']:.6f}" for c in r["top"])])
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------- probe


@main.command()
@click.argument("text")
@model_options
@click.option("--top", type=int, default=10, show_default=True, help="How many candidates to show.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of {id, token, prob}, most likely first.")
def probe(text, model, device, dtype, top, as_json):
    """Show the next-token distribution after TEXT."""
    from .probing import probe as run_probe

    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    lm = _load(model, device, dtype)
    cands = run_probe(lm, text, top=top)
    if as_json:
        click.echo(json.dumps([{"id": c.id, "token": c.token, "prob": c.prob} for c in cands], ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"next token after {text!r}")
    table.add_column("rank", justify="right")
    table.add_column("token")
    table.add_column("id", justify="right")
    table.add_column("prob", justify="right")
    table.add_column("")
    for c in cands:
        table.add_row(str(c.rank), repr(c.token), str(c.id), f"{c.prob:.4f}", "#" * round(c.prob * 40))
    Console().print(table)


# ---------------------------------------------------------------------------------------- write


@main.command()
@model_options
@quantize_option
@decoding_options
@compile_option
def write(model, device, dtype, quantize, compile_step, **kwargs):
    """An interactive writer: type a topic or an opening line, get a long passage.

    An empty line or EOF (Ctrl-D) ends the session; Ctrl-C stops the current passage only.
    """
    from .decoding.engine import generate as run_generate, new_seed

    cfg = build_decoding(kwargs, max_new_tokens=300, temperature=0.8, top_p=0.95, repetition_penalty=1.1)
    lm = _load(model, device, dtype, quantize, compile_step)
    interactive = sys.stdin.isatty()
    click.echo(f"styletune write ({lm.name}): type a topic or an opening line; an empty line ends.", err=True)
    turn = 0
    while True:
        try:
            if interactive:
                topic = click.prompt("", prompt_suffix="> ", default="", show_default=False)
            else:
                click.echo("> ", nl=False, err=True)
                topic = sys.stdin.readline()
                if not topic:
                    break
                topic = topic.rstrip("\n")
        except (EOFError, click.exceptions.Abort):
            break
        if not topic.strip():
            break
        one = dataclasses.replace(cfg, num_samples=1, seed=cfg.seed + turn if cfg.seed is not None else new_seed())
        turn += 1
        click.secho(topic, bold=True, nl=False)
        try:
            run_generate(lm, [topic], one, on_text=echo_stream)
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False)
        click.echo("\n")


# ---------------------------------------------------------------------------------------- train

# CLI option -> TrainConfig attribute, and -> DataConfig attribute.  Options left
# unset (None) keep the value from --config / the resumed run / the defaults.
TRAIN_OPTIONS = ("model", "out", "method", "batch_size", "grad_accum", "lr", "epochs", "max_steps", "time_budget",
                 "eval_every", "save_every", "keep_checkpoints", "seed", "device", "dtype", "lora_r", "lora_alpha",
                 "lora_dropout", "train_layers", "compile", "patience", "weight_decay", "warmup_fraction", "eval_max_new_tokens",
                 "fsdp")
DATA_OPTIONS = ("column", "field", "split", "val_fraction", "val", "block_size", "glob", "encoding", "ascii_only",
                "strip_gutenberg", "dedupe", "normalize")


@main.command()
@click.argument("data", nargs=-1)
@click.option("--config", "config_value", help="A run's config.yaml to re-run (values given here override it); "
              "any other value is the hub dataset's configuration name.")
@click.option("--model", "-m", help=f"Base model [default: {DEFAULT_MODEL}].")
@click.option("--out", "-o", help="Run directory to write, e.g. runs/poe.")
@click.option("--method", type=click.Choice(["lora", "full"]), help="LoRA adapters or full fine-tuning [default: lora].")
@click.option("--column", help="CSV/TSV/Parquet/datasets column with the text [default: text].")
@click.option("--field", help="JSON/JSONL field with the text [default: text].")
@click.option("--split", help="Dataset split, e.g. 'train[:1%]'.")
@click.option("--dataset-config", help="Hub dataset configuration name (same as a non-YAML --config).")
@click.option("--filter", "filters", multiple=True, help="Keep rows where COL=VALUE (repeatable).")
@click.option("--glob", help="Files to read from a folder [default: **/*].")
@click.option("--encoding", help="Encoding of text and CSV files [default: utf-8].")
@click.option("--ascii-only/--no-ascii-only", default=None, help="Drop non-ASCII characters.")
@click.option("--strip-gutenberg/--no-strip-gutenberg", default=None, help="Remove Project Gutenberg headers/footers.")
@click.option("--dedupe/--no-dedupe", default=None, help="Drop exact duplicate records [default: on].")
@click.option("--normalize/--no-normalize", default=None, help="Unicode NFC normalisation [default: on].")
@click.option("--val-fraction", type=float, help="Share of documents held out for validation [default: 0.1].")
@click.option("--val", help="An explicit validation file instead of a split.")
@click.option("--block-size", type=int, help="Tokens per training block [default: 256].")
@click.option("--batch-size", type=int, help="Blocks per micro-batch [default: 8].")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step [default: 1].")
@click.option("--lr", type=float, help="Peak learning rate [default: 2e-3 LoRA, 5e-5 full].")
@click.option("--weight-decay", type=float, help="AdamW weight decay [default: 0.01].")
@click.option("--warmup-fraction", type=float, help="Share of steps for linear warm-up [default: 0.05].")
@click.option("--epochs", type=float, help="Passes over the data [default: 1 if no other length is given].")
@click.option("--max-steps", type=int, help="Optimizer steps (caps the others).")
@click.option("--time-budget", help="Wall-clock budget, e.g. 10m: steps are planned from measured speed; the run stops when it is spent.")
@click.option("--eval-every", type=int, help="Evaluate every N steps [default: about 10 evaluations per run].")
@click.option("--save-every", type=int, help="Checkpoint every N steps [default: 100].")
@click.option("--keep-checkpoints", type=int, help="Step checkpoints to keep [default: 2].")
@click.option("--patience", type=int, help="Early stop after N evaluations without improvement.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt completed at each evaluation (repeatable).")
@click.option("--eval-max-new-tokens", type=int, help="Length of evaluation samples [default: 40].")
@click.option("--lora-r", type=int, help="LoRA rank [default: 16].")
@click.option("--lora-alpha", type=int, help="LoRA alpha [default: 32].")
@click.option("--lora-dropout", type=float, help="LoRA dropout [default: 0].")
@click.option("--compile/--no-compile", default=None, help="torch.compile the transformer layers for "
              "training (a one-off compilation of ~20 s; evaluation stays eager) [default: on for LoRA runs "
              "without dropout of 100,000 tokens or more in bf16 on a CPU, and under --time-budget from 4 "
              "minutes, where it was measured to pay].")
@click.option("--train-layers", type=int, help="Train only the top N transformer layers; faster, since "
              "backward stops below them [default: all].")
@click.option("--seed", type=int, help="Seed for the split, data order and dropout [default: 0].")
@click.option("--device", help="auto, cpu, cuda or mps [default: auto].")
@click.option("--dtype", help="Autocast dtype: auto, float32 or bfloat16 [default: auto].")
@click.option("--devices", type=int, help="Train in N processes, started through torchrun: N GPUs, or N CPU "
              "processes; the global batch is --batch-size x --grad-accum x N [default: 1].")
@click.option("--fsdp/--no-fsdp", default=None, help="With several processes, shard weights, gradients and "
              "optimizer state with FSDP2 instead of replicating them (DDP) [default: off].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest complete checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
def train(data, config_value, dataset_config, filters, prompts, resume, overwrite, devices, **options):
    """Fine-tune a model on DATA (files, folders, datasets directories or hub dataset names).

    Writes config.yaml, metrics.jsonl, loss.png, samples.jsonl, README.md, checkpoints
    and the final weights to the run directory; `--model RUN` then uses it.
    """
    from .config import TrainConfig, load_yaml, train_config_from_dict
    from .training import train as run_train

    cfg = TrainConfig()
    if config_value and config_value.endswith((".yaml", ".yml")):
        cfg = train_config_from_dict(load_yaml(config_value))
    elif config_value:
        dataset_config = dataset_config or config_value
    elif resume and options.get("out") and (Path(options["out"]) / "config.yaml").is_file():
        cfg = train_config_from_dict(load_yaml(Path(options["out"]) / "config.yaml"))
    for name in TRAIN_OPTIONS:
        if options.get(name) is not None:
            setattr(cfg, name, options[name])
    for name in DATA_OPTIONS:
        if options.get(name) is not None:
            setattr(cfg.data, name, options[name])
    if data:
        cfg.data.sources = list(data)
    if dataset_config:
        cfg.data.config = dataset_config
    if filters:
        cfg.data.filter = list(filters)
    if prompts:
        cfg.eval_prompts = list(prompts)
    if not cfg.data.sources:
        raise UserError("no training data: pass files, folders or a dataset name")
    if devices is not None and devices != 1:
        sys.exit(_launch(cfg, devices, resume, overwrite))
    result = run_train(cfg, resume=resume, overwrite=overwrite, echo=lambda m: click.echo(m, err=True),
                       progress=sys.stderr.isatty())
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 speaks for the run
        sys.exit(130 if result.interrupted else 0)
    if result.interrupted:
        click.echo(f"interrupted at step {result.steps}/{result.total_steps}; "
                   f"continue with: styletune train --resume --out {cfg.out}", err=True)
        sys.exit(130)
    val = f", validation loss {result.val_loss:.4f} (perplexity {result.val_ppl:.2f})" if result.val_loss else ""
    click.echo(f"trained {result.steps} steps in {result.elapsed_s:.0f} s{val}; "
               f"use it with: styletune generate --model {cfg.out}")


def _launch(cfg, devices: int, resume: bool, overwrite: bool) -> int:
    """``--devices N``: the resolved options to N processes through torchrun; their exit status."""
    from .distributed import check_devices, launch, relaunch_config
    from .models import pick_device
    from .training import check_run_dir

    # What can be refused before any process starts is refused once, here.
    check_devices(devices, pick_device(cfg.device))
    cfg.validate()
    check_run_dir(Path(cfg.out), resume, overwrite)
    path = relaunch_config(cfg)
    try:
        return launch(devices, ["--config", path] + ["--resume"] * resume + ["--overwrite"] * overwrite)
    finally:
        os.unlink(path)


@main.command()
@click.argument("run", type=click.Path())
@click.argument("out", type=click.Path())
def merge(run, out):
    """Write RUN (base + LoRA adapter, or full weights) as a plain transformers directory OUT."""
    from .exporting import merge_run

    path = merge_run(run, out)
    click.echo(f"wrote {path}: AutoModelForCausalLM.from_pretrained({str(path)!r}) loads it")


@main.command("export")
@click.argument("run", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="gguf", show_default=True,
              help="gguf: one file for llama.cpp / Ollama / LM Studio; hf: a transformers directory.")
@click.option("--quant", type=click.Choice(EXPORT_QUANTS), default="q8_0", show_default=True,
              help="GGUF tensor type (1-D tensors stay F32): q8_0 is a quarter of F32's size, at a perplexity "
                   "within 1% of F32's.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is not empty.")
def export_command(run, out, fmt, quant, overwrite):
    """Write RUN (its best/ weights, or the weights directory given) to OUT for other tools.

    RUN may be runs/NAME, runs/NAME/final or runs/NAME/checkpoints/step-N.
    """
    from .exporting import export

    result = export(run, out, format=fmt, quant=quant, overwrite=overwrite)
    click.echo(f"wrote {result.out} from the run's {result.weights}/ weights: {', '.join(result.files)}")
    if fmt == "gguf":
        gguf_file = next(f for f in result.files if f.endswith(".gguf"))
        click.echo(f"run it: llama-cli -m {Path(result.out) / gguf_file} -p \"Once upon a time\"   "
                   f"or: cd {result.out} && ollama create {gguf_file[:-5]} -f Modelfile")
    else:
        click.echo(f"AutoModelForCausalLM.from_pretrained({str(result.out)!r}) loads it")


@main.command()
@model_options
@quantize_option
@click.option("--compare-with", help="A second model served beside it (the web page's side-by-side column), "
              "e.g. the base model.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; only this machine "
              "by default.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="STYLETUNE_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/ "
              "(or $STYLETUNE_API_KEY).")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences decoded together per model (KV slots); more wait in a bounded queue.")
@click.option("--max-tokens-cap", type=click.IntRange(min=1), default=1024, show_default=True,
              help="The most tokens one request may ask for.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300, show_default=True,
              help="Seconds a request may take, waiting included.")
@click.option("--max-model-len", type=click.IntRange(min=16), default=2048, show_default=True,
              help="Positions per sequence, prompt and completion together (capped by the model's context); "
                   "the KV cache of every slot is allocated for this many.")
def serve(model, device, dtype, quantize, compare_with, host, port, api_key, max_concurrency, max_tokens_cap,
          timeout, max_model_len):
    """Serve MODEL over an OpenAI-compatible API (/v1/completions, /v1/chat/completions) and a web
    page (/) for writing, comparing and probing."""
    from .server import Limits, serve as run_server

    run_server(model, compare_with=compare_with, host=host, port=port, api_key=api_key,
               max_concurrency=max_concurrency,
               limits=Limits(max_tokens_cap=max_tokens_cap, timeout=timeout, max_model_len=max_model_len),
               device=device, dtype=dtype, quantize=quantize, echo=lambda m: click.echo(m, err=True))


# -------------------------------------------------------------------------------------- compare


@main.command()
@click.option("--base", help="Base model [default: the tuned run's base model].")
@click.option("--tuned", type=click.Path(), help="A run directory (column 'tuned').")
@click.option("--model", "-m", "models", multiple=True, help="Another column: any --model value (repeatable).")
@click.option("--checkpoints", type=click.Choice(["all"]), help="Add a column per saved checkpoint of --tuned.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help="One prompt per line.")
@click.option("--prompt", "-p", "prompt_list", multiple=True, help="A prompt (repeatable).")
@decoding_options
@click.option("--format", "fmt", type=click.Choice(["text", "md", "json"]), default="text", show_default=True)
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write a self-contained HTML page.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
def compare(base, tuned, models, checkpoints, prompts_file, prompt_list, fmt, html_path, device, dtype, **kwargs):
    """Continue the same prompts with several models side by side (same settings, same seed)."""
    from .comparison import COMPARE_DEFAULTS, compare as run_compare, read_prompts
    from .report import comparison_html, comparison_markdown

    prompts = list(prompt_list) + (read_prompts(prompts_file) if prompts_file else [])
    if not prompts:
        raise UserError("no prompts: pass --prompt TEXT or --prompts FILE")
    if not tuned and not models:
        raise UserError("nothing to compare: pass --tuned RUN and/or --model M")
    dec = build_decoding(kwargs, **COMPARE_DEFAULTS)
    cmp = run_compare(prompts, base=base, tuned=tuned, models=list(models), checkpoints=checkpoints == "all",
                      decoding=dec, device=device, dtype=dtype)
    if html_path:
        write_atomic(html_path, comparison_html(cmp))
    if fmt == "json":
        click.echo(json.dumps(cmp.to_json(), ensure_ascii=False, indent=1))
    elif fmt == "md":
        click.echo(comparison_markdown(cmp), nl=False)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(show_lines=True, expand=True)
        table.add_column("prompt", style="bold", ratio=1)
        for c in cmp.columns:
            table.add_column(c.name, ratio=2, overflow="fold")
        for row in cmp.rows:
            table.add_row(row.prompt, *(row.outputs[c.name] for c in cmp.columns))
        console = Console(width=max(100, Console().width))
        console.print(table)
        console.print("; ".join(f"{c.name} = {c.model}" for c in cmp.columns), style="dim")


# ------------------------------------------------------------------------------------- evaluate


@main.command()
@click.argument("run", type=click.Path())
@click.option("--data", help="Evaluate perplexity on this file (any format train reads) [default: the run's "
              "validation split].")
@click.option("--samples", type=int, default=8, show_default=True, help="Samples per model for memorisation and style.")
@click.option("--ngram", type=int, default=8, show_default=True, help="n of the n-grams checked against the training data.")
@click.option("--max-new-tokens", "-n", type=int, default=80, show_default=True, help="Length of each sample.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--report", "report_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for report.json, report.md and report.html.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
def evaluate(run, data, samples, ngram, max_new_tokens, seed, report_dir, device, dtype):
    """Perplexity, memorisation and style of a run against its base model, in one report."""
    from .evaluation import evaluate as run_evaluate, summary_lines, write_report

    for name, value in (("--samples", samples), ("--ngram", ngram), ("--max-new-tokens", max_new_tokens)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    report = run_evaluate(run, data=data, samples=samples, ngram=ngram, max_new_tokens=max_new_tokens, seed=seed,
                          device=device, dtype=dtype, echo=lambda m: click.echo(m, err=True))
    html = write_report(report, report_dir)
    for line in summary_lines(report):
        click.echo(line)
    click.echo(f"report: {html}")


# --------------------------------------------------------------------------------------- models


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def models(as_json):
    """List the registry's models, what is cached locally and where."""
    from .models import cache_root, list_models

    rows = list_models()
    if as_json:
        click.echo(json.dumps({"cache": str(cache_root()), "models": rows}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models (cache: {cache_root()})")
    for col in ("name", "source", "cached", "path / about"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["source"], "yes" if r["cached"] else "no", r["path"] if r["cached"] else r["about"])
    Console(width=max(120, Console().width)).print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
