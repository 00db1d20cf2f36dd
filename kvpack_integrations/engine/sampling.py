"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import secrets

import torch

from .settings import GenerationSettings


def make_generator(settings: GenerationSettings, device: torch.device) -> torch.Generator | None:
    if settings.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(settings.seed if settings.seed is not None else secrets.randbits(63))
    return gen


def next_token(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> int:
    """Greedy argmax, or a sample from the filtered, temperature-scaled distribution."""
    if settings.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / settings.temperature
    if settings.top_k:
        kth = torch.topk(scores, min(settings.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) > settings.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
