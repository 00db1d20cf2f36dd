"""The synthetic fact generator (groundwork for the knowledge-base-at-scale benchmarks)."""

from __future__ import annotations

import json

import pytest

from kvpack_integrations.errors import InvalidInputError
from kvpack_integrations.knowledge.synthetic import synthetic_facts, write_synthetic


def test_rows_are_seeded_distinct_and_self_consistent(tmp_path) -> None:
    rows = list(synthetic_facts(600, seed=3))
    assert len(rows) == 600
    assert rows == list(synthetic_facts(600, seed=3)) and rows != list(synthetic_facts(600, seed=4))
    assert len({r["fact"] for r in rows}) == 600
    assert len({(r["entity"], r["attribute"]) for r in rows}) == 600
    for r in rows:
        assert r["entity"] in r["fact"] and r["entity"] in r["question"] and r["answer"] in r["fact"]
        assert r["answer"] not in r["question"]
    path = write_synthetic(tmp_path / "facts.jsonl", 25)
    assert [json.loads(line) for line in path.read_text().splitlines()] == list(synthetic_facts(25))
    with pytest.raises(InvalidInputError, match="n >= 1"):
        next(synthetic_facts(0))
