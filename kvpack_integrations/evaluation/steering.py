"""`kvpack eval steering`: the Knowledge Packs paper's steering tables (6-10) on the loaded model.

Directions and data ship in `kvpack_integrations/demo/steering/` (written for this project by
`benchmarks/steering_pairs.py`): `defensive` (input validation in Python functions), `docstrings`,
`formal` (register), 22 contrastive pairs each, and 40 code-writing tasks. Scores are computed, not
judged: a style score per output (a regular expression or the parsed code) and coherence = the reply's
code block parses as Python and defines a function. Arms, all greedy:

- baseline (unsteered), text prompt (the style asked for in words: the upper reference);
- alpha sweep of `defensive` on each swept layer range (default the mid and the late third);
- the best coherent point: the highest score at coherence >= 0.95, with a paired sign test against
  the baseline on the same tasks (a steering effect on 40 tasks needs it to mean anything);
- layer thirds (early, mid, late, all) at that point's alpha;
- composition: `defensive` + `docstrings`, their per-layer cosine, each alone and the sum;
- dual channel: HotpotQA gold passages as knowledge in the same cache, `formal` at alphas from 0 to
  1.5: EM/F1 against the style score of the answers.

Every reply is appended to the records file as it is made, so an interrupted run (about 1,500
greedy generations on the default model) resumes where it stopped, with the same result.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..engine.engine import Engine
from ..engine.settings import GenerationSettings
from ..errors import InvalidInputError
from ..knowledge.packs import knowledge_prompt
from ..prompts.knowledge import KnowledgeFormat
from ..prompts.rendering import render_messages
from ..runtime.loader import LoadedModel
from ..steering.build import build_steering_vector, load_pairs
from ..steering.vector import LAYER_NAMES, SteeringVector
from .datasets import QARow
from .machine import machine_info
from .metrics import exact_match, f1_score
from .records import RecordLog

DEMO = Path(__file__).resolve().parents[1] / "demo" / "steering"
COHERENT = 0.95
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
_DEFENSIVE = re.compile(r"\braise\b|\bisinstance\(|\bassert\b|\btry:")
_FORMAL = re.compile(
    r"\b(certainly|kindly|please|regrettably|sincerely|shall|would be|pleased|grateful|appreciate|"
    r"furthermore|therefore|however|indeed|accordingly|respectfully)\b",
    re.IGNORECASE,
)
_CASUAL = re.compile(r"\b(yeah|gonna|wanna|lol|cool|dude|hey|u|thx|ok|okay|stuff|ugh)\b|!!", re.IGNORECASE)


def code_of(text: str) -> str:
    """The first fenced code block of a reply, else the whole reply."""
    match = _CODE_BLOCK.search(text)
    return match.group(1) if match else text


def coherent_code(text: str) -> bool:
    """The reply's code parses as Python and defines at least one function."""
    try:
        tree = ast.parse(code_of(text))
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.FunctionDef) for node in ast.walk(tree))


def defensive_score(text: str) -> float:
    """1 when the code validates its input (raise, isinstance, assert or try), else 0."""
    return float(bool(_DEFENSIVE.search(code_of(text))))


def docstring_score(text: str) -> float:
    """1 when a function in the code has a docstring (parsed; a regular expression if it does not parse)."""
    code = code_of(text)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return float(bool(re.search(r"def [^\n]*:\s*\n\s+(\"\"\"|''')", code)))
    return float(any(isinstance(n, ast.FunctionDef) and ast.get_docstring(n) for n in ast.walk(tree)))


def formality_score(text: str) -> float:
    """1 when the text uses a formal marker and no casual one, else 0."""
    return float(bool(_FORMAL.search(text)) and not _CASUAL.search(text))


@dataclass(frozen=True)
class Direction:
    name: str
    pairs: str  # file in DEMO
    score: Callable[[str], float]
    instruction: str  # the same style asked for in the prompt (text-prompt reference)


DIRECTIONS = {
    "defensive": Direction(
        "defensive",
        "defensive_pairs.jsonl",
        defensive_score,
        "Validate the arguments and raise an error for invalid input.",
    ),
    "docstrings": Direction("docstrings", "docstring_pairs.jsonl", docstring_score, "Give the function a docstring."),
    "formal": Direction("formal", "formal_pairs.jsonl", formality_score, "Answer in a formal register."),
}


@dataclass
class SteeringEvalOptions:
    alphas: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    sweep_layers: Sequence[str] = ("mid", "late")
    dual_alphas: Sequence[float] = (0.0, 0.2, 0.5, 0.7, 1.0, 1.5)
    task_limit: int | None = None
    max_new_tokens: int = 256  # long enough that validated code is not cut off (a cut reply does not parse)
    dual_max_new_tokens: int = 16

    def __post_init__(self) -> None:
        """A bad layer name is refused here, before any model work (the layer table needs named thirds)."""
        if not self.sweep_layers or any(name not in LAYER_NAMES for name in self.sweep_layers):
            raise InvalidInputError(
                f"the alpha sweep takes layer names from {', '.join(LAYER_NAMES)}, got {','.join(self.sweep_layers)!r}"
            )


def load_tasks(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    path = Path(path) if path is not None else DEMO / "code_tasks.jsonl"
    if not path.is_file():
        raise InvalidInputError(f"tasks file not found: {path}")
    tasks = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not tasks:
        raise InvalidInputError(f"{path} holds no tasks")
    return tasks[:limit] if limit else tasks


class _Runner:
    """Greedy generations over the tasks, one arm at a time, each reply logged as it is made.

    Replies are numbered in the order the run makes them (the arms' order is fixed by the options and
    the replies before them), so a resumed run takes reply i from the log when its arm and prompt match.
    """

    def __init__(self, loaded: LoadedModel, tasks: Sequence[str], max_new_tokens: int, log: RecordLog) -> None:
        self.loaded = loaded
        self.engine = Engine(loaded)
        self.tasks = tasks
        # the reply's code block closes with a fence: stop there instead of letting the model ramble on
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, stop=("\n```\n",))
        self.log = log
        self.made = 0

    def reply(
        self,
        arm: str,
        prompt: tuple[str, str],
        ids: Sequence[int],
        steering: Sequence[SteeringVector],
        engine: Engine | None = None,
        settings: GenerationSettings | None = None,
    ) -> str:
        """Reply number `made` to `prompt` = (its key, its text): from the log when an earlier run got that
        far, else generated (by `engine`/`settings`, default the code tasks' ones) and logged."""
        row, self.made = self.made, self.made + 1
        key, text = prompt
        logged = self.log.get(row)
        if logged is not None and logged.get("arm") == arm and logged.get(key) == text:
            return str(logged["reply"])
        engine, settings = engine or self.engine, settings or self.settings
        reply = engine.generate(ids, settings, steering=steering).text
        self.log.add(row, {"arm": arm, key: text, "reply": reply})
        return reply

    def arm(self, arm: str, steering: Sequence[SteeringVector] = (), suffix: str = "") -> list[str]:
        replies = []
        for task in tqdm(self.tasks, desc=arm, unit="task", leave=False):
            prompt = f"{task} {suffix}".strip()
            ids = render_messages(self.loaded.tokenizer, [{"role": "user", "content": prompt}]).token_ids
            replies.append(self.reply(arm, ("task", prompt), ids, steering))
        return replies


def _run_config(loaded: LoadedModel, opts: SteeringEvalOptions, tasks: Sequence[str], rows: Sequence[QARow]) -> Any:
    """What the replies depend on: a log written under another configuration is not reused."""

    def digest(texts: Sequence[str]) -> str:
        return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]

    config = {
        "eval": "steering",
        "fingerprint": loaded.fingerprint.digest,
        "device": str(loaded.device),
        "options": asdict(opts),
        "tasks": digest(tasks),
        "pairs": digest([(DEMO / d.pairs).read_text(encoding="utf-8") for d in DIRECTIONS.values()]),
        "dual_rows": digest([r.digest() for r in rows]),  # whole rows: other passages or answers, other replies
    }
    return json.loads(json.dumps(config))  # tuples as lists: equal to the config read back from the log


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _scored(replies: Sequence[str], score: Callable[[str], float]) -> dict[str, float]:
    return {"score": _mean([score(r) for r in replies]), "coherence": _mean([coherent_code(r) for r in replies])}


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact sign test on paired outcomes: P(a split at least this uneven | no effect)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(steered: Sequence[str], baseline: Sequence[str], score: Callable[[str], float]) -> dict[str, float]:
    """Per task: does the steered reply show the style where the baseline's did not (gained), or the reverse."""
    gained = sum(score(s) > score(b) for s, b in zip(steered, baseline))
    lost = sum(score(s) < score(b) for s, b in zip(steered, baseline))
    return {"gained": gained, "lost": lost, "sign_test_p": sign_test(gained, lost)}


