"""The evaluation's Markdown report, its pass/fail goals and its plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

ROLES = {"teacher": "teacher", "student": "KD student", "quantized": "KD student, quantized",
         "sft_baseline": "SFT-only student"}


def _goal(name: str, passed: bool | None, detail: str) -> dict[str, Any]:
    return {"goal": name, "pass": passed, "detail": detail}


def check_goals(results: dict[str, dict[str, Any]], limits: Any) -> list[dict[str, Any]]:
    """The goals in `evaluate.goals` (`limits`, a GoalsConfig): accuracy, size and latency of the student against
    the teacher; KD beats SFT-only at equal data; the quantized student close to the unquantized one. A goal whose
    inputs are missing is None; one whose limit is None is left out."""
    t, s = results["teacher"], results["student"]
    goals = []
    if limits.min_accuracy_vs_teacher is not None and t["accuracy"] is not None and s["accuracy"] is not None:
        # a teacher that solves nothing sets no bar
        goals.append(_goal(f"student accuracy >= {limits.min_accuracy_vs_teacher:.0%} of the teacher's",
                           s["accuracy"] >= limits.min_accuracy_vs_teacher * t["accuracy"] if t["accuracy"] > 0
                           else None, f"{s['accuracy']:.3f} vs {t['accuracy']:.3f}"))
    if limits.min_parameter_ratio is not None:
        ratio = t["parameters"] / s["parameters"]
        goals.append(_goal(f"student has >= {limits.min_parameter_ratio:g}x fewer parameters",
                           ratio >= limits.min_parameter_ratio, f"{ratio:.1f}x"))
    # the median request: on a shared machine a single request stalled by another process skews the mean
    t_lat, s_lat = t.get("latency_p50_ms") or t["latency_ms"], s.get("latency_p50_ms") or s["latency_ms"]
    if limits.min_speedup is not None and t_lat and s_lat:
        speed = t_lat / s_lat
        goals.append(_goal(f"student latency >= {limits.min_speedup:g}x lower", speed >= limits.min_speedup,
                           f"{speed:.2f}x, median {t_lat:.1f} vs {s_lat:.1f} ms/request"))
    if limits.kd_beats_sft and "sft_baseline" in results and s["accuracy"] is not None:
        b = results["sft_baseline"]["accuracy"]
        goals.append(_goal("KD student beats the SFT-only student at equal data", s["accuracy"] > b,
                           f"{s['accuracy']:.3f} vs {b:.3f}"))
    drop = limits.max_quantized_accuracy_drop
    if drop is not None and "quantized" in results and s["accuracy"] is not None:
        q = results["quantized"]["accuracy"]
        name = f"quantized student within {drop * 100:g} point{'s' if drop != 0.01 else ''} of the unquantized student"
        goals.append(_goal(name, None, results["quantized"].get("generation_skipped", "no accuracy")) if q is None
                     else _goal(name, abs(s["accuracy"] - q) <= drop + 1e-9, f"{q:.3f} vs {s['accuracy']:.3f}"))
    return goals


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write_report(summary: dict[str, Any], out: Path) -> Path:
    """report.md with the table and goals, plus accuracy_vs_params.png and latency.png."""
    models = summary["models"]
    lines = [f"# Evaluation on {summary['rows']} held-out rows", "",
             "| model | parameters | weights MB | accuracy | top-1 agreement | KL to teacher | perplexity | "
             "latency ms/request | median ms/request | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for role, r in models.items():
        lines.append(f"| {ROLES.get(role, role)} | {r['parameters']:,} | {_fmt(r['weights_mb'], '.1f')} | "
                     f"{_fmt(r['accuracy'], '.3f')} | {_fmt(r['top1_agreement'], '.3f')} | "
                     f"{_fmt(r['kl_to_teacher'], '.4f')} | {_fmt(r['perplexity'], '.3f')} | "
                     f"{_fmt(r['latency_ms'], '.1f')} | {_fmt(r.get('latency_p50_ms'), '.1f')} | "
                     f"{_fmt(r['tokens_per_s'], '.0f')} |")
    lines += ["", "Agreement, KL and perplexity are teacher-forced on the teacher's greedy responses (KL over the "
              "teacher's top-k + tail buckets, T=1)."]
    for role, r in models.items():
        if r.get("generation_skipped"):
            lines += ["", f"{ROLES.get(role, role)}: {r['generation_skipped']}."]
    reused = [f"{ROLES.get(role, role)} ({r['evaluated_at']})" for role, r in models.items() if r.get("reused")]
    if reused:
        lines += ["", "Unchanged since an earlier evaluation, results reused (`evaluate.reuse`): "
                  + ", ".join(reused) + "."]
    lines += ["", "## Goals", ""]
    for g in summary["goals"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[g["pass"]]
        lines.append(f"- {mark}: {g['goal']} ({g['detail']})")
    plots = _plots(models, out)
    lines += [""] + [f"![{name}]({name})" for name in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plots(models: dict[str, dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for role, r in models.items():
        if r["accuracy"] is not None:
            ax.scatter(r["parameters"], r["accuracy"])
            ax.annotate(ROLES.get(role, role), (r["parameters"], r["accuracy"]), xytext=(4, 2),
                        textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.35, y=0.12)  # room for the labels right of the points
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out accuracy")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_params.png", dpi=100)
    plt.close(fig)
    names.append("accuracy_vs_params.png")
    timed = {ROLES.get(k, k): v["latency_ms"] for k, v in models.items() if v["latency_ms"]}
    if timed:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(list(timed), list(timed.values()))
        ax.set_ylabel("latency per request, ms")
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
        names.append("latency.png")
    if (out / "train_loss.png").exists():
        names.append("train_loss.png")
    return names
