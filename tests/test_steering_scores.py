"""The computable scores behind `kvpack eval steering`: each tells the styles apart on hand-made replies."""

from __future__ import annotations

from kvpack_integrations.evaluation.steering import (
    DEMO,
    DIRECTIONS,
    code_of,
    coherent_code,
    defensive_score,
    docstring_score,
    formality_score,
    load_tasks,
    paired,
    sign_test,
)
from kvpack_integrations.steering import load_pairs

GUARDED = (
    "Sure:\n```python\ndef half(x):\n    if not isinstance(x, int):\n        raise TypeError('x')\n"
    "    return x / 2\n```\nDone."
)
PLAIN = "```python\ndef half(x):\n    return x / 2\n```"
DOCUMENTED = '```python\ndef half(x):\n    """Half of x."""\n    return x / 2\n```'
BROKEN = "```python\ndef half(x):\nreturn x / 2\n```"


def test_code_scores() -> None:
    assert code_of(GUARDED).startswith("def half(x):") and code_of("no fence") == "no fence"
    assert code_of("```python\ndef f():\n    pass") == "def f():\n    pass"  # an unclosed block still counts
    assert [coherent_code(t) for t in (GUARDED, PLAIN, DOCUMENTED, BROKEN, "Just prose.")] == [True] * 3 + [False] * 2
    assert [defensive_score(t) for t in (GUARDED, PLAIN, DOCUMENTED)] == [1.0, 0.0, 0.0]
    assert [docstring_score(t) for t in (GUARDED, PLAIN, DOCUMENTED)] == [0.0, 0.0, 1.0]
    assert docstring_score('```python\ndef f():\n    """Doc."""\nreturn 1\n```') == 1.0  # unparsable: by pattern


def test_formality_score() -> None:
    assert formality_score("Certainly, the meeting will take place on Tuesday.") == 1.0
    assert formality_score("yeah the meeting is tuesday") == 0.0
    assert formality_score("Certainly, dude.") == 0.0  # one casual marker spoils it
    assert formality_score("Paris") == 0.0


def test_shipped_pairs_and_tasks() -> None:
    for direction in DIRECTIONS.values():
        pairs = load_pairs(DEMO / direction.pairs)
        assert len(pairs) >= 20
        # every pair differs in the direction's style, the way the score sees it
        if direction.name != "formal":
            assert all(direction.score(p) == 1.0 and direction.score(n) == 0.0 for p, n in pairs)
            assert all(coherent_code(p) and coherent_code(n) for p, n in pairs)
        else:
            assert sum(direction.score(p) for p, _ in pairs) > sum(direction.score(n) for _, n in pairs)
    tasks = load_tasks()
    assert len(tasks) >= 40 and len(set(tasks)) == len(tasks)


def test_sign_test_against_the_baseline() -> None:
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert abs(sign_test(5, 0) - 2 / 32) < 1e-12  # both tails of Binomial(5, 1/2)
    assert sign_test(0, 5) == sign_test(5, 0) and sign_test(9, 1) < 0.05 < sign_test(4, 1)
    outcome = paired([GUARDED, GUARDED, PLAIN], [PLAIN, GUARDED, GUARDED], defensive_score)
    assert outcome == {"gained": 1, "lost": 1, "sign_test_p": 1.0}


def test_the_run_config_holds_the_whole_dual_channel_rows() -> None:
    """A resumed run reuses logged replies only under the same configuration: rows with the same questions
    but other passages (or answers) are other data, so their replies must be made again."""
    from types import SimpleNamespace

    from kvpack_integrations.evaluation.datasets import Passage, QARow
    from kvpack_integrations.evaluation.steering import SteeringEvalOptions, _run_config

    model = SimpleNamespace(fingerprint=SimpleNamespace(digest="d"), device="cpu")
    ann = QARow("Who founded X?", ("Ann",), (Passage("X", "X was founded by Ann.", True),))
    bob = QARow("Who founded X?", ("Bob",), (Passage("X", "X was founded by Bob.", True),))
    answers_only = QARow("Who founded X?", ("Bob",), ann.passages)

    def config(row: QARow):
        return _run_config(model, SteeringEvalOptions(), ["t"], [row])  # type: ignore[arg-type]

    assert config(ann) == config(ann)
    assert config(ann) != config(bob) and config(ann) != config(answers_only)
