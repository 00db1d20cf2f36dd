"""Question-answering rows as in ../shared/data: {question, answers[], contexts[{title, text, gold}]}."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidInputError
from ..runtime.paths import read_text_lines


@dataclass(frozen=True)
class Passage:
    title: str
    text: str
    gold: bool

    def as_fact(self) -> str:
        return f"{self.title}: {self.text}" if self.title else self.text


@dataclass(frozen=True)
class QARow:
    question: str
    answers: tuple[str, ...]
    passages: tuple[Passage, ...]

    def facts(self, gold_only: bool = False) -> list[str]:
        return [p.as_fact() for p in self.passages if p.gold or not gold_only]

    def digest(self) -> str:
        """What the row holds, in 16 hex digits: a resumed run's record must be of this very row."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def gold_first(self) -> list[str]:
        """Supporting passages first, then distractors (the accumulation order)."""
        ordered = sorted(self.passages, key=lambda p: not p.gold)
        return [p.as_fact() for p in ordered]

    def data_order(self, limit: int | None = None) -> list[str]:
        """The passages in the data's order; with `limit`, the supporting ones and the first distractors,
        still in that order (supporting passages stay where the data puts them, as at evaluation)."""
        if not limit or len(self.passages) <= limit:
            return self.facts()
        distractors = limit - sum(p.gold for p in self.passages)
        kept = []
        for p in self.passages:
            if p.gold or distractors > 0:
                kept.append(p)
                distractors -= not p.gold
        return [p.as_fact() for p in kept[:limit]]

    def documents(self, limit: int | None = None) -> list[str]:
        """The passages a packet prompt composes: all of them in the data's order, or with `limit` the
        first `limit` gold first (a cap never cuts a supporting passage while distractors remain)."""
        return self.gold_first()[:limit] if limit else self.facts()


def rows_digest(rows: Sequence[QARow]) -> str:
    """The rows and their order, in 16 hex digits: a resumed training run must see the same data."""
    return hashlib.sha256(",".join(row.digest() for row in rows).encode()).hexdigest()[:16]


def load_rows(path: str | Path, limit: int | None = None) -> list[QARow]:
    """Read and validate rows, naming the line of any malformed one."""
    path = Path(path)
    lines = read_text_lines(path, "data file")
    rows: list[QARow] = []
    for no, line in enumerate(lines, 1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            if not isinstance(raw.get("answers"), list) or not all(isinstance(x, str) for x in raw["answers"]):
                raise TypeError("answers must be a list of strings")
            if not isinstance(raw.get("contexts"), list) or not all(isinstance(c, dict) for c in raw["contexts"]):
                raise TypeError("contexts must be a list of objects")
            passages = tuple(
                Passage(str(c.get("title", "")), str(c["text"]), bool(c.get("gold", False))) for c in raw["contexts"]
            )
            answers = tuple(raw["answers"])
            question = str(raw["question"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(
                f"{path}:{no}: expected {{question, answers[], contexts[{{title, text, gold}}]}} ({exc})"
            ) from None
        if not question.strip() or not answers or not passages:
            raise InvalidInputError(f"{path}:{no}: empty question, answers or contexts")
        rows.append(QARow(question, answers, passages))
    if not rows:
        raise InvalidInputError(f"{path} holds no rows")
    return rows
