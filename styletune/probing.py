"""What the model is thinking: the next-token distribution after a text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoding.engine import check_context, encode_prompts
from .errors import StyletuneError


@dataclass
class Candidate:
    rank: int
    id: int
    token: str
    prob: float


@torch.inference_mode()
def probe(lm, text: str, top: int = 10) -> list[Candidate]:
    """The ``top`` most likely next tokens after ``text``, most likely first."""
    if top < 1:
        raise StyletuneError(f"--top must be >= 1, got {top}")
    ids = encode_prompts(lm.tokenizer, [text])[0]
    check_context(lm, [len(ids)], 1)
    logits = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0, -1].float()  # (V,)
    probs = logits.softmax(dim=-1)
    p, idx = torch.topk(probs, min(top, probs.numel()))
    return [Candidate(rank=r + 1, id=int(i), token=lm.tokenizer.decode([int(i)]), prob=float(q))
            for r, (q, i) in enumerate(zip(p, idx))]
