"""Per-row records appended to a JSONL file, so long evaluations resume where they stopped."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..runtime.paths import usable_file


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
    """Append-only JSONL of finished rows keyed by row index; `None` path keeps records in memory.

    `row_digests`: what each row of this run holds (`QARow.digest`). A record is reused only for the row
    it was made from: records of another data file under the same log are refused by name, and records
    past the last row (an earlier run with a higher limit) are left alone."""

    def __init__(
        self, path: str | Path | None, config: dict[str, Any], row_digests: Sequence[str] | None = None
    ) -> None:
        self.path = usable_file(path, "records file") if path else None
        self.config = config
        self.row_digests = list(row_digests) if row_digests is not None else None
        self.records: dict[int, dict[str, Any]] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # blank, or a line cut short by an interrupted run: that row is redone
                if isinstance(rec, dict) and rec.get("config") == config:  # another configuration starts over
                    self._keep(rec)

    def _keep(self, rec: dict[str, Any]) -> None:
        row = rec.get("row")
        if not isinstance(row, int) or row < 0:
            return
        if self.row_digests is not None:
            if row >= len(self.row_digests):
                return
            if "row_digest" not in rec:
                return  # written before rows were recorded: redone, as nothing tells whose it is
            if rec["row_digest"] != self.row_digests[row]:
                raise InvalidInputError(
                    f"{self.path} holds records of other data (row {row} differs): remove it "
                    "(or pass another --records)"
                )
        self.records[row] = rec

    def done(self, row: int) -> bool:
        return row in self.records

    def add(self, row: int, record: dict[str, Any]) -> None:
        rec = {"row": row, "config": self.config, **record}
        if self.row_digests is not None:
            rec["row_digest"] = self.row_digests[row]
        self.records[row] = rec
        if self.path:
            append_records(self.path, [rec])

    def ordered(self) -> list[dict[str, Any]]:
        return [self.records[k] for k in sorted(self.records)]
