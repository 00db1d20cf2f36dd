"""Per-row records appended to a JSONL file, so long evaluations resume where they stopped."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..runtime.paths import usable_file

Config = Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]


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
    """Append-only JSONL of finished work keyed by row index; `None` path keeps records in memory.

    `part`: the record field that splits a row into separately recorded pieces (`eval packet` records
    one line per method); records are then keyed by (row, that field's value).
    `config`: what a record's result depends on besides its row, one mapping or a function of the part
    (a method's own settings). A record made under another configuration stays in the file and is not
    reused: its work is redone, and `set_aside` counts the rows (or parts) this run redoes for that
    reason (none once a record of this configuration is there too), so a report can say so.
    `row_digests`: what each row of this run holds (`QARow.digest`). A record is reused only for the row
    it was made from: records of another data file under the same log are refused by name, and records
    past the last row (an earlier run with a higher limit) are left alone."""

    def __init__(
        self,
        path: str | Path | None,
        config: Config,
        row_digests: Sequence[str] | None = None,
        *,
        part: str | None = None,
    ) -> None:
        self.path = usable_file(path, "records file") if path else None
        self.part = part
        self._config = config
        self.row_digests = list(row_digests) if row_digests is not None else None
        self.records: dict[tuple[int, Any], dict[str, Any]] = {}
        self._aside: set[tuple[int, Any]] = set()
        self._configs: dict[Any, dict[str, Any]] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # blank, or a line cut short by an interrupted run: that row is redone
                if isinstance(rec, dict):
                    self._keep(rec)
        self.set_aside = len(self._aside - self.records.keys())

    def config(self, part: Any = None) -> dict[str, Any]:
        """The configuration records of `part` are made under, as it reads back from JSON (worked out
        once per part: a long log compares every record with it)."""
        if part not in self._configs:
            config = self._config(part) if callable(self._config) else self._config
            self._configs[part] = json.loads(json.dumps(dict(config)))  # tuples as lists, as read back
        return self._configs[part]

    def _part_of(self, record: Mapping[str, Any]) -> Any:
        return record.get(self.part) if self.part else None

    def _keep(self, rec: dict[str, Any]) -> None:
        row = rec.get("row")
        if not isinstance(row, int) or row < 0:
            return
        part = self._part_of(rec)
        if self.row_digests is not None:
            if row >= len(self.row_digests):
                return
            if "row_digest" not in rec:
                self._aside.add((row, part))  # written before rows were recorded: nothing tells whose it is
                return
            if rec["row_digest"] != self.row_digests[row]:
                raise InvalidInputError(
                    f"{self.path} holds records of other data (row {row} differs): remove it "
                    "(or pass another --records)"
                )
        if rec.get("config") != self.config(part):
            self._aside.add((row, part))  # another configuration: its row (or part) starts over
            return
        self.records[row, part] = rec

    def done(self, row: int, part: Any = None) -> bool:
        return (row, part) in self.records

    def get(self, row: int, part: Any = None) -> dict[str, Any] | None:
        return self.records.get((row, part))

    def add(self, row: int, record: Mapping[str, Any]) -> None:
        """Record `row` (its part read from `record`), durably before returning."""
        self.add_all(row, [record])

    def add_all(self, row: int, records: Sequence[Mapping[str, Any]]) -> None:
        """Record several parts of `row` with one durable write."""
        stored = []
        for record in records:
            part = self._part_of(record)
            rec = {"row": row, "config": self.config(part), **record}
            if self.row_digests is not None:
                rec["row_digest"] = self.row_digests[row]
            self.records[row, part] = rec
            stored.append(rec)
        if self.path and stored:
            append_records(self.path, stored)

    def ordered(self) -> list[dict[str, Any]]:
        """The records in row order (then part order, as first recorded)."""
        return [self.records[k] for k in sorted(self.records, key=lambda key: key[0])]
