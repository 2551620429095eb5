"""The bundled corpus tasks: generators, reference responses, grading, and the digit-level tokenizer (no Ray)."""
from __future__ import annotations

import random

import pytest

from pipeline.data.corpus import TASKS, build_corpus, make_rows, sample_texts, sort_example
from pipeline.metrics import answer_correct


def test_sort_answers_are_the_prompt_digits_in_ascending_order():
    rng = random.Random(0)
    for _ in range(200):
        question, answer = sort_example(rng)
        digits = question.removeprefix("sort ")
        assert digits.isdigit() and len(digits) == 6
        assert answer == "".join(sorted(digits))


def test_rows_carry_the_task_id_answer_and_response_and_are_reproducible():
    rows = make_rows(5, seed=3, with_response=True, task="sort")
    assert rows == make_rows(5, seed=3, with_response=True, task="sort")
    assert rows != make_rows(5, seed=4, with_response=True, task="sort")
    for i, row in enumerate(rows):
        assert row["id"] == f"sort-3-{i}"
        assert row["response"] == row["answer"]
        assert answer_correct(row["response"], row["answer"], "exact")
        assert not answer_correct(row["response"][::-1] + "0", row["answer"], "exact")


def test_the_default_task_is_still_arithmetic():
    assert make_rows(3, seed=0) == make_rows(3, seed=0, task="arithmetic")
    row = make_rows(1, seed=0, with_response=True)[0]
    assert row["id"].startswith("arith-") and row["response"] == f"The answer is {row['answer']}."
    assert answer_correct(row["response"], row["answer"], "last_number")
    assert sample_texts(4, seed=0) == sample_texts(4, seed=0, task="arithmetic")


def test_build_writes_the_named_task_and_refuses_an_unknown_one(tmp_path):
    path = build_corpus(tmp_path / "c.jsonl", 4, seed=1, task="sort")
    assert path.read_text().count('"id": "sort-1-') == 4
    assert set(TASKS) >= {"arithmetic", "sort"}
    with pytest.raises(ValueError, match="unknown corpus task"):
        make_rows(1, task="no-such-task")


def test_split_digits_tokenizes_every_digit_alone_and_the_default_does_not(tmp_path):
    from pipeline.models.tiny import build_tokenizer, default_tokenizer_corpus

    split = build_tokenizer(tmp_path / "split", vocab_size=300, texts=default_tokenizer_corpus("sort"),
                            split_digits=True)
    ids = split("sort 660487", add_special_tokens=False)["input_ids"]
    digits = [t for t in split.convert_ids_to_tokens(ids) if t.lstrip("Ġ").isdigit()]
    assert digits == list("660487")
    merged = build_tokenizer(tmp_path / "merged", vocab_size=512)
    tokens = merged.convert_ids_to_tokens(merged("what is 37 + 85?", add_special_tokens=False)["input_ids"])
    assert any(len(t.lstrip("Ġ")) > 1 and t.lstrip("Ġ").isdigit() for t in tokens)
