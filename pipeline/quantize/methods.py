"""Each configured method as the GPTQModel config that implements it, and the quantize-and-save call.

GPTQModel (the maintained successor of auto-gptq) implements GPTQ, AWQ, FP8 and bitsandbytes behind one
`load → quantize → save` API and writes HF directories with a `quantization_config` that transformers and
vLLM read. Nothing here re-implements a quantization kernel.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.quantize.config import QuantizeConfig


def gptqmodel_config(q: QuantizeConfig):
    from gptqmodel import QuantizeConfig as GPTQConfig
    from gptqmodel.quantization.config import AWQConfig, BitsAndBytesConfig, FP8Config

    if q.method == "gptq":
        return GPTQConfig(bits=q.bits, group_size=q.group_size, desc_act=q.desc_act, sym=q.sym,
                          damp_percent=q.damp_percent)
    if q.method == "awq":
        return AWQConfig(bits=q.bits, group_size=q.group_size, sym=q.sym)
    if q.method == "fp8":
        # block scales are the FP8 layout both vLLM and transformers read (per-row scales are not)
        return FP8Config(weight_scale_method="block", weight_block_size=[q.fp8_block_size, q.fp8_block_size])
    return BitsAndBytesConfig(bits=q.bits, format=q.bnb_format)


def quantize_and_save(src: str | Path, out: str | Path, q: QuantizeConfig, calibration: list[dict[str, Any]],
                      device: str) -> None:
    """Quantize the HF model at src with GPTQModel and save the HF directory (weights, tokenizer) at out."""
    # GPTQModel's CPU pool refuses to start with fewer workers than it plans to use ("Virtual pool requests
    # 2 workers"); set before gptqmodel is imported
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(q.cpu_workers))
    from gptqmodel import GPTQModel

    model = GPTQModel.load(str(src), gptqmodel_config(q), device=device)
    model.quantize(calibration, batch_size=1)
    model.save(str(out))
    if q.method == "fp8":
        # vLLM's FP8 loader requires activation_scheme; weight-only FP8 quantizes activations on the fly
        path = Path(out) / "config.json"
        config = json.loads(path.read_text())
        config["quantization_config"].setdefault("activation_scheme", "dynamic")
        path.write_text(json.dumps(config, indent=2))
