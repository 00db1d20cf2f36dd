"""How far an adapter's packets pull the model from full attention, on rows it was not trained on.

The same KL(teacher || student) the trainer minimises, measured without gradients on held-out rows laid
out as `kvpack eval packet` lays them out (every passage in the data's order unless `max_passages`).
It ranks adapters (or an adapter against none: plain re-rotated caches) in minutes, where the answer
F1 of `kvpack eval packet` takes an hour and is noisy on a small model.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..composition.cache_ops import check_context_window
from ..errors import InvalidInputError
from ..evaluation.datasets import QARow
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.loader import LoadedModel
from .adapter import PacketAdapter
from .layout import packet_prompt
from .student import distillation_kl, student_pass
from .trainer import Teacher


def held_out_kl(
    loaded: LoadedModel,
    rows: Sequence[QARow],
    adapter: PacketAdapter | None,
    *,
    max_passages: int | None = None,
    max_answer_tokens: int = 16,
    fmt: KnowledgeFormat | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean and per-row KL of the packet layout against full attention; `adapter=None` scores plain caches."""
    if not rows:
        raise InvalidInputError("no rows to score the adapter on")
    if adapter is not None:
        adapter.check_model(loaded)
    fmt = fmt or KnowledgeFormat()
    hidden = loaded.model.get_input_embeddings().weight.shape[1]
    none = torch.zeros(0, hidden)
    header, trailer = (adapter.header, adapter.trailer) if adapter is not None else (none, none)
    teacher = Teacher(loaded, max_answer_tokens)
    per_row = []
    for row in tqdm(rows, desc="held-out KL", unit="row", disable=not progress):
        prompt = packet_prompt(loaded.tokenizer, row.documents(max_passages), row.question, fmt)
        text_ids = prompt.text_ids()
        check_context_window(loaded, len(text_ids) + len(prompt.documents) * (header.shape[0] + trailer.shape[0]))
        answer, target = teacher(text_ids)
        with torch.no_grad():
            kl = distillation_kl(loaded, student_pass(loaded, prompt, answer, header, trailer), target)
        per_row.append(float(kl))
    return {"kl": statistics.fmean(per_row), "n": len(rows), "per_row": per_row}
