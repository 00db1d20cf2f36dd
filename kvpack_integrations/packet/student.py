"""The packet layout as one differentiable forward pass: what the trainer optimises the adapter through.

Sequence: preamble | header + document_i + trailer (for every i) | tail | answer, positions running
through, with `block_mask` (each wrapped document attends only to itself). Gradients reach only the
adapter's soft tokens: the model's weights stay frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..runtime.loader import LoadedModel
from .layout import PacketPrompt, block_mask


@dataclass
class StudentPass:
    inputs_embeds: torch.Tensor  # [1, L, hidden]
    attention_mask: torch.Tensor  # [1, 1, L, L] additive
    position_ids: torch.Tensor  # [1, L]
    answer_tokens: int  # the sequence ends with this many answer tokens


def student_pass(
    loaded: LoadedModel,
    prompt: PacketPrompt,
    answer: Sequence[int],
    header: torch.Tensor,
    trailer: torch.Tensor,
) -> StudentPass:
    """Inputs for the student; `header`/`trailer` may require grad (the adapter being trained)."""
    table = loaded.model.get_input_embeddings()

    def embed(ids: Sequence[int]) -> torch.Tensor:
        if not ids:
            return torch.zeros(0, table.weight.shape[1], dtype=table.weight.dtype, device=table.weight.device)
        return table(torch.tensor([list(ids)], dtype=torch.long, device=table.weight.device))[0]

    dtype = table.weight.dtype
    device = table.weight.device  # soft tokens live on the CPU (adapter files, the trainer's parameters)
    h, t = header.to(device, dtype), trailer.to(device, dtype)
    parts = [embed(prompt.preamble)]
    blocks = []
    for document in prompt.documents:
        parts += [h, embed(document), t]
        blocks.append(h.shape[0] + len(document) + t.shape[0])
    tail = [*prompt.tail, *answer]
    parts.append(embed(tail))
    embeds = torch.cat(parts, dim=0)[None]
    total = embeds.shape[1]
    return StudentPass(
        inputs_embeds=embeds,
        attention_mask=block_mask(len(prompt.preamble), blocks, len(tail), dtype).to(embeds.device),
        position_ids=torch.arange(total, device=embeds.device)[None],
        answer_tokens=len(answer),
    )


def student_logits(loaded: LoadedModel, inputs: StudentPass, *, answer_only: bool = False) -> torch.Tensor:
    """Logits of the student pass (no cache; gradients flow to the soft tokens).

    All positions [L, vocab] by default; with `answer_only`, only the positions that predict the
    answer tokens [len(answer), vocab]: the vocabulary projection is a fifth of this small model's
    FLOPs per position, so the trainer skips it everywhere else.
    """
    keep = inputs.answer_tokens + 1 if answer_only else 0
    out = loaded.model(
        inputs_embeds=inputs.inputs_embeds,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
        use_cache=False,
        logits_to_keep=keep,
    )
    return out.logits[0, :-1] if answer_only else out.logits[0]


def distillation_kl(loaded: LoadedModel, inputs: StudentPass, target: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the vocabulary, averaged over the answer positions; `target` holds the
    teacher's log-probs there. The trainer's loss, and the held-out score adapters are compared by."""
    logits = student_logits(loaded, inputs, answer_only=True).float()
    return torch.nn.functional.kl_div(torch.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean")
