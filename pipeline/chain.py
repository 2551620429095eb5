"""label → train → quantize → evaluate (→ serve) in one command, re-running only what changed.

Each stage's fingerprint hashes its own config groups and the fingerprint of the stage before it, so a
change anywhere re-runs that stage and everything downstream, and nothing upstream. `<run_root>/chain.json`
records the fingerprint of each stage's last successful run; a stage whose fingerprint and outputs are
unchanged is skipped. A stage that re-runs because its inputs changed starts clean (its old outputs and
checkpoints are removed first); a stage that failed or was interrupted with the same fingerprint resumes.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PathsConfig, resolve, to_dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    groups: tuple[str, ...]  # the config groups this stage's own work depends on
    done: Callable[[PathsConfig], bool]  # its outputs are complete
    outputs: Callable[[PathsConfig], list[str]]  # what to remove before a changed re-run
    run: Callable[[Any], Any]


def _label(cfg):
    from pipeline.label.stage import run

    return run(cfg)


def _train(cfg):
    from pipeline.train.stage import run

    return run(cfg)


def _quantize(cfg):
    from pipeline.quantize.stage import run

    return run(cfg)


def _evaluate(cfg):
    from pipeline.evaluate.stage import run

    return run(cfg)


STAGES = [
    Stage("label", ("teacher", "data", "label", "seed"), lambda p: (Path(p.labels_dir) / "manifest.json").exists(),
          lambda p: [p.labels_dir, p.rejected_dir], _label),
    Stage("train", ("student", "train", "loss", "deepspeed"), lambda p: (Path(p.student_dir) / "lineage.json").exists(),
          lambda p: [p.student_dir, p.train_storage], _train),
    Stage("quantize", ("quantize",), lambda p: (Path(p.quantized_dir) / "manifest.json").exists(),
          lambda p: [p.quantized_dir], _quantize),
    Stage("evaluate", ("evaluate",), lambda p: (Path(p.eval_dir) / "metrics.json").exists(),
          lambda p: [p.eval_dir], _evaluate),
]


def fingerprints(plain: dict[str, Any], stages: list[Stage]) -> dict[str, str]:
    """Stage name → sha256 of its config groups chained with the previous stage's fingerprint."""
    out, upstream = {}, ""
    for stage in stages:
        own = {group: plain.get(group) for group in stage.groups}
        digest = hashlib.sha256((upstream + json.dumps(own, sort_keys=True, default=str)).encode()).hexdigest()
        out[stage.name] = upstream = digest
    return out


def run(cfg: Any) -> dict[str, str]:
    """Run the chain; returns stage name → "ran" or "skipped"."""
    plain = resolve(cfg)
    paths = to_dataclass(PathsConfig, plain["paths"], "paths")
    stages = [s for s in STAGES if s.name not in (plain.get("run", {}).get("skip") or [])]
    record_path = Path(paths.run_root) / "chain.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    outcome = {}
    for stage, fp in zip(stages, fingerprints(plain, stages).values()):
        if record.get(stage.name) == fp and stage.done(paths):
            print(f"run: {stage.name} skipped (config and inputs unchanged since its last successful run)", flush=True)
            outcome[stage.name] = "skipped"
            continue
        if stage.name in record and record[stage.name] != fp:
            for old in stage.outputs(paths):
                shutil.rmtree(old, ignore_errors=True)
            print(f"run: {stage.name} re-runs from scratch (its config or an upstream stage changed)", flush=True)
        else:
            print(f"run: {stage.name} runs", flush=True)
        record.pop(stage.name, None)
        _save(record_path, record)
        stage.run(cfg)
        record[stage.name] = fp
        _save(record_path, record)
        outcome[stage.name] = "ran"
    if plain.get("run", {}).get("serve"):
        from pipeline.serve.stage import run as serve

        serve(cfg)
    return outcome


def _save(path: Path, record: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    tmp.replace(path)
