"""Bundled synthetic corpora with checkable answers, so the demo and tests need no download.

Each task is a generator of (question, answer) pairs in chat form: easy to produce in any amount and to grade
by exact match. `arithmetic` (small multi-digit arithmetic, the default the tests use) is hard for tiny
models; `sort` (sort a short digit string) is one a deep tiny teacher learns within the offline demo's
training budget and a one-layer student can still learn from it, so the demo's accuracy goals mean something.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_WORDS = ("compute", "what is", "evaluate", "find", "calculate", "work out")
SORT_DIGITS = 6


def arithmetic_example(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair such as ("what is 37 + 85?", "122")."""
    op = rng.choice(list(OPS))
    a, b = rng.randint(0, 99), rng.randint(0, 99 if op != "*" else 12)
    return f"{rng.choice(_WORDS)} {a} {op} {b}?", str(OPS[op](a, b))


def sort_example(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair such as ("sort 660487", "046678"): the digits in ascending order."""
    digits = [rng.randint(0, 9) for _ in range(SORT_DIGITS)]
    return "sort " + "".join(map(str, digits)), "".join(map(str, sorted(digits)))


# task name → (generator, reference response for an answer, row id prefix)
TASKS: dict[str, tuple[Callable[[random.Random], tuple[str, str]], Callable[[str], str], str]] = {
    "arithmetic": (arithmetic_example, lambda a: f"The answer is {a}.", "arith"),
    "sort": (sort_example, lambda a: a, "sort"),
}


def _task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown corpus task {name!r}; the bundled tasks are {', '.join(sorted(TASKS))}.")
    return TASKS[name]


def sample_texts(n: int, seed: int = 0, task: str = "arithmetic") -> list[str]:
    """Plain text lines (questions and answers in ChatML-like prose) for training a tokenizer."""
    example, respond, _ = _task(task)
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        q, a = example(rng)
        lines.append(f"user: {q}\nassistant: {respond(a)}")
    return lines


def make_rows(n: int, seed: int = 0, with_response: bool = False, system: str | None = None,
              task: str = "arithmetic") -> list[dict]:
    """Chat rows `{"id", "messages", "answer"[, "response"]}` in the corpus format the label stage reads."""
    example, respond, prefix = _task(task)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, a = example(rng)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        row = {"id": f"{prefix}-{seed}-{i}", "messages": messages, "answer": a}
        if with_response:
            row["response"] = respond(a)
        rows.append(row)
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def build_corpus(path: str | Path, num_rows: int, seed: int = 0, with_response: bool = True,
                            task: str = "arithmetic") -> Path:
    """What `data.build` calls: a bundled task's corpus as jsonl (`task` names one of `TASKS`)."""
    return write_jsonl(make_rows(num_rows, seed=seed, with_response=with_response, task=task), path)
