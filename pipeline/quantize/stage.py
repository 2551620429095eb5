"""The quantize stage: student (merged if LoRA) → GPTQModel → an HF directory vLLM serves, behind a quality gate.

The driver checks everything checkable before any work (config, method vs. hardware, packages, group size
vs. the student's widths, the labels and the held-out split), then runs one Ray task with the configured
CPUs/GPUs — so `ray job submit` puts the work on a GPU node of a cluster — that merges, scores the student,
quantizes, scores the result, and writes into a staging folder. The driver writes the manifest, lineage
and model card, and publishes the folder as `paths.quantized_dir` only when the gate passes.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.data.schema import read_manifest
from pipeline.errors import ConfigError, ModelError
from pipeline.quantize.card import write_card
from pipeline.quantize.config import METHODS, QuantizeConfig, check_group_size, missing_packages, quantize_stage
from pipeline.quantize.data import calibration_examples, split_record, split_rows
from pipeline.quantize.gate import QualityGateError, failure_sentence, verdict
from pipeline.models.merge import find_student

log = logging.getLogger("ray_distill.quantize")


def quantize_task(spec: dict[str, Any], held, calib) -> dict[str, Any]:
    """The Ray task: merge → score → quantize → score; writes the quantized model into spec['staging']."""
    import torch

    from pipeline.config import to_dataclass

    q = to_dataclass(QuantizeConfig, spec["quantize"], "quantize")
    missing = missing_packages(q.method)
    if missing:  # checked again here: on a cluster the worker's environment is the one that matters
        raise ModelError(f"quantize.method={q.method} needs the Python package(s) {missing} on the worker; add "
                         "them to the cluster's runtime_env or image.")
    gpu = q.num_gpus > 0 and torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    staging = Path(spec["staging"])
    src, timings = Path(spec["source"]), {}
    storage.pull(src)  # at a URI run root, this node's copy of the student is brought up to date
    shutil.rmtree(staging, ignore_errors=True)  # on this node: nothing stale goes up with the new model
    if spec["kind"] == "adapter":
        storage.fetched(spec["base"])  # a base model in the run root (a tiny one built there)
    t0 = time.perf_counter()
    if spec["kind"] == "adapter":
        from pipeline.models.merge import merge_adapter

        print(f"quantize: merging the LoRA adapter {src} into {spec['base']}", flush=True)
        src = merge_adapter(src, spec["base"], staging.parent / f".{staging.name}-merged",
                            revision=spec["base_revision"])
        timings["merge_s"] = round(time.perf_counter() - t0, 2)
    # the gate compares like with like: both models in float32 on CPU, bfloat16 on GPU
    eval_dtype = torch.bfloat16 if gpu else torch.float32
    before = _score(src, held, spec, eval_dtype, device)
    print(f"quantize: unquantized student on {before['tokens']} held-out tokens: perplexity "
          f"{before['perplexity']:.4g}, top-1 agreement {before['top1_agreement']:.3f}, KL {before['kl_to_teacher']:.4f}",
          flush=True)
    t1 = time.perf_counter()
    print(f"quantize: {q.method} {q.bits}-bit on {device}, calibrating on {calib.num_rows} labeled rows", flush=True)
    from pipeline.quantize.methods import quantize_and_save

    quantize_and_save(src, staging, q, calibration_examples(calib, q.calibration_max_tokens), device)
    timings["quantize_s"] = round(time.perf_counter() - t1, 2)
    after = _score(staging, held, spec, eval_dtype, device)
    print(f"quantize: quantized student: perplexity {after['perplexity']:.4g}, top-1 agreement "
          f"{after['top1_agreement']:.3f}, KL {after['kl_to_teacher']:.4f}", flush=True)
    from pipeline.models.load import count_parameters

    sizes = {"source_params": count_parameters(src), "quantized_bytes": _weights_bytes(staging)}
    sizes["bf16_bytes"] = 2 * sizes["source_params"]
    sizes["ratio_to_bf16"] = round(sizes["quantized_bytes"] / sizes["bf16_bytes"], 4)
    if spec["kind"] == "adapter":
        shutil.rmtree(src, ignore_errors=True)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    storage.push(staging)  # at a URI run root, for the driver on its node
    return {"gate": verdict(before, after, asdict(q.max_quality_drop)), "sizes": sizes, "timings": timings,
            "device": device, "eval_dtype": str(eval_dtype).removeprefix("torch.")}


def _score(model_dir: Path, held, spec: dict[str, Any], dtype, device: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.quantize.gate import score

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map=device).eval()
    pad = getattr(model.config, "pad_token_id", None) or 0
    try:
        return score(model, held, k=spec["k"], batch_size=spec["quantize"]["eval_batch_size"], pad_id=pad)
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def check_cluster_gpus(q: QuantizeConfig, gpus: float) -> None:
    if q.num_gpus > 0 and gpus < q.num_gpus:
        raise ConfigError(f"quantize.num_gpus={q.num_gpus} but the Ray cluster has {gpus:g} GPU(s); submit to a "
                          "cluster with GPUs"
                          + (" (this method needs one)." if METHODS[q.method].needs_gpu else
                             ", or set quantize.num_gpus=0 to quantize on CPU."))


def run(cfg: Any) -> dict[str, Any]:
    """Quantize the student under the run root; returns the manifest written beside the model."""
    import ray

    from pipeline.runtime import init_ray, is_embedded, local_resources

    stage = quantize_stage(cfg)
    q, paths = stage.quantize, stage.paths
    if is_embedded(stage.cluster):  # before a Ray that could not run the task starts
        check_cluster_gpus(q, local_resources(stage.cluster)["GPU"])
    missing = missing_packages(q.method)
    if missing and not METHODS[q.method].needs_gpu:  # GPU methods are checked on the GPU worker
        raise ConfigError(f"quantize.method={q.method} needs the Python package(s) {missing}; install the "
                          "project's `quant` extra (pip install -e '.[quant]').")
    kind, source, base, base_revision = find_student(paths.student_dir)
    check_group_size(q, source if kind == "model" else base, None if kind == "model" else base_revision)
    labels = read_manifest(paths.labels_dir)
    held, calib = split_rows(paths.labels_dir, stage.heldout_fraction, q.max_heldout_rows, q.calibration_rows)
    if METHODS[q.method].calibrated and calib.num_rows == 0:
        raise ConfigError(f"Every labeled row in {paths.labels_dir} is held out, so {q.method} has nothing to "
                          "calibrate on; label more rows or lower heldout_fraction.")
    out = Path(paths.quantized_dir)
    staging, rejected = out.with_name(f".{out.name}.staging"), out.with_name(f"{out.name}.rejected")
    for old in (staging, rejected):
        storage.remove(old)
    staging.parent.mkdir(parents=True, exist_ok=True)
    init_ray(stage.cluster)
    check_cluster_gpus(q, ray.cluster_resources().get("GPU", 0))
    spec = {"quantize": asdict(q), "kind": kind, "source": str(source), "base": base, "base_revision": base_revision,
            "staging": str(staging), "k": labels.k}
    task = ray.remote(num_cpus=q.num_cpus, num_gpus=q.num_gpus)(quantize_task)
    result = ray.get(task.remote(spec, held, calib))
    storage.pull(staging)  # at a URI run root, what the task's node sent
    manifest = {
        "method": q.method, "bits": q.bits, "quantize": asdict(q), "gate": result["gate"], "sizes": result["sizes"],
        "split": split_record(held, calib, stage.heldout_fraction), "timings": result["timings"],
        "device": result["device"], "eval_dtype": result["eval_dtype"],
    }
    lineage = _lineage(paths, kind, source, base, labels)
    lineage["student"]["base_revision"] = base_revision
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    (staging / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True))
    write_card(staging, manifest, lineage)
    storage.push(staging)  # at a URI run root: whole there before the old model goes
    if not result["gate"]["passed"]:
        _replace(staging, rejected)
        raise QualityGateError(failure_sentence(result["gate"], q.method, q.bits, str(rejected)))
    _replace(staging, out)
    d, s = result["gate"]["drop"], result["sizes"]
    print(f"quantize: {q.method} {q.bits}-bit student in {storage.portable(str(out))}: {s['quantized_bytes'] / 1e6:.2f} MB "
          f"({s['ratio_to_bf16']:.2f} of bf16); gate passed (perplexity {d['perplexity']:+.2%}, top-1 agreement "
          f"{-d['top1_agreement']:+.3f}, KL {d['kl_to_teacher']:+.4f} nats; limits {asdict(q.max_quality_drop)})")
    return manifest


def _replace(staging: Path, target: Path) -> None:
    """The staged model becomes `target` (the old one goes); at a URI run root the new copy is sent before the staged
    one is deleted there, so a run killed in between leaves one whole model at the run root."""
    storage.remove(target)
    staging.rename(target)
    storage.moved(target)  # its files count as never sent until they are: a run killed now keeps them here
    storage.push(target)
    storage.remove(staging)


def _lineage(paths, kind: str, source: Path, base: str | None, labels) -> dict[str, Any]:
    student_lineage = Path(paths.student_dir) / "lineage.json"
    return storage.portable({  # in a URI run root, its paths as URIs: the same record on every node
        "student": {"dir": paths.student_dir, "kind": kind, "source": str(source), "base": base,
                    "train_lineage": json.loads(student_lineage.read_text()) if student_lineage.exists() else None},
        "labels": {"dir": paths.labels_dir, "fingerprint": labels.fingerprint(), "teacher": labels.teacher,
                   "k": labels.k},
    })
