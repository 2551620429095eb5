"""The sample stage: the student answers the corpus's prompts `sample.n` times and the teacher labels every answer.

corpus → prepare (CPU tasks) → student vLLM actors (n samples per prompt) → teacher vLLM actors (score mode: its
top-k and tail at each of the student's tokens) → Parquet shards in `paths.samples_dir` + manifest.json.

The shards are labels in the label stage's format (one row per sample, `sample` numbering a prompt's samples):
the teacher's distribution over the student's own tokens, which on-policy distillation trains on, and in
`token_logprob` the teacher's log-probability of each sampled token, by which preference pairs rank the samples
(pipeline/preference). It is the label stage with the student as the writer of the responses, so it shares its
guarantees: everything checkable is checked before an actor starts, a killed run resumes (a prompt's samples
are written together, in one shard), refused rows go to `<samples_dir>/rejected` with the reason, and a run root
holding samples of another student or config is refused unless `sample.overwrite=true`.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

if TYPE_CHECKING:
    import ray

from pipeline import storage
from pipeline.config import LabelStage, ModelConfig, SampleStage, sample_stage
from pipeline.data.schema import SAMPLE_SCHEMA, Manifest, write_manifest
from pipeline.errors import LabelsError
from pipeline.generation.engine import EngineSpec, SampleScorer, StudentSampler
from pipeline.generation.prepare import PrepareSpec
from pipeline.generation.processor import ProcessorSpec, build_processor, read_corpus
from pipeline.generation.reader import count_rows
from pipeline.label.stage import build_manifest, check_resume, consume, ensure_corpus, teacher_spec
from pipeline.label.timeline import Timeline
from pipeline.label.writer import write_batch
from pipeline.models.load import ensure_model, load_tokenizer_checked, model_fingerprint, pin_revision, \
    tokenizer_fingerprint
from pipeline.models.merge import find_student, full_weights
from pipeline.monitoring import Recorder


def rejected_dir(stage: SampleStage) -> str:
    return str(Path(stage.paths.samples_dir) / "rejected")


def labeling(stage: SampleStage) -> LabelStage:
    """The label stage's view of this run: the teacher scores (score mode) responses up to
    sample.max_response_tokens."""
    return LabelStage(paths=stage.paths, cluster=stage.cluster, teacher=stage.teacher, data=stage.data,
                      label=replace(stage.label, mode="score", max_response_tokens=stage.sample.max_response_tokens))


def sampled_fingerprint(stage: SampleStage) -> dict[str, Any]:
    """The fingerprint of the student that samples: the configured student (`sample.model=base`), or what the train
    stage wrote, as written (an adapter and its base; the merge `sampled_model` makes is redone on every run)."""
    if stage.sample.model == "base":
        return model_fingerprint(stage.student, "student")
    files = find_student(stage.paths.student_dir)
    fingerprint = model_fingerprint(ModelConfig(name_or_path=str(files.path)), "student")
    if files.kind == "adapter":
        fingerprint["base"] = storage.portable(files.base)
        fingerprint["base_revision"] = files.base_revision
    return fingerprint


def sampled_model(stage: SampleStage) -> ModelConfig:
    """The model the student actors load, a plain HF directory or hub id: a LoRA adapter is merged into its base
    (in `<samples_dir>/student`, after the resume check, which may clear the samples folder)."""
    if stage.sample.model == "base":
        return stage.student
    path = full_weights(stage.paths.student_dir, Path(stage.paths.samples_dir) / "student")
    return replace(stage.student, name_or_path=str(path), revision=None, build=None)


def build_sample_manifest(stage: SampleStage, generator: dict[str, Any]) -> Manifest:
    """The label manifest of the teacher's scoring, with the student that wrote the responses and how it sampled."""
    tok = tokenizer_fingerprint(load_tokenizer_checked(stage.student, "student"))
    manifest = build_manifest(labeling(stage))  # builds a tiny teacher; checks the teacher's vocabulary and k
    if tok["tokenizer_sha256"] != manifest.tokenizer_sha256:
        raise LabelsError(f"The student ({stage.student.name_or_path}) and the teacher ({stage.teacher.name_or_path}) "
                          "tokenize differently, so the teacher cannot score the student's tokens; pick a teacher "
                          "and student that share a tokenizer.")
    s = stage.sample
    return replace(manifest, sampling={}, generator={
        "student": generator, "n": s.n, "sampling": asdict(s.sampling), "max_response_tokens": s.max_response_tokens})


