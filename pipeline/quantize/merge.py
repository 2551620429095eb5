"""Find the student the train stage wrote, and merge a LoRA adapter into its base when that is what it is.

Quantizers take a plain HF causal-LM directory, so an adapter is folded into its base first with PEFT's
`merge_and_unload` (W + B·A·scale, exact up to float rounding) and saved as ordinary weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import ModelError


def find_student(student_dir: str) -> tuple[str, Path, str | None]:
    """("model", dir, None) for full weights, ("adapter", dir, base) for a LoRA adapter.

    Full weights win when both exist: the train stage writes `model/` beside `adapter/` only when told to
    merge, and then `model/` is that merge."""
    root = Path(student_dir)
    if (root / "model" / "config.json").exists():
        return "model", root / "model", None
    adapter = root / "adapter"
    if (adapter / "adapter_config.json").exists():
        lineage = root / "lineage.json"
        base = json.loads(lineage.read_text()).get("student_base") if lineage.exists() else None
        base = base or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelError(f"The adapter in {adapter} does not say which base model it belongs to; set "
                             "base_model_name_or_path in its adapter_config.json.")
        if base.startswith(("/", ".", "~")) and not (Path(base) / "config.json").exists():
            raise ModelError(f"The LoRA adapter in {adapter} was trained on {base}, which is not there any more; "
                             "restore that base model (or point student_base in lineage.json at a copy).")
        return "adapter", adapter, base
    raise ModelError(f"No student in {student_dir} (neither model/ nor adapter/); run ray_jobs/train.py with the "
                     "same paths.run_root first.")


def merge_adapter(adapter_dir: str | Path, base: str, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Base + adapter → one HF directory (weights and tokenizer) at out_dir."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists()
                                  else base).save_pretrained(out_dir)
    return out_dir
