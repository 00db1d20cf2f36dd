"""Reading fact files: .txt (one fact per line) or .jsonl (objects with `fact` or `text`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import EmptyKnowledgeError, InvalidInputError
from ..runtime.paths import read_text_lines


def refuse_one_string(name: str, value: object) -> None:
    """A lone string where a list of strings belongs would be taken apart character by character."""
    if isinstance(value, (str, bytes, bytearray)):
        raise InvalidInputError(f"{name} must be a list of strings, got one string: {str(value)[:60]!r}")


def clean_facts(facts: Iterable[str]) -> list[str]:
    """Strip facts, drop blank ones, and refuse an empty result (and a lone string, which would otherwise
    become one fact per character)."""
    refuse_one_string("facts", facts)
    out = [f.strip() for f in facts if isinstance(f, str) and f.strip()]
    if not out:
        raise EmptyKnowledgeError("no facts given: a knowledge base needs at least one non-empty fact")
    return out


def read_facts(path: str | Path) -> list[str]:
    """Load facts from a file, naming the line of any malformed entry."""
    path = Path(path)
    lines = read_text_lines(path, "facts file")
    if path.suffix == ".txt":
        return clean_facts(lines)
    if path.suffix in (".jsonl", ".ndjson"):
        facts = []
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{no}: not valid JSON ({exc.msg})") from None
            text = row.get("fact", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise InvalidInputError(f"{path}:{no}: expected an object with a string 'fact' or 'text'")
            facts.append(text)
        return clean_facts(facts)
    raise InvalidInputError(f"unsupported facts file {path.name}: use .txt (one fact per line) or .jsonl")
