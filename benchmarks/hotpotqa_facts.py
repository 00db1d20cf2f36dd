"""HotpotQA dev rows -> `kvpack eval routing` rows: every passage is a fact; each question's fact is the
gold passage that holds its answer (questions whose answer is in no passage, or yes/no, are left out)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvpack_integrations.evaluation.datasets import load_rows


def main(source: str, target: str) -> None:
    facts: dict[str, int] = {}
    rows = []
    for row in load_rows(source):
        for p in row.passages:
            facts.setdefault(p.as_fact(), len(facts))
        answer = row.answers[0]
        gold = [p.as_fact() for p in row.passages if p.gold and answer.lower() in p.text.lower()]
        if answer.lower() not in ("yes", "no") and gold:
            rows.append({"fact": gold[0], "question": row.question, "answer": answer})
    questions = {r["fact"]: r for r in rows}  # one question per fact: the fact identifies the row
    out = [questions.get(f, {"fact": f, "question": "", "answer": ""}) for f in facts]
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text("".join(json.dumps(r) + "\n" for r in out))
    print(f"{len(out)} facts, {sum(1 for r in out if r['question'])} with a question")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
