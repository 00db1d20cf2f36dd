"""SQuAD-style answer scoring (normalised exact match and token F1 on the answer's first line), and
token F1 between two whole texts (how far an approximate method's answer agrees with the exact one)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_span(generated: str) -> str:
    """The model's answer: its first non-empty line (small models keep talking after answering)."""
    for line in generated.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize(answer_span(prediction))
    return float(any(pred == normalize(a) for a in answers))


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize(answer_span(prediction)).split()
    best = 0.0
    for answer in answers:
        gold = normalize(answer).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def text_f1(prediction: str, reference: str) -> float:
    """Token F1 between two whole generations: how close an approximate method's answer is to the exact one.

    With a small model whose answers rarely match the gold string, agreement with full recompute
    separates the composition methods where gold F1 is mostly noise.
    """
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)
