"""Online distillation terms, pure functions of tensors: the teacher is alive in the train worker, so its full
vocabulary, its hidden states and its attention maps are there to match (ms-swift's second and third levels of
transfer, after the logits).

- `full_vocab_kd`: a `DIVERGENCES` divergence between the teacher's and the student's whole next-token
  distributions (no top-k, no tail bucket).
- `hidden_loss`: relative MSE or cosine distance between a student block's output, projected to the teacher's width
  where the widths differ, and the mapped teacher block's output (TinyBERT, DistilBERT).
- `attention_kl`: KL between the teacher's and the student's attention distributions of mapped layers, per query
  position, heads averaged when the counts differ (TinyBERT's attention transfer).

`layer_pairs` gives the layer map. Shapes: B batch, S sequence, V vocabulary, H width, heads h. Masks are 1 where a
position counts.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.losses.kd import DIVERGENCES, _masked_mean, temper

HIDDEN_LOSSES = ("mse", "cosine")


def layer_pairs(student_layers: int, teacher_layers: int,
                explicit: list[list[int]] | None = None) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs, 0-based: `explicit` as given, else every student block mapped to the
    teacher block at the same relative depth (evenly spaced: the last maps to the last; equal depths map i to i)."""
    if explicit:
        pairs = [(int(s), int(t)) for s, t in explicit]
        for s, t in pairs:
            if not (0 <= s < student_layers and 0 <= t < teacher_layers):
                raise ValueError(f"loss.layer_map pair [{s}, {t}] is outside the student's {student_layers} or the "
                                 f"teacher's {teacher_layers} blocks (0-based); map blocks that exist.")
        return pairs
    # the teacher block whose depth first reaches the student block's: ceil((s+1)·T/S) − 1, in integers (a student
    # deeper than its teacher maps several blocks to one, never to a block before the first)
    return [(s, -(-(s + 1) * teacher_layers // student_layers) - 1) for s in range(student_layers)]


def full_vocab_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0, divergence: str = "forward_kl", **divergence_kwargs) -> torch.Tensor:
    """T²·D(teacher_T, student_T) over the whole vocabulary, averaged over scored positions; logits [B, S, V] (the
    teacher's may have more padded rows than the student's, as Qwen's 7B has over its 0.5B: both are cut to the
    common size, which holds every token the shared tokenizer makes)."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    t_log = temper(torch.log_softmax(teacher_logits[..., :v].float(), dim=-1), temperature)
    s_log = temper(torch.log_softmax(student_logits[..., :v].float(), dim=-1), temperature)
    return temperature**2 * DIVERGENCES[divergence](t_log, s_log, mask, **divergence_kwargs)


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor,
                kind: str = "mse") -> torch.Tensor:
    """Distance between hidden states [B, S, H] of equal width (project the student's first), averaged over the
    positions of `mask` [B, S]. mse: the squared error per position relative to the teacher's squared norm there,
    ‖s − t‖² / ‖t‖² (0 when equal, 1 for a student at zero), so the term is of order 1 whatever the scale of the
    teacher's residual stream (hundreds per element in large models, and in the tiny test teacher); cosine: 1 − cos
    per position (DistilBERT's)."""
    s, t = student_hidden.float(), teacher_hidden.float().detach()
    if kind == "mse":
        per_pos = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-12)
    elif kind == "cosine":
        per_pos = 1 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"loss.hidden_loss={kind!r} is not one of {', '.join(HIDDEN_LOSSES)}.")
    return _masked_mean(per_pos, mask)


def attention_kl(teacher_maps: torch.Tensor, student_maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) between attention distributions [B, heads, S, S] (each query row sums to 1), averaged
    over heads and over the query positions of `mask` [B, S] (key positions outside it carry no weight already).
    Equal head counts compare head by head; otherwise each side's heads are averaged first."""
    t, s = teacher_maps.float().detach(), student_maps.float()
    if t.shape[1] != s.shape[1]:
        t, s = t.mean(1, keepdim=True), s.mean(1, keepdim=True)
    t_log = t.clamp(min=1e-30).log()
    s_log = s.clamp(min=1e-30).log()
    per_row = torch.where(t > 0, t * (t_log - s_log), torch.zeros_like(t)).sum(-1).mean(1)  # [B, S]
    return _masked_mean(per_row, mask)


def feature_terms(weights: dict[str, float], mask: torch.Tensor, attention_mask: torch.Tensor,
                  student: dict[str, Any], teacher: dict[str, Any], pairs: list[tuple[int, int]],
                  projections, loss: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The online terms with a weight above 0, each unweighted: online_kd on the scored positions (`mask`), hidden
    and attention over every real token (`attention_mask`), averaged over the layer pairs. `student`/`teacher`:
    {"logits": [B, S, V], "hidden": {block: [B, S, H]}, "maps": {block: [B, h, S, S]}}; `projections[i]` maps the
    i-th pair's student width to the teacher's."""
    terms: dict[str, torch.Tensor] = {}
    if weights.get("online_kd", 0) > 0:
        terms["online_kd"] = full_vocab_kd(student["logits"], teacher["logits"], mask, loss["temperature"],
                                           loss["divergence"], **loss["divergence_kwargs"])
    if weights.get("hidden", 0) > 0:
        terms["hidden"] = torch.stack([
            hidden_loss(projections[i](student["hidden"][s]), teacher["hidden"][t], attention_mask, loss["hidden_loss"])
            for i, (s, t) in enumerate(pairs)]).mean()
    if weights.get("attention", 0) > 0:
        terms["attention"] = torch.stack([attention_kl(teacher["maps"][t], student["maps"][s], attention_mask)
                                          for s, t in pairs]).mean()
    return terms
