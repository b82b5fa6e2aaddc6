"""Sampler: picks the next token of every row of a batch in one pass, each row with its own
parameters: logit bias, min_new_tokens, repetition/presence/frequency penalties,
temperature, top-k, top-p, min-p and a seeded random generator."""

from __future__ import annotations

import torch

from .sampling_params import SamplingParams


class Sampler:
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 histories: list[tuple[list[int], list[int]]] | None = None,
                 banned: list[list[int]] | None = None) -> torch.Tensor:
        """logits (B, V) float32 -> token ids (B,). histories: (prompt ids, output ids) per row,
        for penalties; banned: token ids a row may not produce yet (min_new_tokens)."""
        logits = self._adjust(logits, params, histories, banned)
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy  # fast path: no sorting, no randomness
        device = logits.device
        temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        probs = self._filter(probs, params)
        # Exponential race: argmax(p / q) with q ~ Exp(1) draws from p, and lets every row
        # use its own generator without a multinomial call per row.
        q = torch.empty_like(probs)
        for row, gen in enumerate(generators):
            q[row].exponential_(generator=gen)
        sampled = (probs / q).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=device)
        return torch.where(is_greedy, greedy, sampled)

    @staticmethod
    def _adjust(logits, params, histories, banned) -> torch.Tensor:
        """Logit bias, bans and penalties (they apply to greedy rows too)."""
        B, V = logits.shape
        device = logits.device
        if any(p.logit_bias for p in params) or any(banned or ()):
            logits = logits.clone()
            for row, p in enumerate(params):
                if p.logit_bias:
                    ids = torch.tensor(list(p.logit_bias), device=device)
                    logits[row, ids] += torch.tensor(list(p.logit_bias.values()), device=device)
                if banned and banned[row]:
                    logits[row, torch.tensor(banned[row], device=device)] = float("-inf")
        rep = [p.repetition_penalty != 1.0 for p in params]
        pres_freq = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
        if not (any(rep) or any(pres_freq)):
            return logits
        counts = torch.zeros(B, V, device=device)  # occurrences in the output so far
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)  # in the prompt or the output
        for row, (prompt, output) in enumerate(histories):
            if output:
                counts[row].scatter_add_(0, torch.tensor(output, device=device),
                                         torch.ones(len(output), device=device))
            if rep[row]:
                seen[row, torch.tensor(prompt + output, device=device)] = True
        # Repetition penalty (CTRL / transformers rule): a seen token's logit is divided by the
        # penalty when positive, multiplied when negative.
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        # Presence and frequency penalties (OpenAI rule), over generated tokens only.
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        return logits - presence * (counts > 0) - frequency * counts

    @staticmethod
    def _filter(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Zero the probabilities top-k, top-p and min-p exclude (the top token always stays)."""
        device, V = probs.device, probs.shape[-1]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        min_p = torch.tensor([p.min_p for p in params], device=device)
        filtered = (top_k < V) | (top_p < 1) | (min_p > 0)
        if not filtered.any():
            return probs
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=device)
        drop = rank[None, :] >= top_k[:, None]
        # top-p: keep the smallest prefix whose mass reaches top_p (mass before a token < top_p).
        drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
        drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
        drop[:, 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        # Rows without filters stay as they are, whatever their neighbours ask: with top_p = 1
        # the rounded cumulative mass can reach 1 before the tail and drop it.
        return torch.where(filtered[:, None], torch.zeros_like(probs).scatter_(-1, order, sorted_probs), probs)
