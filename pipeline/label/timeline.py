"""The label run's timeline: how the cluster and the teacher pool grew and shrank while the rows went through.

Every `every_s` seconds the driver samples the nodes alive, the teacher actors alive, the teacher actors that
returned a batch in the last `WINDOW_S`, this run's rows finished and its rows per second over the last
`RATE_WINDOW_S`, and appends a line to timeline.csv beside the labels' manifest (a killed run's samples stay there
until the stage runs again); at the end it draws timeline.png. Actors are counted through Ray's state API, which
needs the cluster's dashboard: on an embedded Ray (started without one) the column stays empty and
`engines_answering` is the pool's only trace.
"""
from __future__ import annotations

import csv
import logging
import threading
import time
from pathlib import Path

from pipeline import storage
from pipeline.monitoring import WINDOW_S, WindowRate, engines_answering

log = logging.getLogger("ray_distill.label")
COLUMNS = ("seconds", "nodes", "actors", "engines_answering", "rows_done", "rows_per_s")
RATE_WINDOW_S = 10.0
# the teacher's actors in Ray's state API: Ray Data names each pool actor's class after the UDF it runs
# (MapWorker(MapBatches(VLLMGenerator)))
_TEACHER_ACTOR = "VLLMGenerator"
_STATE_API_TRIES = 5  # failures in a row after which the actors are no longer counted (no dashboard answers)


class Timeline:
    """Samples in a thread while in a `with` block; `update()` hands it the driver's counts after each write."""

    def __init__(self, folder: Path, count_actors: bool, every_s: float = 1.0):
        self.csv, self.png = Path(folder) / "timeline.csv", Path(folder) / "timeline.png"
        self.every_s = every_s
        self.rows_done = 0
        self.last_output: dict[str, float] = {}  # teacher actor → when its latest batch came back
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="label-timeline")
        self.state_api_tries = _STATE_API_TRIES if count_actors else 0

    def update(self, rows_done: int, last_output: dict[str, float]) -> None:
        with self.lock:
            self.rows_done, self.last_output = rows_done, dict(last_output)

    def __enter__(self) -> "Timeline":
        import ray

        self.job = ray.get_runtime_context().get_job_id()
        self.start = time.time()
        self.rate = WindowRate(self.start, window_s=RATE_WINDOW_S)
        self.last_rows = 0
        storage.remove(self.png)  # an earlier run's picture is not this run's (at a URI run root, there too)
        with self.csv.open("w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)
        self.thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        if exc_type is not None or self.thread.is_alive():  # a failed or interrupted run stops now, as it is
            return
        try:
            self._sample()  # the last rows
            plot(self.csv, self.png)
        except Exception as e:  # noqa: BLE001 - a missing picture never fails a finished run
            log.warning("label: could not finish the timeline %s: %s", self.csv, e)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self._sample()
            except Exception as e:  # noqa: BLE001 - e.g. the CSV on a shared mount that hiccups: the next sample
                log.warning("label: a timeline sample failed: %s", e)

    def _sample(self) -> None:
        import ray

        now = time.time()
        with self.lock:
            rows, last_output = self.rows_done, self.last_output
        try:
            nodes = sum(1 for n in ray.nodes() if n["Alive"])
        except Exception:  # noqa: BLE001 - Ray going down at the end of a run
            return
        self.rate.add(now, rows - self.last_rows)
        self.last_rows = rows
        line = (round(now - self.start, 2), nodes, self._actors(), engines_answering(last_output, now), rows,
                round(self.rate.rate(now), 3))
        with self.csv.open("a", newline="") as f:
            csv.writer(f).writerow(line)

    def _actors(self) -> int | str:
        """Teacher actors alive in this job, or "" when the state API did not answer (no dashboard, or busy)."""
        if not self.state_api_tries:
            return ""
        from ray.util.state import list_actors

        try:
            actors = list_actors(filters=[("job_id", "=", self.job), ("state", "=", "ALIVE")], limit=10_000,
                                 timeout=5, raise_on_missing_output=False)
        except Exception as e:  # noqa: BLE001 - one empty sample; after a few in a row, no more asking
            self.state_api_tries -= 1
            if not self.state_api_tries:
                log.info("label: the timeline counts no actors (Ray's state API did not answer: %s)", e)
            return ""
        self.state_api_tries = _STATE_API_TRIES
        return sum(_TEACHER_ACTOR in (a.class_name or "") for a in actors)


def read(path: Path) -> list[dict[str, float | None]]:
    """timeline.csv as rows of numbers (an empty `actors` is None)."""
    with Path(path).open(newline="") as f:  # a line being appended as it is read is left out
        return [{k: float(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(f)
                if None not in row.values() and None not in row]


def plot(path: Path, out: Path) -> Path:
    """timeline.png: nodes and teacher actors (steps) above, rows done and rows/s below, over seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(path)
    t = [r["seconds"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    top.step(t, [r["nodes"] for r in rows], where="post", label="nodes alive")
    if any(r["actors"] is not None for r in rows):
        top.step(t, [r["actors"] for r in rows], where="post", label="teacher actors alive")
    top.step(t, [r["engines_answering"] for r in rows], where="post", linestyle=":",
             label=f"teacher actors answering (last {WINDOW_S:g} s)")
    top.set_ylabel("count")
    top.legend(loc="upper left", fontsize=8)
    done = bottom.plot(t, [r["rows_done"] for r in rows], color="tab:green", label="rows done")
    bottom.set_ylabel("rows done")
    bottom.set_xlabel("seconds since the labeling started")
    rate = bottom.twinx()
    per_s = rate.plot(t, [r["rows_per_s"] for r in rows], color="tab:purple",
                      label=f"rows/s (last {RATE_WINDOW_S:g} s)")
    rate.set_ylabel("rows/s")
    bottom.legend(handles=done + per_s, loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
