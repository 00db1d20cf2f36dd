"""Training the packet adapter by self-supervised distillation (only the soft tokens learn).

Teacher: the frozen model with full attention over the plain prompt (preamble, every document as
text, the question) and its own greedy answer (or, on-policy, the student's: `answers.py`). Student:
the same model on the packet layout (`student_pass`: documents wrapped in header/trailer, each
attending only to itself; question and answer attending to everything). Loss: KL(teacher || student)
over the vocabulary at every answer position. Adam on the header and trailer, gradient accumulation,
a progress bar, a checkpoint every `checkpoint_every` steps (soft tokens, optimizer state, position
in the data, losses) and resume from it, so a long CPU run can be stopped and continued.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..composition.cache_ops import check_context_window, empty_cache
from ..composition.rope import rope_spec
from ..errors import InvalidInputError
from ..evaluation.datasets import QARow, rows_digest
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.loader import LoadedModel
from .adapter import PacketAdapter
from .answers import ANSWER_SOURCES, greedy_answer, student_answer, teacher_log_probs
from .layout import packet_prompt
from .student import distillation_kl, student_pass


@dataclass
class TrainOptions:
    steps: int = 100
    accumulation: int = 4
    lr: float = 1e-2
    header_tokens: int = 8
    trailer_tokens: int = 8
    max_passages: int | None = None  # passages per example, to bound CPU time
    order: str = "gold-first"  # or "data": the data's order, supporting passages where evaluation has them
    max_answer_tokens: int = 16
    checkpoint_every: int = 10
    seed: int = 0
    init: str | None = None  # a trained adapter to continue from (fine-tuning), instead of random soft tokens
    answers: str = "teacher"  # whose greedy answer is distilled: the teacher's, or the student's (on-policy)


@dataclass
class TrainState:
    step: int = 0
    cursor: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


PASSAGE_ORDERS = ("gold-first", "data")


def _facts(row: QARow, limit: int | None, order: str) -> list[str]:
    if order == "data":
        return row.data_order(limit)
    facts = row.gold_first()
    return facts[:limit] if limit else facts


class Teacher:
    """The frozen model on the plain prompt: its greedy answer and its log-probs at every answer step.

    One prefill and a cached greedy decode give both (the distribution at each step is the one the
    greedy token was drawn from), so the teacher costs one pass over the prompt, not two.
    """

    def __init__(self, loaded: LoadedModel, max_tokens: int) -> None:
        self.loaded = loaded
        self.max_tokens = max_tokens

    def __call__(self, text_ids: Sequence[int]) -> tuple[list[int], torch.Tensor]:
        return greedy_answer(self.loaded, empty_cache(self.loaded), text_ids, self.max_tokens)


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
    if opts.checkpoint_every < 1 or opts.max_answer_tokens < 1:
        raise InvalidInputError(
            f"checkpoint_every and max_answer_tokens must be >= 1, got {opts.checkpoint_every} and "
            f"{opts.max_answer_tokens}"
        )
    if opts.max_passages is not None and opts.max_passages < 1:
        raise InvalidInputError(f"max_passages must be >= 1 (or None: every passage), got {opts.max_passages}")
    if opts.order not in PASSAGE_ORDERS:
        raise InvalidInputError(f"unknown passage order {opts.order!r}: use one of {', '.join(PASSAGE_ORDERS)}")
    if opts.answers not in ANSWER_SOURCES:
        raise InvalidInputError(f"unknown answer source {opts.answers!r}: use one of {', '.join(ANSWER_SOURCES)}")
    fmt = fmt or KnowledgeFormat()
    out = Path(out).expanduser()
    ckpt = out.with_name(out.name + ".ckpt")
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    adapter = _starting_adapter(loaded, opts)
    header = torch.nn.Parameter(adapter.header.clone())
    trailer = torch.nn.Parameter(adapter.trailer.clone())
    optimizer = torch.optim.Adam([header, trailer], lr=opts.lr)
    state = TrainState()
    data = rows_digest(rows)
    order = list(range(len(rows)))
    random.Random(opts.seed).shuffle(order)
    if ckpt.is_file():
        saved = _read_checkpoint(ckpt)
        # only the step count may change between runs: a run is extended (or cut short) by resuming it
        # (a checkpoint from before an option existed was written with that option's default)
        same = {**asdict(TrainOptions()), **saved["options"], "steps": opts.steps} == asdict(opts)
        if saved["fingerprint"] != loaded.fingerprint.to_json() or not same:
            raise InvalidInputError(f"{ckpt} was written for another model or other options: remove it to start over")
        if saved.get("rows", data) != data:  # (a checkpoint from before rows were recorded cannot tell)
            raise InvalidInputError(
                f"{ckpt} was written for other training data (other files, another --limit, or edited rows): "
                "resume with the same data, or remove it to start over"
            )
        if saved.get("format", fmt.to_dict()) != fmt.to_dict():  # (nor one from before the format was recorded)
            raise InvalidInputError(
                f"{ckpt} was written for another knowledge format (instruction or separator): resume with the "
                "same one, or remove it to start over"
            )
        try:
            with torch.no_grad():
                header.copy_(saved["header"])
                trailer.copy_(saved["trailer"])
            optimizer.load_state_dict(saved["optimizer"])
            state = TrainState(**saved["state"])
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:  # shapes or fields edited by hand
            raise InvalidInputError(f"{ckpt} holds a damaged training state ({exc}): remove it to start over") from exc
        if state.step > opts.steps:  # the soft tokens of an earlier step are not kept: it cannot be cut below
            raise InvalidInputError(
                f"{ckpt}: the checkpoint is at step {state.step}; pass --steps >= {state.step} (steps={opts.steps} "
                "asked), or remove it to start over"
            )
    teacher = Teacher(loaded, opts.max_answer_tokens)
    spec = rope_spec(loaded) if opts.answers == "student" else None
    bar = tqdm(total=opts.steps, initial=state.step, desc="packet adapter", unit="step", disable=not progress)
    while state.step < opts.steps:
        t0 = time.perf_counter()
        optimizer.zero_grad()
        total = 0.0
        for _ in range(opts.accumulation):
            index = order[state.cursor % len(order)]
            state.cursor += 1
            row = rows[index]
            prompt = packet_prompt(loaded.tokenizer, _facts(row, opts.max_passages, opts.order), row.question, fmt)
            text_ids = prompt.text_ids()
            check_context_window(  # the teacher and the student both run the answer after the prompt
                loaded,
                len(text_ids) + len(prompt.documents) * (opts.header_tokens + opts.trailer_tokens),
                opts.max_answer_tokens,
            )
            if spec is not None:  # on-policy: what the student answers now, scored by the teacher
                now = PacketAdapter(header.detach().clone(), trailer.detach().clone(), loaded.fingerprint)
                answer = student_answer(loaded, prompt, now, spec, opts.max_answer_tokens)
                target = teacher_log_probs(loaded, text_ids, answer)
            else:
                answer, target = teacher(text_ids)
            with torch.enable_grad():
                loss = distillation_kl(loaded, student_pass(loaded, prompt, answer, header, trailer), target)
                (loss / opts.accumulation).backward()
            total += float(loss.detach())
        optimizer.step()
        state.step += 1
        state.losses.append(total / opts.accumulation)
        state.seconds += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(kl=f"{state.losses[-1]:.4f}")
        if state.step % opts.checkpoint_every == 0 or state.step == opts.steps:
            _checkpoint(ckpt, loaded, header, trailer, optimizer, state, opts, data, fmt)
    bar.close()
    trained = PacketAdapter(
        header.detach().clone(),
        trailer.detach().clone(),
        loaded.fingerprint,
        trained_steps=adapter.trained_steps + state.step,  # an init adapter's steps count too
        notes=json.dumps({"options": asdict(opts), "rows": len(rows), "final_kl": _tail_mean(state.losses)}),
    )
    trained.save(out)
    return trained, state


def _starting_adapter(loaded: LoadedModel, opts: TrainOptions) -> PacketAdapter:
    """Random soft tokens, or the `init` adapter: fine-tuning a trained adapter on new data (more passages,
    another domain) costs a fraction of training one from scratch."""
    if opts.init is None:
        return PacketAdapter.initial(loaded, opts.header_tokens, opts.trailer_tokens, seed=opts.seed)
    path = Path(opts.init).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"the adapter to start from, {path}, does not exist")
    start = PacketAdapter.load(path, loaded.fingerprint)
    if (start.header_tokens, start.trailer_tokens) != (opts.header_tokens, opts.trailer_tokens):
        raise InvalidInputError(
            f"{path} has {start.header_tokens} header and {start.trailer_tokens} trailer tokens, the options ask for "
            f"{opts.header_tokens} and {opts.trailer_tokens}: pass the same counts to continue from it"
        )
    return start


# what a checkpoint must hold, and of which type, before any of it is used
CHECKPOINT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "fingerprint": str,
    "options": dict,
    "header": torch.Tensor,
    "trailer": torch.Tensor,
    "optimizer": dict,
    "state": dict,
}
OPTIONAL_CHECKPOINT_FIELDS = {"rows": str, "format": dict}  # absent from checkpoints written before them


def _read_checkpoint(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's payload, read with `weights_only=True`: it holds only tensors, numbers, strings,
    lists and dicts, so a foreign or tampered file cannot run pickled code. Anything unreadable or not
    shaped like a checkpoint is an `InvalidInputError` naming the file, never a raw pickle error."""
    try:
        saved = torch.load(ckpt, weights_only=True)
    except Exception as exc:  # pickle, zip and torch's own errors alike: all mean "not a usable checkpoint"
        # the first line, without colour codes: torch's weights-only refusal runs to pages
        reason = (re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines() or [""])[0][:160]
        raise InvalidInputError(
            f"{ckpt} is not a readable training checkpoint ({type(exc).__name__}: {reason}): remove it to start over"
        ) from exc
    if not isinstance(saved, dict):
        raise InvalidInputError(f"{ckpt} is not a training checkpoint (no fields): remove it to start over")
    wrong = [k for k, kind in CHECKPOINT_FIELDS.items() if not isinstance(saved.get(k), kind)]
    wrong += [k for k, kind in OPTIONAL_CHECKPOINT_FIELDS.items() if k in saved and not isinstance(saved[k], kind)]
    if wrong:
        raise InvalidInputError(
            f"{ckpt} is not a training checkpoint (missing or malformed: {', '.join(wrong)}): remove it to start over"
        )
    return saved


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
    data: str,
    fmt: KnowledgeFormat,
) -> None:
    payload: dict[str, Any] = {
        "fingerprint": loaded.fingerprint.to_json(),
        "options": asdict(opts),
        "rows": data,
        "format": fmt.to_dict(),
        "header": header.detach().clone(),
        "trailer": trailer.detach().clone(),
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous checkpoint intact
