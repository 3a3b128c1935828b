"""Decoding strategies that drive a causal LM step by step with its KV cache.

The building blocks are generic so that greedy and sampling loops can reuse them:

* :func:`position_ids_from_mask` - position ids for left-padded batches, as transformers builds them;
* :func:`forward_step` - one forward pass of the *new* tokens only, returning the next-token
  logits (float32) and the updated cache;
* :func:`reorder_cache` - select / reorder the batch rows of a cache (beam search, dropping rows).

:func:`beam_search` reproduces ``model.generate(num_beams=N, do_sample=False, ...)`` of
transformers 5.x token for token (see its docstring for the exact semantics).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import StyletuneError

# Score added to candidates that must not be selected (transformers uses the same constant,
# and we keep it rather than -inf so the arithmetic, hence tie-breaking, is identical).
_NEG = -1.0e9

_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


def _forward_parameters(model) -> frozenset[str]:
    """The keyword arguments of the transformers model's forward (under a peft wrapper, which passes
    its keyword arguments through, the wrapped model's)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = type(model)
    if cls not in _FORWARD_PARAMETERS:
        try:
            _FORWARD_PARAMETERS[cls] = frozenset(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
            _FORWARD_PARAMETERS[cls] = frozenset()
    return _FORWARD_PARAMETERS[cls]


def _supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in _forward_parameters(model)


def _cache_argument(model) -> str:
    """The name of the KV-cache argument of ``model.forward``: ``cache`` from transformers 5.24 on
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a (left-)padded batch: ``cumsum(mask) - 1``, padding positions set to 0.

    ``attention_mask`` is ``(batch, seq)`` with 1 for real tokens and 0 for padding; the result has
    the same shape.  This is what transformers 5.x ``generate`` computes (pads get 0; they are
    masked out anyway), and generated tokens continue from the last real position.
    """
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


def forward_step(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_key_values=None):
    """Run the model on the tokens not yet in ``past_key_values`` and return the next-token logits.

    Args:
        model: a causal LM (transformers ``*ForCausalLM``) that accepts ``position_ids``.
        input_ids: ``(batch, new)`` - the whole prompt for the first call (``past_key_values=None``),
            then only the tokens appended since the previous call (usually one per row).
        attention_mask: ``(batch, past + new)`` mask covering the cached tokens *and* the new ones
            (0 for left padding), or ``None`` for no padding at all.
        past_key_values: the cache returned by the previous call, or ``None`` to start one.

    Returns:
        ``(logits, cache)``: float32 logits of the last position, shape ``(batch, vocab)`` (a copy,
        so the full output can be freed), and the cache to pass to the next call.

    As in transformers' ``generate``: position ids come from the mask (:func:`position_ids_from_mask`),
    an all-ones mask is not passed to the model (same attention path, no padding possible), and
    ``logits_to_keep=1`` is used when the model supports it.
    """
    new = input_ids.shape[1]
    if attention_mask is not None:
        position_ids = position_ids_from_mask(attention_mask)[:, -new:]
        if bool(attention_mask.all()):
            attention_mask = None
    else:
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = torch.arange(past, past + new, device=input_ids.device)
        position_ids = position_ids.unsqueeze(0).expand(input_ids.shape[0], -1)
    kwargs = {}
    if _supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    cache_name = _cache_argument(model)
    kwargs[cache_name] = past_key_values
    out = model(
        input_ids=input_ids.contiguous(),
        attention_mask=attention_mask,
        position_ids=position_ids.contiguous(),
        use_cache=True,
        return_dict=True,
        **kwargs,
    )
    logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
    return logits, getattr(out, cache_name)


def reorder_cache(cache, index: torch.Tensor):
    """Keep / reorder the batch rows of a KV cache: row ``i`` of the result is row ``index[i]``.

    Works in place on transformers ``Cache`` objects (``DynamicCache.reorder_cache``) and returns the
    cache; legacy tuple-of-tuples caches are rebuilt with ``index_select``.  ``index`` is a 1-D
    LongTensor of flat batch indices (it may repeat rows, as beam search does).
    """
    if cache is None:
        return None
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    if isinstance(cache, (tuple, list)):
        return tuple(tuple(t.index_select(0, index.to(t.device)) for t in layer) for layer in cache)
    raise StyletuneError(f"cannot reorder a cache of type {type(cache).__name__} for beam search")


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t``: (batch, beams, ...); ``idx``: (batch, k) -> (batch, k, ...) (transformers' _gather_beams)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


@torch.no_grad()
def beam_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, num_beams: int, max_new_tokens: int,
                eos_token_id: int | None, processors: Callable | None = None, length_penalty: float = 1.0,
                num_return_sequences: int = 1, max_length: int | None = None) -> list[list[list[int]]]:
    """Deterministic beam search, identical to transformers 5.x ``generate(num_beams=N, do_sample=False)``.

    input_ids/attention_mask: (batch, seq), LEFT-padded prompts. Returns, per prompt,
    num_return_sequences continuations (generated token ids only, best first, without padding;
    an EOS that ended a hypothesis is included as the last id, as transformers does).

    Semantics (all as in transformers' ``_beam_search``):

    * Scores are sums of log-softmax probabilities (float32).  ``processors`` (a callable
      ``(input_ids, scores) -> scores``, e.g. a :class:`~styletune.decoding.processors.ProcessorList`)
      is applied to the *log-probabilities* of every beam, with ``input_ids`` = prompt (padding
      included) + tokens generated so far, before the running beam score is added.
    * At each step the best ``2 * num_beams`` continuations over all beams are kept; those ending
      in ``eos_token_id`` or reaching the length limit are *finished*, the best ``num_beams``
      others keep running.  A finished candidate is only stored if it ranks among the first
      ``num_beams`` of those ``2 * num_beams``; its score is ``sum_logprobs / gen_len ** length_penalty``
      where ``gen_len`` counts generated tokens, the EOS included.  The best ``num_beams`` finished
      hypotheses are kept.
    * ``early_stopping=False`` (the transformers default): a prompt stops once all its
      ``num_beams`` hypotheses are finished and the best running score divided by the *current*
      generated length ``** length_penalty`` cannot beat the worst of them; generation ends when
      every prompt has stopped, or at the length limit, where all running beams are finished.
    * The length limit is ``seq + max_new_tokens`` tokens in total (``seq`` = padded prompt
      width), lowered to ``max_length`` when given (like transformers' ``max_length``).  When no
      token can be generated, every continuation is empty.
    * Each step is one forward pass of the newest token of every beam with the KV cache, which is
      reordered by the chosen beams' origins.  The prompt is expanded to ``batch * num_beams`` rows
      before the first pass, as transformers does.
    """
    if not isinstance(num_beams, int) or num_beams < 1:
        raise StyletuneError(f"num_beams must be a positive integer, got {num_beams!r}")
    if not isinstance(num_return_sequences, int) or not 1 <= num_return_sequences <= num_beams:
        raise StyletuneError(
            f"num_return_sequences must be between 1 and num_beams ({num_beams}), got {num_return_sequences!r}")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise StyletuneError("input_ids and attention_mask must both be (batch, seq) tensors of the same shape")

    batch, prompt_len = input_ids.shape
    limit = prompt_len + max_new_tokens
    if max_length is not None:
        limit = min(limit, max_length)
    if batch == 0 or limit <= prompt_len:
        return [[[] for _ in range(num_return_sequences)] for _ in range(batch)]

    device = _model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    n = num_beams
    k = 2 * n  # candidates kept per step: enough that n of them never end with EOS
    top_n_mask = torch.arange(k, device=device) < n
    batch_offset = torch.arange(batch, device=device).unsqueeze(1) * n

    # Running beams and finished hypotheses, (batch, n, limit) with room for every token.
    running = torch.zeros((batch, n, limit), dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids.unsqueeze(1)
    finished = running.clone()
    # Only the first beam is live at first, so the n beams do not all pick the same tokens.
    running_scores = torch.zeros((batch, n), dtype=torch.float32, device=device)
    running_scores[:, 1:] = _NEG
    finished_scores = torch.full((batch, n), _NEG, dtype=torch.float32, device=device)
    finished_len = torch.zeros((batch, n), dtype=torch.long, device=device)
    is_finished = torch.zeros((batch, n), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)

    mask = attention_mask.repeat_interleave(n, dim=0)
    cache = None
    cur_len = prompt_len
    while True:
        if cache is None:
            logits, cache = forward_step(model, input_ids.repeat_interleave(n, dim=0), mask, None)
        else:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            logits, cache = forward_step(model, running[:, :, cur_len - 1].reshape(-1, 1), mask, cache)
        vocab = logits.shape[-1]

        log_probs = F.log_softmax(logits, dim=-1)
        if processors is not None:
            log_probs = processors(running[:, :, :cur_len].reshape(batch * n, cur_len), log_probs)
        totals = (log_probs.view(batch, n, vocab) + running_scores[:, :, None]).view(batch, n * vocab)

        # Best k continuations over all beams of each prompt.
        cand_scores, cand_idx = torch.topk(totals, k)
        cand_beam = cand_idx // vocab
        cand_tok = cand_idx % vocab
        cand_seqs = _gather(running, cand_beam)
        cand_seqs[:, :, cur_len] = cand_tok
        done = torch.full_like(cand_tok, cur_len + 1 >= limit, dtype=torch.bool)
        if eos_token_id is not None:
            done |= cand_tok == eos_token_id

        # The n best unfinished candidates keep running.
        run_scores = cand_scores + done.to(torch.float32) * _NEG
        keep = torch.topk(run_scores, n).indices
        running = _gather(cand_seqs, keep)
        running_scores = _gather(run_scores, keep)
        origin = _gather(cand_beam, keep)

        # Finished candidates among the first n enter the finished pool, length-normalised.
        gen_len = cur_len + 1 - prompt_len
        just_finished = done & top_n_mask[None, :]
        fin_scores = cand_scores / (gen_len ** length_penalty)
        fin_scores = fin_scores + (~improvable).to(torch.float32) * _NEG
        fin_scores = fin_scores + (~just_finished) * _NEG
        merged_scores = torch.cat((finished_scores, fin_scores), dim=1)
        best = torch.topk(merged_scores, n).indices
        finished = _gather(torch.cat((finished, cand_seqs), dim=1), best)
        finished_scores = _gather(merged_scores, best)
        finished_len = _gather(torch.cat((finished_len, torch.full_like(cand_tok, gen_len)), dim=1), best)
        is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), best)

        cache = reorder_cache(cache, (origin + batch_offset).reshape(-1))
        cur_len += 1

        # Can a running beam still beat the worst finished hypothesis (early_stopping=False heuristic)?
        best_running = running_scores[:, :1] / (gen_len ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, _NEG)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        if not bool(improvable.any()) or bool(done.all()):
            break

    seqs = finished[:, :num_return_sequences].tolist()
    lens = finished_len[:, :num_return_sequences].tolist()
    return [[seq[prompt_len:prompt_len + ln] for seq, ln in zip(row_seqs, row_lens)]
            for row_seqs, row_lens in zip(seqs, lens)]
