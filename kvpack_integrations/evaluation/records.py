"""Per-row records appended to a JSONL file, so long evaluations resume where they stopped."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append JSON lines durably, never gluing the first onto a line an interrupted run left half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as fh:
        fh.seek(0, 2)
        if fh.tell():
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write("".join(json.dumps(r) + "\n" for r in records).encode())
        fh.flush()
        os.fsync(fh.fileno())


class RecordLog:
    """Append-only JSONL of finished rows keyed by row index; `None` path keeps records in memory."""

    def __init__(self, path: str | Path | None, config: dict[str, Any]) -> None:
        self.path = Path(path) if path else None
        self.config = config
        self.records: dict[int, dict[str, Any]] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # blank, or a line cut short by an interrupted run: that row is redone
                if isinstance(rec, dict) and rec.get("config") == config:  # another configuration starts over
                    self.records[int(rec["row"])] = rec

    def done(self, row: int) -> bool:
        return row in self.records

    def add(self, row: int, record: dict[str, Any]) -> None:
        rec = {"row": row, "config": self.config, **record}
        self.records[row] = rec
        if self.path:
            append_records(self.path, [rec])

    def ordered(self) -> list[dict[str, Any]]:
        return [self.records[k] for k in sorted(self.records)]
