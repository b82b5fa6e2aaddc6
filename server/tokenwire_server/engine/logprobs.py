"""Log-probabilities, ranks and top-N alternatives of chosen tokens, computed in one pass."""

from __future__ import annotations

import torch

from .outputs import TokenLogprob


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, ranks: bool = False,
                   top_n: int = 0) -> list[TokenLogprob]:
    """logits (N, V) predicting ids (N,) -> one TokenLogprob per row (under the model itself:
    no temperature or filters)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, ids[:, None])[:, 0]
    rank = ((logp > chosen[:, None]).sum(-1) + 1).tolist() if ranks else [None] * len(ids)
    if top_n:
        top_lp, top_ids = logp.topk(top_n, dim=-1)
        tops = [tuple(zip(i, lp)) for i, lp in zip(top_ids.tolist(), top_lp.tolist())]
    else:
        tops = [()] * len(ids)
    return [TokenLogprob(t, lp, r, top) for t, lp, r, top in zip(ids.tolist(), chosen.tolist(), rank, tops)]
