"""The evaluate stage: teacher vs student vs quantized student (vs an SFT-only baseline) on held-out rows.

Each model generates greedily through the label stage's Ray Data plan (CPU prepare tasks → an actor pool of
vLLM engines), so evaluation scales like labeling: task accuracy, latency per request, engine throughput.
The teacher's responses (with its top-k) then become the reference for the teacher-forced metrics, which
HF-model actors compute for every other model: top-1 agreement, KL to the teacher, perplexity.
Writes metrics.json, report.md and PNG plots under `paths.eval_dir`.

A model whose weights, engine settings, held-out rows and evaluate settings (and, for the others, the
teacher's reference) are unchanged since an earlier evaluation under the same run root is not run again
(`evaluate.reuse`): its results, and the teacher's reference responses, come from `<run_root>/cache/evaluate`.
A teacher is the most expensive model to evaluate and rarely changes while students are iterated on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import EvaluateStage, ModelConfig, evaluate_stage

log = logging.getLogger("ray_distill.evaluate")


def heldout_rows(stage: EvaluateStage) -> Path:
    """The held-out corpus: the configured file, or fresh rows from the generator of the bundled task the
    training corpus was built from (`data.build.task`, arithmetic by default)."""
    ev = stage.evaluate
    if ev.data_path:
        return Path(ev.data_path)
    from pipeline.data.corpus import build_corpus

    task = (stage.data.build or {}).get("task", "arithmetic")
    path = Path(stage.paths.eval_dir) / f"heldout-{task}-{ev.seed}-{ev.num_rows}.jsonl"
    if not path.exists():
        build_corpus(path, ev.num_rows, seed=ev.seed, with_response=False, task=task)
    return path


def reference_answers(path: Path) -> dict[int, str]:
    """Line number → reference answer (rows without an `answer` cannot be graded and are left out)."""
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) if line.strip() else {} for line in path.read_text().splitlines()]
    return {i: str(r["answer"]) for i, r in enumerate(rows) if isinstance(r, dict) and "answer" in r}


def student_path(student_dir: str, merged: Path) -> Path:
    """A train-stage output as full weights: `model/`, or the adapter merged into its base (merged afresh on
    every run, so a retrained adapter is never shadowed by an older merge)."""
    from pipeline.quantize.merge import find_student, merge_adapter

    kind, source, base = find_student(student_dir)
    if kind == "model":
        return source
    shutil.rmtree(merged, ignore_errors=True)
    merge_adapter(source, base, merged)
    return merged


def quantized_path(stage: EvaluateStage) -> Path | None:
    root = Path(stage.paths.quantized_dir)
    for candidate in (root, root / "model"):
        if (candidate / "config.json").exists():
            return candidate
    return None


def models_to_evaluate(stage: EvaluateStage) -> dict[str, tuple[Path, ModelConfig]]:
    """role → (HF directory, engine settings), the teacher first: its responses are everyone's reference."""
    from pipeline.models.load import ensure_model

    ensure_model(stage.teacher, "teacher")
    models = {"teacher": (Path(stage.teacher.name_or_path), stage.teacher),
              "student": (student_path(stage.paths.student_dir, Path(stage.paths.eval_dir) / "student-merged"),
                          stage.student)}
    quantized = quantized_path(stage)
    if quantized:
        models["quantized"] = (quantized, ModelConfig(str(quantized), dtype="auto",
                                                      max_model_len=stage.student.max_model_len))
    if stage.evaluate.baseline_path:  # an HF directory, or a train-stage output (model/ or adapter/)
        base = Path(stage.evaluate.baseline_path)
        if not (base / "config.json").exists():
            base = student_path(str(base), Path(stage.paths.eval_dir) / "baseline-merged")
        models["sft_baseline"] = (base, stage.student)
    return models


