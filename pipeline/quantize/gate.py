"""The quality gate: the same held-out figures for the student before and after quantization.

Perplexity on the teacher's responses, top-1 agreement with the teacher, and KL(teacher ‖ student) over
the teacher's top-k + tail bucket (the label format keeps no more of the teacher). Each figure has its own
limit in `quantize.max_quality_drop`: relative perplexity increase, lost top-1 agreement as a fraction of
the scored tokens, and added KL in nats per token.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.errors import DistillError


class QualityGateError(DistillError):
    """The quantized student lost more quality than allowed."""


def score(model, rows: pa.Table, k: int, batch_size: int, pad_id: int, max_seq_len: int = 4096) -> dict[str, Any]:
    """Perplexity, top-1 agreement and mean KL to the teacher over every scored response token of `rows`: the
    teacher-forced metrics of `pipeline.metrics`, as the train stage's held-out scoring and evaluate compute them."""
    import torch

    from pipeline.data.batches import collate
    from pipeline.metrics import summarize, teacher_forced_sums

    sums = {"tokens": 0.0, "agree": 0.0, "kl": 0.0, "nll": 0.0}
    columns = {c: rows.column(c).to_pylist() for c in rows.column_names}
    with torch.no_grad():
        for start in range(0, rows.num_rows, batch_size):
            b = collate({c: v[start:start + batch_size] for c, v in columns.items()}, k=k, max_seq_len=max_seq_len,
                        pad_id=pad_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            part = teacher_forced_sums(logits, b["labels"], b["loss_mask"], b["teacher_ids"], b["teacher_logprobs"],
                                       b["teacher_tail"])
            sums = {name: sums[name] + part[name] for name in sums}
    figures = summarize(sums)
    return {"perplexity": figures["perplexity"], "top1_agreement": figures["top1_agreement"],
            "kl_to_teacher": figures["kl_to_teacher"], "tokens": figures["scored_tokens"], "rows": rows.num_rows}


def drops(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """How much worse `after` is than `before` on each figure (positive = worse)."""
    return {
        "perplexity": after["perplexity"] / before["perplexity"] - 1.0,
        "top1_agreement": before["top1_agreement"] - after["top1_agreement"],
        "kl_to_teacher": after["kl_to_teacher"] - before["kl_to_teacher"],
    }


def verdict(before: dict[str, Any], after: dict[str, Any], limits: dict[str, float | None]) -> dict[str, Any]:
    """Gate result: passed unless a gated figure dropped more than its limit; `worst` is the figure
    furthest over (or nearest to) its limit."""
    d = drops(before, after)
    gated = {name: limit for name, limit in limits.items() if limit is not None}
    worst = max(gated, key=lambda name: d[name] - gated[name])
    return {"unquantized": before, "quantized": after, "drop": d, "max_quality_drop": limits,
            "passed": all(d[name] <= limit for name, limit in gated.items()), "worst": worst}


def failure_sentence(gate: dict[str, Any], method: str, bits: int, where: str) -> str:
    name = gate["worst"]
    b, a, d = gate["unquantized"][name], gate["quantized"][name], gate["drop"][name]
    what = {"perplexity": f"perplexity rose {d:.1%} ({b:.3g} -> {a:.3g})",
            "top1_agreement": f"top-1 agreement with the teacher fell {d:.3f} ({b:.3f} -> {a:.3f})",
            "kl_to_teacher": f"KL to the teacher rose {d:.3f} nats ({b:.3f} -> {a:.3f})"}[name]
    return (f"The {bits}-bit {method} student failed the quality gate: {what} on "
            f"{gate['quantized']['tokens']} held-out tokens, more than quantize.max_quality_drop.{name}="
            f"{gate['max_quality_drop'][name]}; use more bits or calibration rows, or raise the limit "
            f"(the rejected model and its figures are in {where}).")
