"""The stages' live figures as Ray metrics (`ray.util.metrics`), for Prometheus and Grafana.

Each node's Ray metrics agent serves the figures recorded on that node (by a stage's driver, its training workers)
in Prometheus' text format on the node's metrics export port: `ray start --metrics-export-port=PORT` on a cluster,
`cluster.metrics_export_port` for an embedded Ray. Ray prefixes every name with `ray_` and exports a counter as
`<name>_total`; `FIGURES` holds the names as Prometheus sees them, and cluster/grafana-dashboard.json charts exactly
those (a test keeps the two in step). Serving needs nothing here: Ray Serve's LLM deployments export vLLM's engine
metrics and Serve's own.

    figures = Recorder("label", run="exp1")
    figures.inc("label_rows", 64, outcome="labeled")
    figures.set("label_tokens_per_s", 812.0)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    name: str  # as recorded; Prometheus sees `exported`
    kind: str  # "counter" or "gauge"
    description: str
    tags: tuple[str, ...] = ()  # besides `run`

    @property
    def exported(self) -> str:
        return f"ray_distill_{self.name}" + ("_total" if self.kind == "counter" else "")


FIGURES = {f.name: f for f in (
    Figure("label_rows", "counter", "rows the label stage finished, labeled or rejected (outcome)", ("outcome",)),
    Figure("label_tokens", "counter", "tokens the teacher scored"),
    Figure("label_rows_per_s", "gauge", "rows finished per second over the last 30 s"),
    Figure("label_tokens_per_s", "gauge", "tokens scored per second over the last 30 s"),
    Figure("label_engines_active", "gauge", "teacher actors that returned a batch in the last 30 s"),
    # `model`: the folder trained into, under the run root (student, baseline, teacher_sft/student)
    Figure("train_step", "gauge", "optimizer steps done", ("model",)),
    Figure("train_loss", "gauge", "training loss of the latest step", ("model",)),
    Figure("train_kd_loss", "gauge", "distillation (KD) part of the latest step's loss", ("model",)),
    Figure("train_tokens_per_s", "gauge", "scored tokens per second of the latest step, all workers", ("model",)),
    Figure("evaluate_models", "gauge", "models the evaluate stage evaluates"),
    Figure("evaluate_models_done", "gauge", "models evaluated so far"),
)}
WINDOW_S = 30.0  # the span of the label stage's rates


def engines_answering(last_output: dict[str, float], now: float) -> int:
    """Engines (actor → when its latest batch came back) that returned a batch in the last `WINDOW_S`."""
    return sum(at > now - WINDOW_S for at in last_output.values())


class Recorder:
    """The figures of one stage of one run (`run`: the run root's name, a tag on every figure). Recording never
    stops a stage: without Ray's metrics (no metrics agent, Ray not initialised) it records nothing."""

    def __init__(self, stage: str, run: str):
        self.run = run
        self.metrics: dict[str, Any] = {}
        try:
            from ray.util import metrics

            for name, figure in FIGURES.items():
                if name.startswith(stage + "_"):
                    make = metrics.Counter if figure.kind == "counter" else metrics.Gauge
                    self.metrics[name] = make(f"distill_{name}", description=figure.description,
                                              tag_keys=("run", *figure.tags))
        except Exception:  # noqa: BLE001 - monitoring is best effort
            self.metrics = {}

    def set(self, name: str, value: float, **tags: str) -> None:
        self._record(name, "set", value, tags)

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:  # a Ray counter refuses 0
            self._record(name, "inc", value, tags)

    def _record(self, name: str, how: str, value: float, tags: dict[str, str]) -> None:
        metric = self.metrics.get(name)
        if metric is not None:
            try:
                getattr(metric, how)(float(value), tags={"run": self.run, **tags})
            except Exception:  # noqa: BLE001 - monitoring is best effort
                pass


class WindowRate:
    """Amounts per second over the last `window_s` seconds (less at the start, from the first amount on)."""

    def __init__(self, now: float, window_s: float = WINDOW_S):
        self.start, self.window_s = now, window_s
        self.events: list[tuple[float, float]] = []

    def add(self, at: float, amount: float) -> None:
        self.events.append((at, amount))

    def rate(self, now: float) -> float:
        self.events = [(t, a) for t, a in self.events if t > now - self.window_s]
        span = min(self.window_s, now - self.start)
        return sum(a for _, a in self.events) / span if span > 0 else 0.0
