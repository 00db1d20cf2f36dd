"""The answers the adapter is distilled on: the teacher's own (off-policy) or the student's (on-policy).

Off-policy, the student learns the teacher's distribution along the teacher's greedy answer. At query
time, though, the packet layout decodes its own answer, and after its first different token it is in
states that training never showed it. On-policy distillation (as in GKD) decodes the answer the
student would give, through the same packets, re-rotation and greedy rule as the product, and has the
teacher score that answer: the student learns what the teacher would say from where the student goes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from ..composition.cache_ops import empty_cache, forward
from ..composition.rope import RopeSpec
from ..runtime.loader import LoadedModel
from .adapter import PacketAdapter
from .compose import cache_packet, compose_packets
from .layout import PacketPrompt

ANSWER_SOURCES = ("teacher", "student")


def greedy_answer(
    loaded: LoadedModel, cache: DynamicCache, first: Sequence[int], max_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after `first` on top of `cache`, and the log-probs each was drawn from [n, vocab].

    The answer ends at the first end-of-turn token or newline, which is kept: the student learns where
    to stop. Teacher and student stop by this one rule."""
    answer: list[int] = []
    log_probs: list[torch.Tensor] = []
    logits = forward(loaded, cache, first)
    for _ in range(max_tokens):
        step = torch.log_softmax(logits, dim=-1)
        token = int(step.argmax())
        answer.append(token)
        log_probs.append(step)
        if token in loaded.eos_token_ids or "\n" in loaded.tokenizer.decode([token]):
            break
        logits = forward(loaded, cache, [token])
    return answer, torch.stack(log_probs)


def teacher_log_probs(loaded: LoadedModel, text_ids: Sequence[int], answer: Sequence[int]) -> torch.Tensor:
    """The frozen model's log-probs [len(answer), vocab] at every step of `answer` after the plain prompt,
    in one pass (the answer teacher-forced)."""
    ids = torch.tensor([[*text_ids, *answer]], dtype=torch.long, device=loaded.device)
    with torch.no_grad():
        out = loaded.model(input_ids=ids, use_cache=False, logits_to_keep=len(answer) + 1)
    return torch.log_softmax(out.logits[0, :-1].float(), dim=-1)


def student_answer(
    loaded: LoadedModel, prompt: PacketPrompt, adapter: PacketAdapter, spec: RopeSpec, max_tokens: int
) -> list[int]:
    """The answer the packet layout gives with `adapter` now: each document cached alone at position 0,
    re-rotated into place behind the preamble, the question and answer decoded greedily on top."""
    preamble = empty_cache(loaded)
    if prompt.preamble:
        forward(loaded, preamble, prompt.preamble)
    with torch.no_grad():
        packets = [cache_packet(loaded, adapter, document) for document in prompt.documents]
        cache = compose_packets(loaded, preamble, packets, spec)
        answer, _ = greedy_answer(loaded, cache, prompt.tail, max_tokens)
    return answer
