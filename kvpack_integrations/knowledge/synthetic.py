"""Synthetic fact sets of any size about fictional entities, with one question per fact.

Names are built from syllables, so they exist in no pre-training corpus: the model can only answer
from the knowledge it is given. Each entity gets several attributes; every (entity, attribute) pair
is one fact `{fact, question, answer, entity}`. Seeded, so a size and seed always give the same set.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

from ..errors import InvalidInputError
from ..runtime.paths import usable_file
from ..segments.serialization import atomic_write_bytes

_ONSETS = [
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
    "th",
    "sh",
    "qu",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "n", "r", "l", "s", "th", "x", "nd", "rk", "m"]
_CITIES = [
    "Ondria",
    "Kelmark",
    "Varsel",
    "Tamberly",
    "Quorin",
    "Halvik",
    "Drennet",
    "Opalis",
    "Moravia Nova",
    "Lunsk",
    "Brightwater",
    "Essendor",
    "Felgrave",
    "Yarrow",
    "Caldris",
    "Pellan",
]
_COLOURS = ["amber", "cobalt", "crimson", "ivory", "jade", "saffron", "teal", "violet", "slate", "ochre"]
_PRODUCTS = [
    "drones",
    "batteries",
    "telescopes",
    "bicycles",
    "violins",
    "satellites",
    "turbines",
    "lanterns",
    "keyboards",
    "compasses",
]

# (attribute, fact template, question template, answer generator)
_ATTRIBUTES = [
    (
        "city",
        "{e} is headquartered in the city of {a}.",
        "In which city is {e} headquartered?",
        lambda r: r.choice(_CITIES),
    ),
    (
        "founded",
        "{e} was founded in the year {a}.",
        "In which year was {e} founded?",
        lambda r: str(r.randint(1801, 2023)),
    ),
    (
        "founder",
        "The founder of {e} is {a}.",
        "Who is the founder of {e}?",
        lambda r: f"{invented_name(r)} {invented_name(r)}",
    ),
    (
        "product",
        "{e} is best known for making {a}.",
        "What is {e} best known for making?",
        lambda r: r.choice(_PRODUCTS),
    ),
    ("colour", "The logo of {e} is {a}.", "What colour is the logo of {e}?", lambda r: r.choice(_COLOURS)),
    (
        "staff",
        "The number of people employed by {e} is {a}.",
        "How many people are employed by {e}?",
        lambda r: str(r.randint(12, 98000)),
    ),
]


def invented_name(rng: random.Random) -> str:
    syllables = rng.randint(2, 3)
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).title()


def synthetic_facts(n: int, seed: int = 0) -> Iterator[dict[str, str]]:
    """`n` facts (rows with fact, question, answer, entity) about distinct fictional entities."""
    if n < 1:
        raise InvalidInputError(f"a synthetic fact set needs n >= 1, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    produced = 0
    for _ in itertools.count():
        entity = f"{invented_name(rng)} {rng.choice(['Labs', 'Works', 'Systems', 'Guild', 'Foundry', 'Collective'])}"
        if entity in seen:
            continue
        seen.add(entity)
        for attribute, fact, question, answer_of in _ATTRIBUTES:
            answer = answer_of(rng)
            yield {
                "fact": fact.format(e=entity, a=answer),
                "question": question.format(e=entity),
                "answer": answer,
                "entity": entity,
                "attribute": attribute,
            }
            produced += 1
            if produced == n:
                return


def write_synthetic(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `synthetic_facts(n, seed)` as JSONL (the `kvpack eval routing --facts` format), atomically: a
    bad `n` or an interrupted run leaves an existing file as it was."""
    path = usable_file(path, "facts file")
    rows = "".join(json.dumps(row) + "\n" for row in synthetic_facts(n, seed))
    atomic_write_bytes(path, rows.encode("utf-8"))
    return path