def generate(stage: EvaluateStage, path: Path, model: ModelConfig, heldout: Path) -> pa.Table:
    """Greedy responses with top-k logprobs for every held-out row, through Ray Data + vLLM actors."""
    import ray

    from pipeline.evaluate.workers import Generator
    from pipeline.label.prepare import Ledger, PrepareSpec, prepare_batch
    from pipeline.label.reader import CorpusDatasource
    from pipeline.label.teacher import TeacherSpec
    from pipeline.runtime import require_resources

    ev = stage.evaluate
    require_resources(stage.cluster, "evaluate.concurrency[0]", ev.concurrency[0], "generator actor",
                      {"CPU": ev.num_cpus_per_actor, "GPU": ev.num_gpus_per_actor},
                      "lower evaluate.concurrency[0], evaluate.num_cpus_per_actor or evaluate.num_gpus_per_actor, or "
                      "raise cluster.num_cpus")
    prep = PrepareSpec(tokenizer=str(path), revision=None, mode="generate", max_prompt_tokens=ev.max_prompt_tokens,
                       max_response_tokens=ev.max_response_tokens, max_model_len=model.max_model_len)
    spec = TeacherSpec(model=str(path), revision=None, dtype=model.dtype, max_model_len=model.max_model_len,
                       tensor_parallel_size=model.tensor_parallel_size, mode="generate", k=ev.k,
                       max_response_tokens=ev.max_response_tokens, temperature=0.0, top_p=1.0, seed=None,
                       **dataclasses.asdict(ev.engine))
    nowhere = str(Path(stage.paths.eval_dir) / "no-earlier-rows")  # evaluation never resumes: an empty ledger
    ledger = Ledger.remote(nowhere, nowhere)
    ds = ray.data.read_datasource(CorpusDatasource([str(heldout)]))
    ds = ds.map_batches(prepare_batch, fn_kwargs={"spec": prep, "ledger": ledger}, batch_format="pyarrow",
                        batch_size=ev.batch_size, num_cpus=0.5)
    ds = ds.map_batches(Generator, fn_constructor_kwargs={"spec": spec, "latency_requests": ev.latency_requests},
                        batch_format="pyarrow", batch_size=ev.batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=ev.concurrency[0], max_size=ev.concurrency[1]),
                        num_cpus=ev.num_cpus_per_actor, num_gpus=ev.num_gpus_per_actor)
    table = pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    ray.kill(ledger)
    return table.sort_by("line")


def generation_metrics(table: pa.Table, answers: dict[int, str], tokenizer_path: Path, metric: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from pipeline.evaluate.metrics import answer_correct

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    ok = table.filter(pc.is_null(table["reason"]))
    texts = tok.batch_decode(ok["response_ids"].to_pylist(), skip_special_tokens=True)
    graded = [(answers[line], text) for line, text in zip(ok["line"].to_pylist(), texts) if line in answers]
    correct = sum(answer_correct(text, answer, metric) for answer, text in graded)
    latencies = sorted(x for x in table["latency_s"].to_pylist() if x is not None)
    tokens = int(pc.sum(pc.list_value_length(ok["response_ids"])).as_py() or 0)
    seconds = float(pc.sum(table["engine_seconds"]).as_py() or 0.0)
    return {
        "rows": table.num_rows, "refused": table.num_rows - ok.num_rows, "graded": len(graded),
        "accuracy": correct / len(graded) if graded else None,
        "latency_ms": 1000 * sum(latencies) / len(latencies) if latencies else None,
        "latency_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "tokens_per_s": tokens / seconds if seconds else None, "generated_tokens": tokens,
        "examples": [{"answer": a, "response": t} for a, t in graded[:3]],
    }


def teacher_forced(stage: EvaluateStage, path: Path, reference: pa.Table, max_seq_len: int) -> dict[str, Any]:
    """Agreement / KL / perplexity of the model at `path` on the teacher's responses, via HF-model actors."""
    import ray

    from pipeline.evaluate.metrics import summarize
    from pipeline.evaluate.workers import Scorer
    from pipeline.train.batches import REQUIRED_COLUMNS

    ev = stage.evaluate
    ds = ray.data.from_arrow(reference.select(REQUIRED_COLUMNS))
    ds = ds.map_batches(Scorer, fn_constructor_kwargs={"model_path": str(path), "k": ev.k, "max_seq_len": max_seq_len},
                        batch_format="numpy", batch_size=ev.scorer_batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=ev.concurrency[1]),
                        num_cpus=ev.num_cpus_per_actor)
    sums = {"tokens": 0.0, "agree": 0.0, "kl": 0.0, "nll": 0.0}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key in sums:
            sums[key] += float(batch[key].sum())
    return summarize(sums)


