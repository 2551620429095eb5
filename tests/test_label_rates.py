"""The label stage's steady rate: the writer's record of each engine call, and the rate computed from them."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.schema import encode_topk
from pipeline.generation.engine import LABELED_SCHEMA
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


def test_the_writer_reports_each_engine_call_and_stores_none_of_its_timing(tmp_path):
    def row(i, tokens, actor, started, finished, reason=None):
        out = {"id": f"r{i}", "source": "c.jsonl", "line": i, "reason": reason,
               "engine_actor": actor, "engine_started": started, "engine_finished": finished}
        if reason is None:
            ids = np.tile(np.arange(20), (tokens, 1))
            out.update(encode_topk(ids, np.log(np.full(ids.shape, 1 / 25))), prompt_ids=[1, 2],
                       response_ids=[3] * tokens, token_logprob=np.zeros(tokens, np.float16))
        return out

    rows = [row(0, 3, "a", 1.0, 2.0), row(1, 4, "a", 1.0, 2.0), row(2, 5, "a", 3.0, 4.0),
            row(3, 0, None, None, None, reason="empty prompt")]
    stats = write_batch(pa.Table.from_pylist(rows, schema=LABELED_SCHEMA), str(tmp_path / "l"), str(tmp_path / "r"))
    calls = sorted(stats.column("engine_calls").to_pylist()[0], key=lambda c: c["started"])
    assert calls == [call("a", 1.0, 2.0, 7), call("a", 3.0, 4.0, 5)]
    assert stats.column("tokens").to_pylist() == [12] and stats.column("rejected").to_pylist() == [1]
    stored = pq.read_table(next((tmp_path / "l").glob("part-*.parquet")))
    assert not {"engine_actor", "engine_started", "engine_finished", "reason"} & set(stored.column_names)
