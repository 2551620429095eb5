"""Which model the serve stage hosts: `serve.model_path` when set (a directory, or a hub id at
`serve.model_revision`, pinned to its commit), else the newest student under the run root — the quantize
stage's output when present, else the train stage's full (or merged) weights.

A LoRA-only student is refused with one sentence rather than served as base + adapter: the quantize stage
merges adapters, and serving one merged directory keeps every replica's engine identical and simple.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ModelError
from pipeline.serve.config import ServeStage

log = logging.getLogger("ray_distill.serve")


@dataclass
class ServedModel:
    path: str  # a directory or a hub id
    source: str  # "model_path", "quantized" or "student"
    revision: str | None = None  # a hub model's commit


def is_quantized(model: ServedModel) -> bool:
    """Whether the checkpoint carries a quantization config (then it picks its own dtype)."""
    from pipeline.models.load import local_files

    folder = local_files(model.path, model.revision)
    if folder is None or not (folder / "config.json").is_file():
        return model.source == "quantized"
    return "quantization_config" in json.loads((folder / "config.json").read_text())


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _newest_mtime(path: Path) -> float:
    return max((p.stat().st_mtime for p in path.iterdir() if p.is_file()), default=0.0)


def resolve_model(stage: ServeStage) -> ServedModel:
    """The HF directory to serve, or one sentence saying what is missing and which stage makes it."""
    from pipeline.models.load import is_local, resolve_revision

    explicit = stage.serve.model_path
    if explicit and not is_local(explicit):  # a hub id: every replica loads the commit its revision points at now
        return ServedModel(explicit, "model_path", resolve_revision(explicit, stage.serve.model_revision,
                                                                     "serve.model_path"))
    if explicit:
        path = Path(explicit).expanduser()
        if not _is_hf_dir(path):
            raise ModelError(f"serve.model_path={explicit} is not an HF model directory (no config.json); "
                             "point it at a saved model directory.")
        return ServedModel(str(path), "model_path")

    quantized = Path(stage.paths.quantized_dir)
    student_dir = Path(stage.paths.student_dir)
    full = student_dir / "model"
    if _is_hf_dir(quantized):
        if _is_hf_dir(full) and _newest_mtime(full) > _newest_mtime(quantized):
            log.warning("serve: the student in %s is newer than the quantized one in %s; serving the quantized "
                        "one (run the quantize stage again, or set serve.model_path=%s)", full, quantized, full)
        return ServedModel(str(quantized), "quantized")
    if _is_hf_dir(full):
        return ServedModel(str(full), "student")
    adapter = student_dir / "adapter"
    if (adapter / "adapter_config.json").is_file():
        base = _lineage_base(student_dir)
        raise ModelError(f"The student in {student_dir} is a LoRA adapter only (base {base}); run the quantize "
                         "stage (it merges the adapter), train with train.merge=true, or set "
                         "serve.model_path to a merged model directory.")
    raise ModelError(f"No student to serve under {stage.paths.run_root} (neither {quantized} nor {full} exists); "
                     "run the train stage (and quantize) first, or set serve.model_path to an HF model directory.")


def _lineage_base(student_dir: Path) -> str:
    try:
        return json.loads((student_dir / "lineage.json").read_text()).get("student_base", "unknown")
    except (OSError, ValueError):
        return "unknown"
