"""Training the packet adapter by self-supervised distillation (only the soft tokens learn).

Teacher: the frozen model with full attention over the plain prompt (preamble, every document as
text, the question) and its own greedy answer. Student: the same model on the packet layout
(`student_pass`: documents wrapped in header/trailer, each attending only to itself; question and
answer attending to everything). Loss: KL(teacher || student) over the vocabulary at every answer
position. Adam on the header and trailer, gradient accumulation, a progress bar, a checkpoint every
`checkpoint_every` steps (soft tokens, optimizer state, position in the data, losses) and resume
from it, so a long CPU run can be stopped and continued.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..composition.cache_ops import check_context_window
from ..engine.engine import Engine
from ..engine.settings import GenerationSettings
from ..errors import InvalidInputError
from ..evaluation.datasets import QARow
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.loader import LoadedModel
from .adapter import PacketAdapter
from .layout import packet_prompt
from .student import student_logits, student_pass


@dataclass
class TrainOptions:
    steps: int = 100
    accumulation: int = 4
    lr: float = 1e-2
    header_tokens: int = 8
    trailer_tokens: int = 8
    max_passages: int | None = None  # passages per example (gold ones first), to bound CPU time
    max_answer_tokens: int = 16
    checkpoint_every: int = 10
    seed: int = 0


@dataclass
class TrainState:
    step: int = 0
    cursor: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _facts(row: QARow, limit: int | None) -> list[str]:
    facts = row.gold_first()
    return facts[:limit] if limit else facts


class _Teacher:
    """Greedy answers of the plain prompt (cached per example) and the teacher's log-probs on them."""

    def __init__(self, loaded: LoadedModel, max_tokens: int) -> None:
        self.loaded = loaded
        self.engine = Engine(loaded, max_cached_tokens=0)
        self.settings = GenerationSettings(max_new_tokens=max_tokens, stop=("\n",))
        self.answers: dict[int, list[int]] = {}

    def answer(self, index: int, text_ids: Sequence[int]) -> list[int]:
        if index not in self.answers:
            result = self.engine.generate(list(text_ids), self.settings, strategy="text")
            ids = list(result.token_ids) or [min(self.loaded.eos_token_ids)]
            self.answers[index] = ids
        return self.answers[index]

    def log_probs(self, text_ids: Sequence[int], answer: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor([[*text_ids, *answer]], dtype=torch.long, device=self.loaded.device)
        with torch.no_grad():
            logits = self.loaded.model(input_ids=ids, use_cache=False).logits[0]
        start = len(text_ids) - 1
        return torch.log_softmax(logits[start : start + len(answer)].float(), dim=-1)


def train_adapter(
    loaded: LoadedModel,
    rows: Sequence[QARow],
    out: str | Path,
    opts: TrainOptions | None = None,
    *,
    fmt: KnowledgeFormat | None = None,
    progress: bool = True,
) -> tuple[PacketAdapter, TrainState]:
    """Train (or resume training) an adapter on `rows`; writes `out` and `out`.ckpt at checkpoints."""
    opts = opts or TrainOptions()
    if not rows:
        raise InvalidInputError("no training rows")
    if opts.steps < 1 or opts.accumulation < 1 or not opts.lr > 0:
        raise InvalidInputError("steps and accumulation must be >= 1 and lr > 0")
    fmt = fmt or KnowledgeFormat()
    out = Path(out).expanduser()
    ckpt = out.with_name(out.name + ".ckpt")
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    adapter = PacketAdapter.initial(loaded, opts.header_tokens, opts.trailer_tokens, seed=opts.seed)
    header = torch.nn.Parameter(adapter.header.clone())
    trailer = torch.nn.Parameter(adapter.trailer.clone())
    optimizer = torch.optim.Adam([header, trailer], lr=opts.lr)
    state = TrainState()
    order = list(range(len(rows)))
    random.Random(opts.seed).shuffle(order)
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        if saved["fingerprint"] != loaded.fingerprint.to_json() or saved["options"] != asdict(opts):
            raise InvalidInputError(f"{ckpt} was written for another model or other options: remove it to start over")
        with torch.no_grad():
            header.copy_(saved["header"])
            trailer.copy_(saved["trailer"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState(**saved["state"])
    teacher = _Teacher(loaded, opts.max_answer_tokens)
    bar = tqdm(total=opts.steps, initial=state.step, desc="packet adapter", unit="step", disable=not progress)
    while state.step < opts.steps:
        t0 = time.perf_counter()
        optimizer.zero_grad()
        total = 0.0
        for _ in range(opts.accumulation):
            index = order[state.cursor % len(order)]
            state.cursor += 1
            row = rows[index]
            prompt = packet_prompt(loaded.tokenizer, _facts(row, opts.max_passages), row.question, fmt)
            text_ids = prompt.text_ids()
            check_context_window(
                loaded, len(text_ids) + len(prompt.documents) * (opts.header_tokens + opts.trailer_tokens)
            )
            answer = teacher.answer(index, text_ids)
            target = teacher.log_probs(text_ids, answer)
            with torch.enable_grad():
                inputs = student_pass(loaded, prompt, answer, header, trailer)
                logits = student_logits(loaded, inputs)[inputs.answer_logit_positions].float()
                loss = torch.nn.functional.kl_div(
                    torch.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean"
                )
                (loss / opts.accumulation).backward()
            total += float(loss.detach())
        optimizer.step()
        state.step += 1
        state.losses.append(total / opts.accumulation)
        state.seconds += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(kl=f"{state.losses[-1]:.4f}")
        if state.step % opts.checkpoint_every == 0 or state.step == opts.steps:
            _checkpoint(ckpt, loaded, header, trailer, optimizer, state, opts)
    bar.close()
    trained = PacketAdapter(
        header.detach().clone(),
        trailer.detach().clone(),
        loaded.fingerprint,
        trained_steps=state.step,
        notes=json.dumps({"options": asdict(opts), "rows": len(rows), "final_kl": _tail_mean(state.losses)}),
    )
    trained.save(out)
    return trained, state


def _tail_mean(losses: Sequence[float], n: int = 10) -> float:
    tail = list(losses[-n:])
    return sum(tail) / len(tail) if tail else math.nan


def _checkpoint(
    path: Path,
    loaded: LoadedModel,
    header: torch.Tensor,
    trailer: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    opts: TrainOptions,
) -> None:
    payload: dict[str, Any] = {
        "fingerprint": loaded.fingerprint.to_json(),
        "options": asdict(opts),
        "header": header.detach().clone(),
        "trailer": trailer.detach().clone(),
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous checkpoint intact
