"""The label run's timeline: how the cluster and the teacher pool grew and shrank while the rows went through.

Every `every_s` seconds the driver samples the nodes alive, the teacher actors alive, the rows finished and the
rows per second over the last `RATE_WINDOW_S`, and appends a line to timeline.csv beside the labels' manifest (a
killed run keeps what it sampled); at the end it draws timeline.png. Actors are counted through Ray's state API,
which needs the cluster's dashboard: on an embedded Ray (started without one) the column stays empty and
`engines_answering` (teacher actors that returned a batch in the last 30 s) is the pool's only trace.
"""
from __future__ import annotations

import csv
import logging
import threading
import time
from pathlib import Path

from pipeline.monitoring import WindowRate

log = logging.getLogger("ray_distill.label")
COLUMNS = ("seconds", "nodes", "actors", "engines_answering", "rows_done", "rows_per_s")
RATE_WINDOW_S = 10.0
# the teacher's actors in Ray's state API: Ray Data names each pool actor after the UDF class it runs
_TEACHER_ACTOR = "VLLMGenerator"


class Timeline:
    """Samples in a thread while in a `with` block; `update()` hands it the driver's counts after each write."""

    def __init__(self, folder: Path, count_actors: bool, every_s: float = 1.0):
        self.csv, self.png = Path(folder) / "timeline.csv", Path(folder) / "timeline.png"
        self.every_s = every_s
        self.rows_done = self.engines_answering = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="label-timeline")
        self.state_api = count_actors

    def update(self, rows_done: int, engines_answering: int) -> None:
        with self.lock:
            self.rows_done, self.engines_answering = rows_done, engines_answering

    def __enter__(self) -> "Timeline":
        import ray

        self.job = ray.get_runtime_context().get_job_id()
        self.start = time.time()
        self.rate = WindowRate(self.start, window_s=RATE_WINDOW_S)
        self.last_rows = 0
        with self.csv.open("w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self._sample()
        try:
            plot(self.csv, self.png)
        except Exception as e:  # noqa: BLE001 - a missing picture never fails a finished run
            log.warning("label: could not draw %s: %s", self.png, e)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        import ray

        now = time.time()
        with self.lock:
            rows, answering = self.rows_done, self.engines_answering
        self.rate.add(now, rows - self.last_rows)
        self.last_rows = rows
        try:
            nodes = sum(1 for n in ray.nodes() if n["Alive"])
        except Exception:  # noqa: BLE001 - Ray going down at the end of a run
            return
        line = (round(now - self.start, 2), nodes, self._actors(), answering, rows, round(self.rate.rate(now), 3))
        with self.csv.open("a", newline="") as f:
            csv.writer(f).writerow(line)

    def _actors(self) -> int | str:
        """Teacher actors alive in this job, or "" when the cluster has no state API (no dashboard)."""
        if not self.state_api:
            return ""
        from ray.util.state import list_actors

        try:
            actors = list_actors(filters=[("job_id", "=", self.job), ("state", "=", "ALIVE")], limit=10_000,
                                 timeout=5, raise_on_missing_output=False)
        except Exception as e:  # noqa: BLE001 - a dashboard that does not answer: counted no more
            log.info("label: the timeline counts no actors (Ray's state API did not answer: %s)", e)
            self.state_api = False
            return ""
        return sum(_TEACHER_ACTOR in (a.repr_name or a.class_name or "") for a in actors)


def read(path: Path) -> list[dict[str, float | None]]:
    """timeline.csv as rows of numbers (an empty `actors` is None)."""
    with Path(path).open(newline="") as f:
        return [{k: float(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(f)]


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
             label="teacher actors answering (last 30 s)")
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
