"""The held-out split of labeled rows: a pure function of each row's id, the same on every machine and run.

A row is held out when the first 32 bits of sha256(id), read as a fraction of 2**32, fall below the held-out
fraction, so a smaller fraction always selects a subset of a larger one: rows the train stage held out at
fraction f stay unseen by the student for any later stage that holds out at most f (the quantize gate).
"""
from __future__ import annotations

import hashlib

SPLIT_RULE = "held out when int(sha256(id)[:8], 16) / 2**32 < heldout_fraction"


def is_heldout(row_id: str, fraction: float) -> bool:
    return int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction
