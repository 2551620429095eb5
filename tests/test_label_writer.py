"""The label stage's bookkeeping, without Ray: the writer (its record of each engine call, shard names that make a
retried write idempotent), the steady rate computed from the engine calls, and the ledger's claims (idempotent for a
retried prepare task). The same retries through real Ray tasks: tests/test_label_stage.py."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.schema import encode_topk
from pipeline.generation.engine import LABELED_SCHEMA
from pipeline.generation.prepare import RowLedger
from pipeline.label.stage import steady_rate
from pipeline.label.writer import write_batch


def call(actor, started, finished, tokens):
    return {"actor": actor, "started": started, "finished": finished, "tokens": tokens}


def test_one_actor_is_timed_from_its_first_output_to_its_last():
    # warm-up call 0-10 s (left out), then two calls of 100 tokens ending at 15 and 20 s, 1 s idle before each
    rate = steady_rate([call("a", 11, 15, 100), call("a", 0, 10, 999), call("a", 16, 20, 100)])
    assert rate["steady_tokens_per_s"] == pytest.approx(200 / 10)
    assert rate["steady_seconds"] == pytest.approx(10) and rate["steady_tokens"] == 200
    assert rate["engine_busy"] == pytest.approx(8 / 10) and rate["engine_actors"] == 1


def test_actors_side_by_side_add_up_and_one_after_another_average():
    side_by_side = steady_rate([call("a", 0, 10, 50), call("a", 10, 20, 100),
                                call("b", 0, 10, 50), call("b", 10, 20, 100)])
    assert side_by_side["steady_tokens_per_s"] == pytest.approx(200 / 10)
    one_then_other = steady_rate([call("a", 0, 10, 50), call("a", 10, 20, 100),
                                  call("b", 20, 30, 50), call("b", 30, 40, 100)])
    assert one_then_other["steady_tokens_per_s"] == pytest.approx(200 / 20)


def test_no_steady_rate_from_a_single_call_per_actor():
    rate = steady_rate([call("a", 0, 10, 50), call("b", 0, 12, 50)])
    assert rate["steady_tokens_per_s"] is None and rate["engine_actors"] == 2
    assert steady_rate([])["steady_tokens_per_s"] is None


def row(i, tokens, actor=None, started=None, finished=None, reason=None):
    out = {"id": f"r{i}", "source": "c.jsonl", "line": i, "reason": reason,
           "engine_actor": actor, "engine_started": started, "engine_finished": finished}
    if reason is None:
        ids = np.tile(np.arange(20), (tokens, 1))
        out.update(encode_topk(ids, np.log(np.full(ids.shape, 1 / 25))), prompt_ids=[1, 2],
                   response_ids=[3] * tokens, token_logprob=np.zeros(tokens, np.float16))
    return out


def test_the_writer_reports_each_engine_call_and_stores_none_of_its_timing(tmp_path):
    rows = [row(0, 3, "a", 1.0, 2.0), row(1, 4, "a", 1.0, 2.0), row(2, 5, "a", 3.0, 4.0),
            row(3, 0, reason="empty prompt")]
    stats = write_batch(pa.Table.from_pylist(rows, schema=LABELED_SCHEMA), str(tmp_path / "l"), str(tmp_path / "r"))
    calls = sorted(stats.column("engine_calls").to_pylist()[0], key=lambda c: c["started"])
    assert calls == [call("a", 1.0, 2.0, 7), call("a", 3.0, 4.0, 5)]
    assert stats.column("tokens").to_pylist() == [12] and stats.column("rejected").to_pylist() == [1]
    stored = pq.read_table(next((tmp_path / "l").glob("part-*.parquet")))
    assert not {"engine_actor", "engine_started", "engine_finished", "reason"} & set(stored.column_names)


def test_a_batch_written_twice_is_one_shard_each_way(tmp_path):
    """A write task that Ray retries after it wrote (its worker lost) writes the same rows again: the same shard names,
    replaced, not a second copy. Other rows make other names."""
    def batch(lines):
        return pa.Table.from_pylist([row(i, 2) if i % 2 else row(i, 0, reason="bad") for i in lines],
                                    schema=LABELED_SCHEMA)

    for _ in range(2):
        write_batch(batch([0, 1, 2, 3]), str(tmp_path / "l"), str(tmp_path / "r"))
    write_batch(batch([4, 5]), str(tmp_path / "l"), str(tmp_path / "r"))
    labels, rejected = sorted((tmp_path / "l").iterdir()), sorted((tmp_path / "r").iterdir())
    assert len(labels) == len(rejected) == 2 and {p.name for p in labels} == {p.name for p in rejected}
    assert sorted(pq.read_table(tmp_path / "l").column("line").to_pylist()) == [1, 3, 5]
    assert sorted(pq.read_table(tmp_path / "r").column("line").to_pylist()) == [0, 2, 4]


def test_the_ledger_lets_a_row_claim_its_own_id_again(tmp_path):
    """A prepare task that Ray retries after it claimed its rows' ids claims them again: not duplicates of
    themselves; the same id on another row still is one, and rows on disk are done."""
    (tmp_path / "l").mkdir()
    pq.write_table(pa.table({"source": ["c.jsonl"], "line": [9], "id": ["old"]}), tmp_path / "l" / "part-x.parquet")
    ledger = RowLedger(str(tmp_path / "l"), str(tmp_path / "r"))
    claim = (["c.jsonl"] * 3, [0, 1, 9], ["a", "b", "old"], [None, None, None])
    assert ledger.claim(*claim) == ["ok", "ok", "done"]
    assert ledger.claim(*claim) == ["ok", "ok", "done"]  # the retry
    assert ledger.claim(["c.jsonl", "c.jsonl"], [2, 3], ["a", "old"], [None, None]) == ["duplicate", "duplicate"]
    assert ledger.claim(["c.jsonl"], [4], [None], ["malformed JSON"]) == ["ok"]  # refused rows take no id
