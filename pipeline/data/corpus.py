"""A bundled synthetic corpus with checkable answers, so the demo and tests need no download.

The task is small multi-digit arithmetic in chat form: easy to generate in any amount, easy to grade by
exact match, and hard enough that a bigger teacher beats a smaller student trained without it.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_WORDS = ("compute", "what is", "evaluate", "find", "calculate", "work out")


def arithmetic_example(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair such as ("what is 37 + 85?", "122")."""
    op = rng.choice(list(OPS))
    a, b = rng.randint(0, 99), rng.randint(0, 99 if op != "*" else 12)
    return f"{rng.choice(_WORDS)} {a} {op} {b}?", str(OPS[op](a, b))


def sample_texts(n: int, seed: int = 0) -> list[str]:
    """Plain text lines (questions and answers in ChatML-like prose) for training a tokenizer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        q, a = arithmetic_example(rng)
        lines.append(f"user: {q}\nassistant: The answer is {a}.")
    return lines


def make_rows(n: int, seed: int = 0, with_response: bool = False, system: str | None = None) -> list[dict]:
    """Chat rows `{"id", "messages"[, "response"]}` in the corpus format the label stage reads."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, a = arithmetic_example(rng)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        row = {"id": f"arith-{seed}-{i}", "messages": messages, "answer": a}
        if with_response:
            row["response"] = f"The answer is {a}."
        rows.append(row)
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def build_arithmetic_corpus(path: str | Path, num_rows: int, seed: int = 0, with_response: bool = True) -> Path:
    """What `data.build` calls: the bundled corpus as jsonl."""
    return write_jsonl(make_rows(num_rows, seed=seed, with_response=with_response), path)
