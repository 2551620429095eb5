"""The quantize stage's typed config, and every check that can fail before a model is loaded.

Each method says here what it needs (packages, a CUDA GPU), so a method that cannot run where it was
asked to fails with one sentence in the driver instead of deep inside GPTQModel after minutes of work.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ClusterConfig, PathsConfig, heldout_fraction, resolve, to_dataclass
from pipeline.errors import ConfigError, ModelError


@dataclass(frozen=True)
class Method:
    """What a quantization method needs and what it writes."""

    bits: tuple[int, ...]
    needs_gpu: str | None  # why it needs a CUDA GPU, or None when it runs on CPU too
    packages: tuple[str, ...]  # importable module names
    calibrated: bool  # uses calibration rows


METHODS: dict[str, Method] = {
    # GPTQModel's GPTQ runs on CPU and GPU; vLLM (CPU and CUDA) and transformers (through optimum) read it
    "gptq": Method(bits=(2, 3, 4, 8), needs_gpu=None, packages=("gptqmodel", "optimum"), calibrated=True),
    # GPTQModel's AWQ scale search raises "CUDA is not available" on CPU (measured with GPTQModel 7.6)
    "awq": Method(bits=(4,), needs_gpu="GPTQModel's AWQ scale search runs on CUDA only",
                  packages=("gptqmodel",), calibrated=True),
    # FP8 weights quantize on CPU, but vLLM's CPU build has no FP8 matmul kernel to serve them ("Failed to
    # find a kernel that can implement the ScaledMM linear layer"), so the artifact is only useful on a GPU
    "fp8": Method(bits=(8,), needs_gpu="vLLM serves FP8 weights only on a CUDA GPU with FP8 support "
                  "(compute capability 8.9+, such as an L4 or H100)", packages=("gptqmodel",), calibrated=False),
    # bitsandbytes kernels are CUDA kernels, and the package is not part of the CPU install
    "bnb": Method(bits=(4, 8), needs_gpu="bitsandbytes quantizes and runs on CUDA GPUs",
                  packages=("gptqmodel", "bitsandbytes"), calibrated=False),
}


@dataclass
class QualityLimits:
    """Largest allowed drop of each gate figure (None leaves a figure ungated but still recorded)."""

    perplexity: float | None = 0.05  # relative increase
    top1_agreement: float | None = 0.05  # lost agreement, fraction of scored tokens
    kl_to_teacher: float | None = 0.05  # added nats per token


@dataclass
class QuantizeConfig:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.05
    fp8_block_size: int = 128
    bnb_format: str = "nf4"
    calibration_rows: int = 256
    calibration_max_tokens: int = 512
    max_heldout_rows: int = 256
    eval_batch_size: int = 8
    max_quality_drop: QualityLimits = field(default_factory=QualityLimits)
    num_cpus: float = 1
    num_gpus: float = 0
    cpu_workers: int = 2

    def validate(self) -> None:
        """Everything about the quantize config that can be wrong before a model is loaded."""
        if self.method not in METHODS:
            raise ConfigError(f"quantize.method={self.method!r} is not a method; use one of {sorted(METHODS)}.")
        method = METHODS[self.method]
        if self.bits not in method.bits:
            raise ConfigError(f"quantize.bits={self.bits} is not available for {self.method}; use one of "
                              f"{list(method.bits)}.")
        if self.group_size != -1 and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise ConfigError(f"quantize.group_size={self.group_size} must be -1 (one group per row) or a power "
                              "of two from 16 up.")
        if self.bnb_format not in ("nf4", "fp4", "int8"):
            raise ConfigError(f"quantize.bnb_format={self.bnb_format!r}; use nf4 or fp4 (4-bit) or int8 (8-bit).")
        if self.method == "bnb" and (self.bits == 8) != (self.bnb_format == "int8"):
            raise ConfigError(f"quantize.bnb_format={self.bnb_format} does not fit quantize.bits={self.bits}; "
                              "int8 is the 8-bit format, nf4 and fp4 the 4-bit ones.")
        for name in ("calibration_rows", "calibration_max_tokens", "max_heldout_rows", "eval_batch_size",
                     "cpu_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quantize.{name}={getattr(self, name)} must be at least 1.")
        limits = asdict(self.max_quality_drop)
        if all(v is None for v in limits.values()):
            raise ConfigError("quantize.max_quality_drop leaves every figure ungated; set at least one limit.")
        for name, limit in limits.items():
            if limit is not None and limit < 0:
                raise ConfigError(f"quantize.max_quality_drop.{name}={limit} must be >= 0 (or null to leave it ungated).")
        if method.needs_gpu and self.num_gpus < 1:
            raise ConfigError(f"quantize.method={self.method} needs a CUDA GPU ({method.needs_gpu}); set "
                              "quantize.num_gpus=1 and run it on a cluster with GPUs, or use quantize=gptq_w4 on CPU.")


@dataclass
class QuantizeStage:
    """Everything the quantize stage reads, resolved and typed."""

    paths: PathsConfig
    cluster: ClusterConfig
    quantize: QuantizeConfig
    # the train stage's held-out rows (top-level heldout_fraction): the gate scores them, calibration never uses them
    heldout_fraction: float = 0.05


def quantize_stage(cfg: Any) -> QuantizeStage:
    plain = resolve(cfg)
    stage = QuantizeStage(
        paths=to_dataclass(PathsConfig, plain["paths"], "paths"),
        cluster=to_dataclass(ClusterConfig, plain["cluster"], "cluster"),
        quantize=to_dataclass(QuantizeConfig, plain["quantize"], "quantize"),
        heldout_fraction=heldout_fraction(plain),
    )
    stage.quantize.validate()
    if stage.heldout_fraction == 0:
        raise ConfigError("heldout_fraction=0 holds no labeled row out, so the quantize gate would score rows the "
                          "student trained on; set heldout_fraction above 0 (0.05 by default).")
    return stage


def missing_packages(method: str) -> list[str]:
    return [name for name in METHODS[method].packages if importlib.util.find_spec(name) is None]


def check_group_size(q: QuantizeConfig, model: str | Path, revision: str | None = None) -> None:
    """GPTQ/AWQ groups run along each linear layer's input dimension, so the group must divide it."""
    if q.method not in ("gptq", "awq") or q.group_size == -1:
        return
    from transformers import AutoConfig

    try:
        text = AutoConfig.from_pretrained(str(model), revision=revision).get_text_config()
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot read the student's config from {model} ({str(e).splitlines()[0][:160]}).") from None
    widths = {"hidden_size": getattr(text, "hidden_size", None),
              "intermediate_size": getattr(text, "intermediate_size", None)}
    bad = {k: v for k, v in widths.items() if v and v % q.group_size}
    if bad:
        name, width = next(iter(bad.items()))
        raise ConfigError(f"quantize.group_size={q.group_size} does not divide the student's {name} ({width}); "
                          "pick a group size that divides it (e.g. 32 or 64) or -1.")
