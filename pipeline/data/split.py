"""The held-out split of labeled rows: a pure function of each row's id, the same on every machine and run.

A row is held out when the first 32 bits of sha256(id), read as a fraction of 2**32, fall below the held-out
fraction, so a smaller fraction always selects a subset of a larger one: rows the train stage held out at
fraction f stay unseen by the student for any later stage that holds out at most f (the quantize gate).

A capped training set (`train.max_rows`) is the non-held-out rows with the smallest sha256(id): fixed by the ids
alone, so the teacher's labels and the corpus's reference answers of the same corpus give the same rows.
"""
from __future__ import annotations

import hashlib

SPLIT_RULE = "held out when int(sha256(id)[:8], 16) / 2**32 < heldout_fraction"


def _key(row_id: str) -> str:
    return hashlib.sha256(row_id.encode()).hexdigest()


def is_heldout(row_id: str, fraction: float) -> bool:
    return int(_key(row_id)[:8], 16) / 2**32 < fraction


def training_ids(ids: list[str], fraction: float, max_rows: int | None) -> set[str] | None:
    """The ids a capped training set keeps (at most `max_rows` non-held-out ones); None when uncapped."""
    if max_rows is None:
        return None
    return set(sorted((i for i in ids if not is_heldout(i, fraction)), key=_key)[:max_rows])