def count_parameters(path: Path) -> int:
    """Parameters of the architecture (a quantized model counts its unquantized shape), built on `meta`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def weights_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin")) / 2**20


def cache_key(kind: str, path: Path, model: ModelConfig, stage: EvaluateStage, heldout: Path,
              reference: str | None) -> str:
    """What a model's evaluation depends on: its weights and engine settings, the held-out rows, the evaluate
    settings (not `baseline_path`, which only picks the models) and, unless it is the teacher, the reference."""
    from pipeline.models.load import model_fingerprint

    model = dataclasses.replace(model, name_or_path=str(path))
    settings = {k: v for k, v in dataclasses.asdict(stage.evaluate).items() if k not in ("baseline_path", "reuse")}
    payload = {"kind": kind, "model": model_fingerprint(model), "engine": dataclasses.asdict(model),
               "evaluate": settings, "heldout": hashlib.sha256(heldout.read_bytes()).hexdigest(),
               "reference": reference}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _cached(cache: Path, key: str, with_reference: bool) -> tuple[dict[str, Any], pa.Table | None] | None:
    import pyarrow.parquet as pq

    result, table = cache / f"{key}.json", cache / f"{key}.parquet"
    if not result.exists() or (with_reference and not table.exists()):
        return None
    return json.loads(result.read_text()), pq.read_table(table) if with_reference else None


def _store(cache: Path, key: str, result: dict[str, Any], reference: pa.Table | None) -> None:
    from pipeline.data.schema import write_table_atomic

    cache.mkdir(parents=True, exist_ok=True)
    if reference is not None:
        write_table_atomic(reference, cache / f"{key}.parquet")
    (cache / f"{key}.json.tmp").write_text(json.dumps(result))  # written last: its presence means complete
    (cache / f"{key}.json.tmp").replace(cache / f"{key}.json")


def run(cfg: Any) -> dict[str, Any]:
    from pipeline.evaluate.report import check_goals, write_report
    from pipeline.runtime import init_ray

    stage = evaluate_stage(cfg)
    out = Path(stage.paths.eval_dir)
    out.mkdir(parents=True, exist_ok=True)
    heldout = heldout_rows(stage)
    answers = reference_answers(heldout)
    models = models_to_evaluate(stage)
    init_ray(stage.cluster)
    results: dict[str, dict[str, Any]] = {}
    reference, reference_key = None, None
    cache = Path(stage.paths.run_root) / "cache" / "evaluate"
    for role, (path, model) in models.items():
        kind = "reference" if reference is None else "scored"
        key = cache_key(kind, path, model, stage, heldout, reference_key)
        hit = _cached(cache, key, kind == "reference") if stage.evaluate.reuse else None
        if hit:
            result, table = hit
            print(f"evaluate: {role} ({path}) unchanged since {result['evaluated_at']}: results reused", flush=True)
            result["reused"] = True
            if kind == "reference":
                reference, reference_key = table, key
            results[role] = result
            continue
        print(f"evaluate: {role} ({path})", flush=True)
        table = generate(stage, path, model, heldout)
        result = generation_metrics(table, answers, path, stage.evaluate.metric)
        if kind == "reference":  # the teacher: the reference itself
            reference, reference_key = table.filter(pc.is_null(table["reason"])), key
            tokens = pc.sum(pc.list_value_length(reference["response_ids"])).as_py() or 0
            logprob = sum(sum(x) for x in reference["token_logprob"].to_pylist())
            result.update(top1_agreement=1.0, kl_to_teacher=0.0, scored_tokens=tokens,
                          perplexity=math.exp(-logprob / tokens) if tokens else None)
        else:
            max_seq_len = stage.evaluate.max_prompt_tokens + stage.evaluate.max_response_tokens
            result.update(teacher_forced(stage, path, reference, max_seq_len))
        result.update(path=str(path), parameters=count_parameters(path), weights_mb=weights_mb(path),
                      evaluated_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        _store(cache, key, result, reference if kind == "reference" else None)
        results[role] = dict(result, reused=False)
    goals = check_goals(results)
    summary = {"models": results, "goals": goals, "heldout": str(heldout), "rows": len(answers)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    loss_png = Path(stage.paths.student_dir) / "loss.png"
    if loss_png.exists():
        shutil.copy(loss_png, out / "train_loss.png")
    report = write_report(summary, out)
    print(report.read_text(), flush=True)
    return summary