def check_room(stage) -> None:
    """The student's and the teacher's pools run at once, beside Ray Data's reading tasks (`check_room_for_tasks`)."""
    from pipeline.runtime import check_room_for_tasks

    s = stage.sample
    check_room_for_tasks(stage.cluster, {"sample.concurrency[0] × sample.num_cpus_per_actor":
                                         s.concurrency[0] * s.num_cpus_per_actor,
                                         "sample.scoring.concurrency[0] × sample.scoring.num_cpus_per_actor":
                                         s.scoring.concurrency[0] * s.scoring.num_cpus_per_actor},
                         "lower either pool's concurrency[0] or num_cpus_per_actor, or raise cluster.num_cpus")


def run(cfg: Any) -> dict[str, Any]:
    """Sample the student on the configured corpus and score the samples with the teacher; returns the summary."""
    import ray

    from pipeline.generation.prepare import Ledger
    from pipeline.runtime import Ask, check_local_fit, init_ray, is_embedded

    stage = sample_stage(cfg)
    s = stage.sample
    asks = [Ask("sample.concurrency[0]", s.concurrency[0], "student actor",
                {"CPU": s.num_cpus_per_actor, "GPU": s.num_gpus_per_actor},
                "lower sample.concurrency[0] or sample.num_cpus_per_actor, or raise cluster.num_cpus"),
            Ask("sample.scoring.concurrency[0]", s.scoring.concurrency[0], "teacher actor",
                {"CPU": s.scoring.num_cpus_per_actor, "GPU": s.scoring.num_gpus_per_actor},
                "lower sample.scoring.concurrency[0] or sample.scoring.num_cpus_per_actor, or raise cluster.num_cpus")]
    check_local_fit(stage.cluster, *asks)
    check_room(stage)
    stage.teacher = pin_revision(stage.teacher, "teacher")
    stage.student = pin_revision(stage.student, "student")
    ensure_model(stage.student, "student")
    ensure_corpus(labeling(stage))
    manifest = check_resume(stage.paths.samples_dir, rejected_dir(stage),
                            build_sample_manifest(stage, sampled_fingerprint(stage)), s.overwrite, setting="sample")
    student = sampled_model(stage)
    init_ray(stage.cluster, *asks)
    write_manifest(stage.paths.samples_dir, manifest)
    Path(rejected_dir(stage)).mkdir(parents=True, exist_ok=True)

    ledger = Ledger.remote(stage.paths.samples_dir, rejected_dir(stage))
    resumed = ray.get(ledger.resumed_rows.remote())
    ds = build_dataset(stage, student, ledger)
    corpus_rows = count_rows(stage.data.paths)
    with Timeline(Path(stage.paths.samples_dir), count_actors=not is_embedded(stage.cluster)) as timeline:
        # the display counts samples: n for each prompt an earlier run did not finish (`consume` subtracts `resumed`)
        summary = consume(ds, resumed, (corpus_rows - resumed) * s.n + resumed if corpus_rows is not None else None,
                          Recorder("sample", Path(stage.paths.run_root).name), timeline, desc="sample: samples")
    for folder in (stage.paths.samples_dir, rejected_dir(stage)):
        storage.push(folder)
        storage.pull(folder)
    summary.update(totals(stage))
    if summary["prompts_read"] == 0:
        raise LabelsError(f"No prompt of {', '.join(stage.data.paths)} was sampled or rejected: the corpus is empty or "
                          "an engine failed (its error is in the log above); fix that and re-run.")
    write_manifest(stage.paths.samples_dir, manifest, extra={"summary": summary})
    ray.kill(ledger)
    print(f"sample: prompts read {summary['prompts_read']} = sampled {summary['prompts_sampled']} + rejected "
          f"{summary['prompts_rejected']}; {summary['samples']} samples ({s.n} per prompt, "
          f"{summary['identical_samples']} repeating an earlier sample of their prompt), "
          f"{summary['tokens_scored']} tokens scored by the teacher in {summary['this_run']['seconds']} s; "
          f"mean teacher log-probability per sampled token {summary['teacher_logprob_per_token']}\n"
          f"sample: samples in {storage.portable(stage.paths.samples_dir)}, rejected prompts (with reasons) in "
          f"{storage.portable(rejected_dir(stage))}")
    return summary


