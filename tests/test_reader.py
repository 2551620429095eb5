"""Row validation: each kind of bad input gets its one-line reason (unit level; the stage test checks
that those rows reach rejected/ through the real pipeline)."""
from __future__ import annotations

import json

import pytest

from pipeline.generation.reader import parse_row

GOOD = {"id": 1, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("raw,mode,reason", [
    (b"\xff\xfe{}", "generate", "not valid UTF-8"),
    (b'{"id": 1, "messages": [', "generate", "malformed JSON"),
    (b"[1, 2]", "generate", "must be a JSON object"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "generate", "missing 'id'"),
    (b'{"id": [1], "prompt": "x"}', "generate", "'id' must be a string or an integer"),
    (b'{"id": 1}', "generate", "neither 'messages' nor 'prompt'"),
    (b'{"id": 1, "prompt": 5}', "generate", "'prompt' must be a string"),
    (b'{"id": 1, "prompt": "  "}', "generate", "empty prompt"),
    (b'{"id": 1, "messages": [{"role": "user"}]}', "generate", "messages[0] must have string"),
    (b'{"id": 1, "messages": []}', "generate", "non-empty list"),
    (b'{"id": 1, "prompt": "x"}', "score", "needs a 'response'"),
    (b'{"id": 1, "prompt": "x", "response": 3}', "score", "'response' must be a string"),
    (b'{"id": 1, "prompt": "x", "response": ""}', "score", "empty response"),
])
def test_bad_rows_get_a_reason(raw, mode, reason):
    row, why = parse_row(raw, mode)
    assert reason in why
    # a rejected row keeps its id whenever it has a readable one (the quarantine then names it), and nothing else
    unreadable = ("UTF-8", "malformed JSON", "JSON object", "missing 'id'", "'id' must be")
    assert row == (None if any(r in reason for r in unreadable) else {"id": "1"}), row


def test_good_rows_parse():
    row, why = parse_row(json.dumps(GOOD).encode(), "generate")
    assert why is None and row == {"id": "1", "messages": GOOD["messages"]}
    chat = {"id": "a", "messages": GOOD["messages"] + [{"role": "assistant", "content": "hello"}]}
    row, why = parse_row(json.dumps(chat).encode(), "score")
    assert why is None and row["response"] == "hello" and row["messages"] == GOOD["messages"]


def test_a_corpus_is_identified_by_its_content_not_its_place(tmp_path):
    """The label manifest (and the chain) record what a corpus holds: the same files elsewhere are the same corpus,
    a rewritten or extended file is another, and a `*` in a file name is expanded."""
    from pipeline.generation.reader import corpus_identity

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for name in ("one.jsonl", "two.jsonl"):
            (tmp_path / folder / name).write_text(json.dumps(GOOD) + "\n")
    a = corpus_identity([str(tmp_path / "a" / "one.jsonl"), str(tmp_path / "a" / "two.jsonl")])
    assert a == corpus_identity([str(tmp_path / "b" / "one.jsonl"), str(tmp_path / "b" / "two.jsonl")])
    assert a == corpus_identity([str(tmp_path / "b" / "*.jsonl")])
    (tmp_path / "b" / "two.jsonl").write_text(json.dumps(dict(GOOD, id=2)) + "\n")
    assert corpus_identity([str(tmp_path / "b" / "*.jsonl")]) != a
    with (tmp_path / "a" / "two.jsonl").open("a") as f:
        f.write(json.dumps(dict(GOOD, id=3)) + "\n")
    assert corpus_identity([str(tmp_path / "a" / "*.jsonl")]) != a
