"""Synthetic biographies for training the packet adapter: QA rows about invented people.

Each row holds several short biographies (one is gold) and a question about the gold person, in the
`../shared/data` row format ({question, answers, contexts[{title, text, gold}]}). Names and places are
invented, so the teacher can only answer from the passages, which is what the adapter must preserve.
Seeded: the same size and seed give the same rows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from ..errors import InvalidInputError
from ..knowledge.synthetic import invented_name
from ..runtime.paths import usable_file
from ..segments.serialization import atomic_write_bytes

_JOBS = [
    "a glassblower",
    "a cartographer",
    "an astronomer",
    "a violin maker",
    "a beekeeper",
    "a bridge engineer",
    "a botanist",
    "a typesetter",
    "a lighthouse keeper",
    "a clockmaker",
]
_TOWNS = ["Ondria", "Kelmark", "Varsel", "Tamberly", "Quorin", "Halvik", "Drennet", "Opalis", "Lunsk", "Caldris"]
_QUESTIONS = [
    ("born", "In which town was {p} born?"),
    ("job", "What did {p} work as?"),
    ("year", "In which year was {p} born?"),
    ("mentor", "Who was {p}'s mentor?"),
]


def _person(rng: random.Random) -> dict[str, str]:
    return {
        "name": f"{invented_name(rng)} {invented_name(rng)}",
        "born": rng.choice(_TOWNS),
        "job": rng.choice(_JOBS),
        "year": str(rng.randint(1820, 1990)),
        "mentor": f"{invented_name(rng)} {invented_name(rng)}",
    }


def _biography(p: dict[str, str]) -> str:
    return (
        f"{p['name']} was born in {p['born']} in {p['year']}. {p['name'].split()[0]} trained under "
        f"{p['mentor']} and worked as {p['job']} for most of their life."
    )


def biography_rows(n: int, passages: int = 4, seed: int = 0) -> Iterator[dict]:
    """`n` rows, each with `passages` biographies (the first person's is gold, shuffled in)."""
    if n < 1 or passages < 1:
        raise InvalidInputError(f"need n >= 1 rows and passages >= 1, got {n} and {passages}")
    rng = random.Random(seed)
    for _ in range(n):
        people = [_person(rng) for _ in range(passages)]
        gold = people[0]
        key, template = rng.choice(_QUESTIONS)
        contexts = [{"title": p["name"], "text": _biography(p), "gold": p is gold} for p in people]
        rng.shuffle(contexts)
        yield {"question": template.format(p=gold["name"]), "answers": [gold[key]], "contexts": contexts}


def write_biographies(path: str | Path, n: int, passages: int = 4, seed: int = 0) -> Path:
    """Write the rows as JSONL (the training data format), atomically: a bad path or `n` is refused by
    name and an interrupted run leaves an existing file as it was."""
    path = usable_file(path, "biographies file")
    rows = "".join(json.dumps(r) + "\n" for r in biography_rows(n, passages, seed))
    atomic_write_bytes(path, rows.encode("utf-8"))
    return path