def run_steering(
    loaded: LoadedModel,
    qa_rows: Sequence[QARow],
    opts: SteeringEvalOptions | None = None,
    *,
    tasks: Sequence[str] | None = None,
    records_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every arm of the steering tables; returns the summary (replies go to `records_path`)."""
    opts = opts or SteeringEvalOptions()
    tasks = list(tasks) if tasks is not None else load_tasks(limit=opts.task_limit)
    vectors = {
        name: build_steering_vector(loaded, load_pairs(DEMO / d.pairs), layers="mid", name=name, progress=progress)
        for name, d in DIRECTIONS.items()
    }
    defensive, docstrings = DIRECTIONS["defensive"], DIRECTIONS["docstrings"]
    run = _Runner(
        loaded, tasks, opts.max_new_tokens, RecordLog(records_path, _run_config(loaded, opts, tasks, qa_rows))
    )
    baseline = run.arm("baseline")
    text = run.arm("text_prompt", suffix=defensive.instruction)
    sweep: list[dict[str, Any]] = []
    replies_of: dict[tuple[str, float], list[str]] = {}
    for layer_range in opts.sweep_layers:
        for alpha in tqdm(opts.alphas, desc=f"alpha sweep ({layer_range})", disable=not progress):
            vector = vectors["defensive"].with_layers(layer_range).with_alpha(alpha)
            replies = replies_of[layer_range, alpha] = run.arm(f"sweep_{layer_range}_{alpha:g}", [vector])
            sweep.append({"alpha": alpha, "layers": layer_range, **_scored(replies, defensive.score)})
    coherent = [s for s in sweep if s["coherence"] >= COHERENT]
    best = max(coherent, key=lambda s: (s["score"], -s["alpha"])) if coherent else min(sweep, key=lambda s: s["alpha"])
    alpha, best_layers = float(best["alpha"]), str(best["layers"])
    layers: dict[str, dict[str, float]] = {}
    for name in LAYER_NAMES:
        if (name, alpha) in replies_of:
            layers[name] = _scored(replies_of[name, alpha], defensive.score)
            continue
        replies = run.arm(f"layers_{name}", [vectors["defensive"].with_layers(name).with_alpha(alpha)])
        layers[name] = _scored(replies, defensive.score)
    a = vectors["defensive"].with_layers(best_layers).with_alpha(alpha)
    b = vectors["docstrings"].with_layers(best_layers).with_alpha(alpha)
    only_b = run.arm("docstrings_alone", [b])
    both = run.arm("defensive+docstrings", [a + b])
    cos = a.cosine(b)[list(a.layers)]
    composition = {
        "alpha": alpha,
        "layers": best_layers,
        "cos": float(cos.mean()),
        "cos_per_layer": [round(float(c), 4) for c in cos],
        "score_a": best["score"],
        "score_b": _mean([docstrings.score(r) for r in only_b]),
        "score_ab": {
            "defensive": _mean([defensive.score(r) for r in both]),
            "docstrings": _mean([docstrings.score(r) for r in both]),
        },
        "baseline_b": _mean([docstrings.score(r) for r in baseline]),
        "coherence_ab": _mean([coherent_code(r) for r in both]),
    }
    dual = _dual_channel(loaded, qa_rows, vectors["formal"], opts, run, progress)
    base, prompted = _scored(baseline, defensive.score), _scored(text, defensive.score)
    return {
        "model": loaded.name,
        "direction": "defensive",
        "n_tasks": len(tasks),
        "n_pairs": {name: len(load_pairs(DEMO / d.pairs)) for name, d in DIRECTIONS.items()},
        "baseline_score": base["score"],
        "baseline_coherence": base["coherence"],
        "text_prompt_score": prompted["score"],
        "text_prompt_coherence": prompted["coherence"],
        "sweep": sweep,
        "coherence_threshold": COHERENT,
        "best_coherent": (
            {
                **best,
                "over_baseline": best["score"] - base["score"],
                **paired(replies_of[best_layers, alpha], baseline, defensive.score),
            }
            if coherent
            else None
        ),
        "layer_alpha": alpha,
        "layer_scores": {k: v["score"] for k, v in layers.items()},
        "layer_coherence": {k: v["coherence"] for k, v in layers.items()},
        "layers": {name: list(vectors["defensive"].with_layers(name).layers) for name in LAYER_NAMES},
        "composition": composition,
        "dual_channel": dual,
        "dual_channel_rows": len(qa_rows),
        "scoring": {
            "score": "share of replies whose code validates input (raise / isinstance / assert / try)",
            "coherence": "share of replies whose code block parses as Python and defines a function",
            "dual_channel_style": "share of answers with a formal marker and no casual one",
        },
        "machine": machine_info(),
    }


def _dual_channel(
    loaded: LoadedModel,
    rows: Sequence[QARow],
    formal: SteeringVector,
    opts: SteeringEvalOptions,
    run: _Runner,
    progress: bool,
) -> list[dict[str, float]]:
    """Knowledge and steering in one cache: gold passages as the knowledge, `formal` at each alpha."""
    engine = Engine(loaded)
    settings = GenerationSettings(max_new_tokens=opts.dual_max_new_tokens)
    prompts = [knowledge_prompt(loaded.tokenizer, r.facts(gold_only=True), r.question, KnowledgeFormat()) for r in rows]
    out = []
    for alpha in tqdm(opts.dual_alphas, desc="dual channel", disable=not progress):
        em, f1, style = [], [], []
        steering = [formal.with_alpha(alpha)] if alpha else []
        for row, prompt in zip(rows, prompts):
            reply = run.reply(
                f"dual_{alpha:g}", ("question", row.question), prompt.token_ids, steering, engine, settings
            )
            em.append(exact_match(reply, row.answers))
            f1.append(f1_score(reply, row.answers))
            style.append(formality_score(reply))
        out.append({"alpha": alpha, "em": _mean(em), "f1": _mean(f1), "style_score": _mean(style)})
    return out
