"""Find the student the train stage wrote, and merge a LoRA adapter into its base when that is what it is.

Quantizers, vLLM and the evaluation's scorers take a plain HF causal-LM directory, so an adapter is folded into
its base first with PEFT's `merge_and_unload` (W + B·A·scale, exact up to float rounding) and saved as ordinary
weights. Shared by the sample, quantize and evaluate stages, which is why it lives with the models, below them.
The base may be a hub model: its id and the commit the train stage pinned come from the student's lineage.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from pipeline.errors import ModelError
from pipeline.models.load import is_local


class StudentFiles(NamedTuple):
    kind: str  # "model" (full weights) or "adapter" (LoRA)
    path: Path
    base: str | None  # the adapter's base model (hub id or directory)
    base_revision: str | None  # the base's hub commit, as the train stage pinned it


def find_student(student_dir: str) -> StudentFiles:
    """The train stage's output: full weights (`model/`) or a LoRA adapter (`adapter/`) with its base.

    Full weights win when both exist: the train stage writes `model/` beside `adapter/` only when told to
    merge, and then `model/` is that merge."""
    root = Path(student_dir)
    if (root / "model" / "config.json").exists():
        return StudentFiles("model", root / "model", None, None)
    adapter = root / "adapter"
    if (adapter / "adapter_config.json").exists():
        lineage = root / "lineage.json"
        record = json.loads(lineage.read_text()) if lineage.exists() else {}
        base, revision = record.get("student_base"), record.get("student_revision")
        if base:
            from pipeline import storage

            base = storage.local_of(base)  # a base in a URI run root, recorded as its URI
        if not base:
            config = json.loads((adapter / "adapter_config.json").read_text())
            base, revision = config.get("base_model_name_or_path"), config.get("revision")
        if not base:
            raise ModelError(f"The adapter in {adapter} does not say which base model it belongs to; set "
                             "base_model_name_or_path in its adapter_config.json.")
        if is_local(base) and not (Path(base).expanduser() / "config.json").exists():
            raise ModelError(f"The LoRA adapter in {adapter} was trained on {base}, which is not there any more; "
                             "restore that base model (or point student_base in lineage.json at a copy).")
        return StudentFiles("adapter", adapter, base, revision)
    raise ModelError(f"No student in {student_dir} (neither model/ nor adapter/); run ray_jobs/train.py with the "
                     "same paths.run_root first.")


def merge_adapter(adapter_dir: str | Path, base: str, out_dir: str | Path, dtype: str = "float32",
                  revision: str | None = None) -> Path:
    """Base (a directory, or a hub id at `revision`) + adapter → one HF directory (weights and tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, revision=revision, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir)
    own = (Path(adapter_dir) / "tokenizer_config.json").exists()
    AutoTokenizer.from_pretrained(adapter_dir if own else base, revision=None if own else revision).save_pretrained(out_dir)
    return out_dir


def full_weights(student_dir: str, merged: Path) -> Path:
    """A train-stage output as full weights: `model/`, or the adapter merged into its base at `merged` (merged afresh
    on every run, so a retrained adapter is never shadowed by an older merge)."""
    from pipeline import storage

    kind, source, base, revision = find_student(student_dir)
    if kind == "model":
        return source
    storage.remove(merged)
    merge_adapter(source, base, merged, revision=revision)
    storage.push(merged)  # at a URI run root, where the engines on other nodes fetch it
    return merged