def build_dataset(stage: SampleStage, student: ModelConfig, ledger) -> "ray.data.Dataset":
    s, lab, t = stage.sample, stage.label, stage.teacher
    prep = PrepareSpec(tokenizer=t.name_or_path, revision=t.revision, mode="generate",
                       max_prompt_tokens=lab.max_prompt_tokens, max_response_tokens=s.max_response_tokens,
                       max_model_len=min(t.max_model_len, student.max_model_len))
    # samples end where the teacher can still score them: within the smaller of the two models' lengths
    sampler = EngineSpec(model=student.name_or_path, revision=student.revision, dtype=student.dtype,
                         max_model_len=min(t.max_model_len, student.max_model_len),
                         tensor_parallel_size=student.tensor_parallel_size,
                         mode="sample", k=1, max_response_tokens=s.max_response_tokens,
                         temperature=s.sampling.temperature, top_p=s.sampling.top_p, seed=s.sampling.seed, n=s.n,
                         **asdict(s.engine))
    spec = ProcessorSpec(prepare=prep, engine=sampler, batch_size=s.batch_size, concurrency=tuple(s.concurrency),
                         num_cpus_per_actor=s.num_cpus_per_actor, num_gpus_per_actor=s.num_gpus_per_actor,
                         prepare_batch_size=lab.prepare_batch_size, actor=StudentSampler)
    import ray

    paths = [storage.remote_of(p) or p for p in stage.data.paths]
    ds = build_processor(spec, ledger)(read_corpus(paths))
    lo, hi = s.scoring.concurrency
    ds = ds.map_batches(SampleScorer, fn_constructor_kwargs={"spec": teacher_spec(labeling(stage))},
                        batch_format="pyarrow", batch_size=s.batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                        num_cpus=s.scoring.num_cpus_per_actor, num_gpus=s.scoring.num_gpus_per_actor)
    return ds.map_batches(write_batch, fn_kwargs={"labels_dir": stage.paths.samples_dir,
                                                  "rejected_dir": rejected_dir(stage), "schema": SAMPLE_SCHEMA},
                          batch_format="pyarrow", batch_size=None, num_cpus=0.25)


def totals(stage: SampleStage) -> dict[str, Any]:
    """Counts over everything on disk (this run and earlier ones): prompts (a corpus row each) and their samples."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def read(folder: str, columns: list[str]) -> pa.Table | None:
        shards = sorted(Path(folder).glob("part-*.parquet"))
        return pa.concat_tables([pq.read_table(p, columns=columns) for p in shards]) if shards else None

    samples = read(stage.paths.samples_dir, ["source", "line", "response_ids", "token_logprob"])
    rejected = read(rejected_dir(stage), ["source", "line"])
    def keys(table: pa.Table | None) -> set:
        return set(zip(table.column("source").to_pylist(), table.column("line").to_pylist())) if table else set()

    sampled, refused = keys(samples), keys(rejected)
    out = {"prompts_read": len(sampled | refused), "prompts_sampled": len(sampled),
           "prompts_rejected": len(refused - sampled), "samples": 0, "identical_samples": 0, "tokens_scored": 0,
           "teacher_logprob_per_token": None}
    if samples is None:
        return out
    seen = set()
    for source, line, response in zip(*(samples.column(c).to_pylist() for c in ("source", "line", "response_ids"))):
        key = (source, line, tuple(response))
        out["identical_samples"] += key in seen
        seen.add(key)
    logprobs = pc.list_flatten(samples.column("token_logprob")).cast("float64")
    out.update(samples=samples.num_rows, tokens_scored=len(logprobs),
               teacher_logprob_per_token=round(pc.mean(logprobs).as_py(), 4) if len(logprobs) else None)
    return out
