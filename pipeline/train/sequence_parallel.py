"""Ulysses sequence parallelism: each rank of a group holds a slice of every sequence.

Attention is the only layer that needs the whole sequence; DeepSpeed's `UlyssesSPAttentionHF` wraps the
student's attention with two all-to-alls (sequence-sharded → head-sharded → back), so every other layer,
the LM head and the loss run on the local slice. What this module adds around it:

- `exchange`: every rank still reads its own data shard; the ranks of a group take turns, so the group
  processes rank 0's micro-batch, then rank 1's, … each split along the sequence (ALST's data adapter,
  generalised to the sparse teacher tensors, which are [B, L, k] rather than [B, L]).
- `split`: the shifted targets are built on the whole sequence before it is cut, so position j of a slice
  still predicts token j+1 even when j+1 lives on the next rank; the sequence is padded on the right to a
  multiple of the group size (right padding + causal attention leaves the real tokens untouched).
- `loss_weight`: each rank's masked-mean loss is weighted by its share of the sequence's loss tokens, so
  the group's losses add up to the unsplit loss; DeepSpeed averages gradients over data × sequence ranks,
  which the factor `size` undoes for the sequence part.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def check_heads(num_heads: int, num_kv_heads: int, size: int, name: str) -> str | None:
    """Why `size` ranks cannot split this student's attention, or None when they can."""
    if num_heads % size:
        return (f"train.sequence_parallel_size={size} does not divide the {num_heads} attention heads of {name}; "
                "pick a size that divides them.")
    if num_kv_heads % size and size % num_kv_heads:
        return (f"train.sequence_parallel_size={size} and the {num_kv_heads} key/value heads of {name} do not "
                "divide one another; pick a size that does.")
    return None


def register(model, size: int, micro_batch_size: int):
    """Route the student's sdpa attention through Ulysses; returns DeepSpeed's sequence-parallel `mpu`."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=size,
        micro_batch_size=micro_batch_size, seq_length_is_variable=True)


def exchange(batches: Iterable[dict[str, Any]], group, size: int) -> Iterator[dict[str, Any]]:
    """Each rank's numpy micro-batches → the group's micro-batches, in the same order on every rank."""
    import torch.distributed as dist

    for rows in batches:
        gathered: list[Any] = [None] * size
        dist.all_gather_object(gathered, rows, group=group)
        yield from gathered


def split(batch: dict[str, torch.Tensor], rank: int, size: int, micro_batch_size: int) -> dict[str, torch.Tensor]:
    """A collated batch (input [B, L], targets [B, L-1]) → this rank's slice of the sequence.

    Returns input_ids, position_ids [B', C]; labels, loss_mask [B', C]; teacher_* [B', C(, k)] with
    C = ceil(L / size), B' = micro_batch_size (short batches get empty rows: Ulysses needs a fixed batch
    size). `total_tokens` is the whole batch's loss-token count, the same on every rank of the group.
    """
    b, length = batch["input_ids"].shape
    chunk = -(-length // size)
    padded = chunk * size
    out = {"total_tokens": batch["loss_mask"].sum()}
    for key, value in batch.items():
        if key == "attention_mask":  # causal attention over right-padded rows needs no mask
            continue
        pad_len = padded - value.shape[1]
        widths = [0, 0] * (value.dim() - 2) + [0, pad_len, 0, micro_batch_size - b]
        fill = -30.0 if key == "teacher_logprobs" else 0  # what collate pads with: finite, masked out
        value = torch.nn.functional.pad(value, widths, value=fill)
        out[key] = value[:, rank * chunk:(rank + 1) * chunk]
    positions = torch.arange(padded).expand(micro_batch_size, padded)
    out["position_ids"] = positions[:, rank * chunk:(rank + 1) * chunk]
    return out


def loss_weight(local_mask: torch.Tensor, total_tokens: torch.Tensor) -> float:
    """This rank's share of the batch's loss tokens (its masked mean × share sums to the whole mean)."""
    return float(local_mask.sum() / total_tokens.clamp(min=1))
