"""The live figures' names: every one is recorded by a stage and charted by the Grafana dashboard in cluster/, and
the dashboard charts nothing else. (A real scrape during a label job: tests/test_ray_job_submit.py.)"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.monitoring import FIGURES, WindowRate

REPO = Path(__file__).resolve().parents[1]


def test_the_dashboard_charts_exactly_the_exported_figures():
    dashboard = json.loads((REPO / "cluster" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    charted = {name for e in exprs for name in re.findall(r"\bray_distill_\w+", e)}
    assert charted == {f.exported for f in FIGURES.values()}
    for panel in dashboard["panels"]:
        assert panel["title"] and (panel["type"] == "row" or panel["targets"]), panel


def test_every_figure_is_recorded_by_a_stage():
    source = "\n".join(p.read_text() for p in (REPO / "pipeline").rglob("*.py") if p.name != "monitoring.py")
    for name in FIGURES:
        assert f'"{name}"' in source, f"{name} is declared but no stage records it"


def test_rates_are_over_the_last_thirty_seconds():
    rate = WindowRate(now=0.0)
    rate.add(5.0, 50)
    assert rate.rate(10.0) == pytest.approx(5.0)  # 50 over the 10 s since the start
    rate.add(35.0, 30)
    assert rate.rate(40.0) == pytest.approx(1.0)  # the first amount has left the window: 30 over 30 s
