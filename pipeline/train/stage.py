"""The train stage driver: check the labels against the student, then one Ray Train `TorchTrainer` run.

Everything checkable is checked here before a worker starts: the config, the labels' manifest and
schema, and that the student's tokenizer is the one the teacher's ids came from. Re-running the same
config resumes from the newest checkpoint in `paths.train_storage`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import LossConfig, TrainStage, train_settings_in_use, train_stage, training_precision
from pipeline.data.split import is_heldout, training_ids
from pipeline.data.schema import Manifest, pairs_fingerprint, read_manifest, validate_labels_table, write_json_atomic
from pipeline.errors import ConfigError, LabelsError
from pipeline.models.load import ensure_model, load_tokenizer_checked, pin_revision, tokenizer_fingerprint
from pipeline.data.batches import PAIR_COLUMNS, REQUIRED_COLUMNS
from pipeline.train.sequence_parallel import check_heads
from pipeline.train.online import PROJECTIONS, PROJECTIONS_CONFIG
from pipeline.train.worker import WorkerSpec, train_loop

log = logging.getLogger("ray_distill.train")


def check_labels_match_student(manifest: Manifest, stage: TrainStage) -> None:
    """Refuse labels whose token ids mean something else to the student."""
    tok = tokenizer_fingerprint(load_tokenizer_checked(stage.student, "student"))
    checks = [("vocabulary", "tokenizer_sha256"), ("chat template", "chat_template_sha256"),
              ("special tokens", "special_tokens")]
    for what, key in checks:
        if tok[key] != getattr(manifest, key):
            raise LabelsError(
                f"The labels under {stage.paths.labels_dir} were made with a different tokenizer ({what} differs "
                f"from the student's {stage.student.name_or_path}); relabel with a teacher that shares the "
                "student's tokenizer, or pick a matching student.")


def heldout_rows(shards: list[str], fraction: float, limit: int) -> dict[str, list] | None:
    """Up to `limit` held-out rows as plain columns (the same rows, in the same order, on every worker)."""
    kept = []
    for shard in shards:
        table = pq.read_table(shard, columns=["id", *REQUIRED_COLUMNS])
        mask = pa.array([is_heldout(i, fraction) for i in table.column("id").to_pylist()], pa.bool_())
        kept.append(table.filter(mask).drop_columns(["id"]))
        if sum(k.num_rows for k in kept) >= limit:
            break
    table = pa.concat_tables(kept).slice(0, limit)
    return table.to_pydict() if table.num_rows else None


def check_sequence_parallel(stage: TrainStage) -> None:
    size = stage.train.sequence_parallel_size
    if size == 1:
        return
    from transformers import AutoConfig

    arch = AutoConfig.from_pretrained(stage.student.name_or_path, revision=stage.student.revision).get_text_config()
    problem = check_heads(arch.num_attention_heads, arch.num_key_value_heads, size, stage.student.name_or_path)
    if problem:
        raise ConfigError(problem)


def check_online_teacher(stage: TrainStage) -> None:
    """The online terms' teacher (pinned to a commit of a hub one by then): built where it is a tiny local one,
    sharing the student's tokenizer (the terms compare the two models on the same token ids), and with the blocks
    loss.layer_map names."""
    if not stage.loss.online():
        return
    from transformers import AutoConfig

    from pipeline.losses.features import layer_pairs

    ensure_model(stage.teacher, "teacher")
    student, teacher = (tokenizer_fingerprint(load_tokenizer_checked(m, role)) for m, role in
                        ((stage.student, "student"), (stage.teacher, "teacher")))
    if student["tokenizer_sha256"] != teacher["tokenizer_sha256"]:
        raise ConfigError(f"loss.weights gives {', '.join(stage.loss.online())} a weight, but the teacher "
                          f"{stage.teacher.name_or_path} tokenizes differently from the student "
                          f"{stage.student.name_or_path}; pick a teacher of the student's tokenizer or keep the "
                          "offline term only.")
    depth = [AutoConfig.from_pretrained(m.name_or_path, revision=m.revision).get_text_config().num_hidden_layers
             for m in (stage.student, stage.teacher)]
    try:
        layer_pairs(*depth, stage.loss.layer_map)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_galore(stage: TrainStage) -> None:
    if stage.train.optimizer != "galore":
        return
    import importlib.util

    if importlib.util.find_spec("galore_torch") is None:  # what every worker imports
        raise ConfigError("train.optimizer=galore needs the galore-torch package; install ray-distill with its galore "
                          "extra (pip install -e '.[galore]').")


def label_shards(stage: TrainStage) -> list[str]:
    shards = sorted(str(p) for p in Path(stage.paths.labels_dir).glob("part-*.parquet"))
    if not shards:
        raise LabelsError(f"No label shards in {stage.paths.labels_dir}; run ray_jobs/label.py with the same "
                          "paths.run_root first.")
    validate_labels_table(pq.read_schema(shards[0]).empty_table(), shards[0])
    return shards


def training_sources(stage: TrainStage, shards: list[str], manifest: Manifest,
                     labels: list[str] | None = None) -> list[tuple[list[str], list[str]]]:
    """(shards, the ids of the rows trained on, one per row) for each source of training rows: the labels (or the
    pairs, with the labels' shards as `labels`), and with train.onpolicy_fraction > 0 the student's samples labeled by
    the teacher. Held-out ids are left out of every source. train.max_rows caps the prompts: the transfer set is
    chosen among the labels' ids, so pairs made from them train on the KD student's prompts (those of them that made
    a pair). With samples, the labels kept are those with the smallest sha256(id), as many as make the samples the
    configured share of the rows (all of them where that is too few)."""
    t, fraction = stage.train, stage.heldout_fraction

    def ids_of(files: list[str]) -> list[str]:
        return pa.concat_tables([pq.read_table(f, columns=["id"]) for f in files]).column("id").to_pylist()

    ids = ids_of(shards)
    prompts = ids_of(labels) if labels and t.max_rows is not None else ids
    keep = training_ids(list(dict.fromkeys(prompts)), fraction, t.max_rows)  # pairs repeat ids
    trained = [i for i in ids if (i in keep if keep is not None else not is_heldout(i, fraction))]
    if stage.loss.objective != "distill" or t.onpolicy_fraction == 0:
        return [(shards, trained)]
    samples = read_manifest(stage.paths.samples_dir)
    if samples.generator is None:
        raise LabelsError(f"{storage.portable(stage.paths.samples_dir)} holds labels, not the student's samples; "
                          "train.onpolicy_fraction mixes in the sample stage's output (ray_jobs/sample.py).")
    if (samples.tokenizer_sha256, samples.k) != (manifest.tokenizer_sha256, manifest.k):
        raise LabelsError(f"The samples in {storage.portable(stage.paths.samples_dir)} were scored with another "
                          f"tokenizer or top-k (k={samples.k}) than the labels (k={manifest.k}); re-run "
                          "ray_jobs/sample.py with the labels' teacher and label.k.")
    files = sorted(str(p) for p in Path(stage.paths.samples_dir).glob("part-*.parquet"))
    allowed = set(trained)
    on_policy = [i for i in ids_of(files) if i in allowed] if files else []
    if not on_policy:
        raise LabelsError(f"No sample in {storage.portable(stage.paths.samples_dir)} is of a training prompt; run "
                          "ray_jobs/sample.py on the labels' corpus first.")
    share = t.onpolicy_fraction
    wanted = round(len(on_policy) * (1 - share) / share)
    offline = training_ids(trained, 0.0, wanted) if wanted else set()
    sources = [(files, on_policy)]
    if offline:
        sources.insert(0, (shards, [i for i in trained if i in offline]))
    return sources


def _keep_rows(batch: pa.Table, ids, heldout_fraction: float | None) -> pa.Table:
    """The rows of a read batch that are trained on: not held out (`heldout_fraction`), or in the id set `ids`."""
    import ray

    row_ids = batch.column("id").to_pylist()
    if heldout_fraction is not None:
        return batch.filter(pa.array([not is_heldout(i, heldout_fraction) for i in row_ids], pa.bool_()))
    kept = ray.get(ids)
    return batch.filter(pa.array([i in kept for i in row_ids], pa.bool_()))


def pair_shards(stage: TrainStage) -> list[str]:
    shards = sorted(str(p) for p in Path(stage.paths.pairs_dir).glob("part-*.parquet"))
    if not shards:
        raise LabelsError(f"No pairs in {storage.portable(stage.paths.pairs_dir)}; loss.objective="
                          f"{stage.loss.objective} trains on preference pairs: run ray_jobs/sample.py and "
                          "ray_jobs/pairs.py with the same paths.run_root first.")
    return shards


# train settings a resumed run may change: how long it runs, how often it checkpoints and reports, what it
# writes at the end, how it uses the machine; not what its checkpoints hold
RESUMABLE = ("epochs", "max_steps", "checkpoint_every", "keep_checkpoints", "report_every", "report_poll_s",
             "max_failures", "merge", "max_eval_rows", "overwrite", "cpus_per_worker", "cache_shard_mb",
             "gradient_checkpointing", "loss_chunk_tokens", "teacher_placement")
RUN_CONFIG = "ray-distill-train.json"  # in paths.train_storage, beside Ray Train's run folder
# what the stage writes into paths.student_dir (all that train.overwrite removes there)
STUDENT_OUTPUTS = ("adapter", "model", "lineage.json", "metrics.jsonl", "eval.jsonl", "loss.png", PROJECTIONS,
                   PROJECTIONS_CONFIG)


def resume_config(stage: TrainStage, manifest: Manifest) -> dict[str, Any]:
    """What a run's checkpoints depend on: the labels, the student and every setting not in RESUMABLE."""
    t = asdict(stage.train)
    current = {
        "labels": manifest.fingerprint(), "student": [stage.student.name_or_path, stage.student.revision],
        "train": {k: v for k, v in train_settings_in_use(t).items() if k not in RESUMABLE
                  and not (k == "onpolicy_fraction" and not v)},
        "heldout_fraction": stage.heldout_fraction,
        "loss": loss_settings(stage.loss), "deepspeed": stage.deepspeed}
    if stage.loss.online():
        current["teacher"] = [stage.teacher.name_or_path, stage.teacher.revision]
    if stage.loss.objective != "distill":
        current["pairs"] = pairs_fingerprint(stage.paths.pairs_dir)
    elif stage.train.onpolicy_fraction > 0:
        current["samples"] = read_manifest(stage.paths.samples_dir).fingerprint()
    return json.loads(json.dumps(storage.portable(current), default=str))


def loss_settings(loss: LossConfig) -> dict[str, Any]:
    """The loss settings a run depends on: those of its objective (a KD run's record is what it was before the
    preference objectives existed, so its checkpoints still resume)."""
    settings = asdict(loss)
    kd = ("alpha", "temperature", "divergence", "divergence_kwargs")
    online = ("weights", "layer_map", "hidden_loss")
    if loss.objective == "distill":  # the online terms' settings only where a term needs them (KD runs' stay as were)
        return {k: settings[k] for k in kd + (online if loss.online() else ())}
    settings = {k: v for k, v in settings.items() if k not in online}
    return {k: v for k, v in settings.items() if k not in kd}


def check_resume(stage: TrainStage, current: dict[str, Any]) -> bool:
    """Refuse to resume checkpoints written with a different config (DeepSpeed fails on some, such as another
    ZeRO stage, and trains on others as if nothing changed) unless told to start over; True: start over.
    Only settings both runs know are compared, so a setting added in a later version does not count."""
    folder = Path(stage.paths.train_storage)  # Ray Train's run folder is at a URI run root itself
    if not storage.exists(folder / "train") or not (folder / RUN_CONFIG).exists():
        return False
    old = json.loads((folder / RUN_CONFIG).read_text())
    changed = sorted({f"train.{k}" for k in set(old.get("train", {})) & set(current["train"])
                      if old["train"][k] != current["train"][k]}
                     | {k for k in set(old) & set(current) if k != "train" and old[k] != current[k]})
    if changed and not stage.train.overwrite:
        raise ConfigError(f"{storage.remote_of(folder) or folder} holds checkpoints of a run with a different config (changed: "
                          f"{', '.join(changed)}); re-run that config to resume it, use another paths.run_root, "
                          "or set train.overwrite=true to start over.")
    if changed:
        print(f"train: starting over (train.overwrite=true; changed: {', '.join(changed)})", flush=True)
    return bool(changed)


def record_run(stage: TrainStage, current: dict[str, Any], start_over: bool) -> None:
    """Remove the old run's checkpoints and student outputs when starting over; record this run's config."""
    folder = Path(stage.paths.train_storage)
    if start_over:
        storage.remove(folder / "train")
        for name in STUDENT_OUTPUTS:
            storage.remove(Path(stage.paths.student_dir) / name)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / RUN_CONFIG, current)


def _under(path: str, root: str) -> str:
    """`path` relative to `root` where it lies under it, else its own name."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return Path(path).name


def run(cfg: Any) -> dict[str, Any]:
    """Train the student on the labels under the run root; returns the last metrics and output paths."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.runtime import Ask, check_local_fit, init_ray, interruptible, is_embedded

    stage = train_stage(cfg)
    t = stage.train
    workers = Ask("train.num_workers", t.num_workers, "worker",
                  {"CPU": t.cpus_per_worker, "GPU": 1 if t.use_gpu else 0},
                  "lower train.num_workers or train.cpus_per_worker, raise cluster.num_cpus, or set train.use_gpu=false "
                  "on a machine without GPUs")
    check_local_fit(stage.cluster, workers)
    stage.student = pin_revision(stage.student, "student")  # every worker loads this commit of a hub student
    if stage.loss.online():
        stage.teacher = pin_revision(stage.teacher, "teacher")
    manifest = read_manifest(stage.paths.labels_dir)
    current = resume_config(stage, manifest)
    start_over = check_resume(stage, current)
    shards = label_shards(stage)
    ensure_model(stage.student, "student")
    check_labels_match_student(manifest, stage)
    # what the workers train on: the labels (KD; with on-policy samples mixed in), or the pairs made from them (DPO,
    # KTO); held-out ids stay out of every source
    preference = stage.loss.objective != "distill"
    fraction = stage.heldout_fraction
    columns = PAIR_COLUMNS if preference else REQUIRED_COLUMNS
    sources = training_sources(stage, pair_shards(stage), manifest, labels=shards) if preference else \
        training_sources(stage, shards, manifest)
    rows = sum(len(kept) for _, kept in sources)
    per_worker = rows // t.num_workers
    if per_worker < t.micro_batch_size:
        raise LabelsError(f"{rows} {'pairs' if preference else 'labeled rows'} cannot fill a micro-batch of "
                          f"{t.micro_batch_size} on each of {t.num_workers} workers; label more rows or lower "
                          "train.micro_batch_size.")
    check_sequence_parallel(stage)
    check_online_teacher(stage)
    check_galore(stage)
    # a sequence-parallel group works through every member's micro-batches in turn
    micro_per_epoch = math.ceil(per_worker / t.micro_batch_size) * t.sequence_parallel_size
    steps = t.epochs * micro_per_epoch // t.gradient_accumulation_steps
    total_steps = min(steps, t.max_steps) if t.max_steps else steps
    record_run(stage, current, start_over)
    Path(stage.paths.student_dir).mkdir(parents=True, exist_ok=True)
    spec = WorkerSpec(
        student=stage.student.name_or_path, revision=stage.student.revision,
        precision=training_precision(stage.student, t.use_gpu), method=t.method, lora=asdict(t.lora),
        use_gpu=t.use_gpu,
        micro_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_seq_len=t.max_seq_len, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
        lr_schedule=t.lr_schedule, grad_clip=t.grad_clip, gradient_checkpointing=t.gradient_checkpointing,
        loss_chunk_tokens=t.loss_chunk_tokens,
        total_steps=total_steps, micro_per_epoch=micro_per_epoch, checkpoint_every=t.checkpoint_every, report_every=t.report_every,
        k=manifest.k, loss=asdict(stage.loss), deepspeed=stage.deepspeed, student_dir=stage.paths.student_dir,
        run_name=Path(stage.paths.run_root).name, model_name=_under(stage.paths.student_dir, stage.paths.run_root),
        merge=t.merge, seed=t.seed, sequence_parallel_size=t.sequence_parallel_size, cache_shard_mb=t.cache_shard_mb,
        shuffle=t.shuffle, attn_implementation=stage.student.attn_implementation, optimizer=t.optimizer,
        galore=asdict(t.galore), teacher_placement=t.teacher_placement,
        **({"teacher": stage.teacher.name_or_path, "teacher_revision": stage.teacher.revision,
            "teacher_attn_implementation": stage.teacher.attn_implementation} if stage.loss.online() else {}),
        eval_rows=heldout_rows(shards, fraction, t.max_eval_rows),
        onpolicy_eval_rows=heldout_rows(sources[-1][0], fraction, t.max_eval_rows) if not preference
        and t.onpolicy_fraction else None,
        lineage=storage.portable({"labels_manifest": str(Path(stage.paths.labels_dir) / "manifest.json"),
                 "labels_fingerprint": manifest.fingerprint(), "student_base": stage.student.name_or_path,
                 "student_revision": stage.student.revision,
                 "train": asdict(t), "heldout_fraction": fraction, "loss": asdict(stage.loss),
                 **({"pairs_dir": stage.paths.pairs_dir} if preference else {}),
                 "deepspeed": stage.deepspeed}),  # in a URI run root, its paths as URIs: any node reads it
    )
    init_ray(stage.cluster, workers)
    # Ray 2.60's default Parquet reader (DataSourceV2) lists the files in a task and reads every footer on a pool of
    # actors (up to 32, each a new process): 4.5 s and 8 CPU-seconds before the first row of a one-shard label set on
    # a 2-core node, against 1.3 s and 2 for the file-based reader (V1), which samples at most 10 files' first rows
    # in tasks. Training reads whole shards, with nothing for footer statistics to prune, so V1 serves it.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    parts = []
    for files, kept in sources:
        # the rows a source keeps: by the held-out rule alone where nothing else narrows it (no id set to ship to
        # every read task), else by the set of its ids, put in the object store once
        rule = None if len(sources) > 1 or t.max_rows is not None or preference else fraction
        ids = ray.put(set(kept)) if rule is None else None
        # at a URI run root, read where every node finds them
        parts.append(ray.data.read_parquet([storage.remote_of(f) or f for f in files], columns=["id", *columns])
                     .map_batches(_keep_rows, fn_kwargs={"ids": ids, "heldout_fraction": rule}, batch_format="pyarrow"))
    # an on-policy mix: the samples and the labels interleaved, not one source after the other
    dataset = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:]).randomize_block_order(seed=t.seed)
    # Ray Train's controller collects one report per worker each poll and a worker's next report waits for that:
    # at Ray's default 2 s, a small model idles on every report, and a checkpoint reported just before a crash is
    # never registered, so the replacement group restarts from an older one. Read by fit(), passed to the controller.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(t.report_poll_s)
    if is_embedded(stage.cluster):  # Ray never drains this machine's own nodes: no preemption watcher (a process)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    trainer = TorchTrainer(
        train_loop, train_loop_config=asdict(spec),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name="train", storage_path=storage.remote_of(stage.paths.train_storage)
                             or stage.paths.train_storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
        datasets={"train": dataset},
    )
    with _steps_progress(Path(stage.paths.student_dir) / "metrics.jsonl", total_steps):
        result = interruptible(trainer.fit)  # Ctrl-C reaches the entrypoint, not Ray Train's own handler
    storage.pull(stage.paths.student_dir)  # at a URI run root: what rank 0 sent from its node
    curves = plot_losses(Path(stage.paths.student_dir))
    summary = {"steps": total_steps, "rows": rows, "metrics": result.metrics, "student_dir": stage.paths.student_dir,
               "loss_plot": str(curves) if curves else None}
    what = (f"pairs ({stage.loss.objective})" if preference else "labeled rows" if len(sources) == 1 and not
            t.onpolicy_fraction else f"rows, {len(sources[-1][1]) / rows:.0%} of them the student's own samples")
    print(f"train: {total_steps} steps on {rows} {what}; student in {storage.portable(stage.paths.student_dir)}")
    return summary


def plot_losses(student_dir: Path) -> Path | None:
    """PNG of total/CE/KD loss per step from metrics.jsonl (the last record of each step wins on resume)."""
    path = student_dir / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    steps = sorted(by_step)
    titles = {"loss": "total loss", "ce": "hard-label CE", "kd": "KD divergence", "reward_margin":
              "reward margin (chosen - rejected)", "reward_accuracy": "reward accuracy"}
    keys = [k for k in titles if k in by_step[steps[0]]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.7 * len(keys), 3.2))
    for ax, key in zip(axes, keys):  # one panel each: their scales differ by orders
        ax.plot(steps, [by_step[s][key] for s in steps])
        ax.set_title(titles[key])
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    out = student_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@contextlib.contextmanager
def _steps_progress(metrics: Path, total: int):
    """A live display of the optimizer steps the workers have taken, read from the metrics log that rank 0 appends
    a line to at each step (on a cluster, in shared storage the driver sees too)."""
    from pipeline.console import progress

    bar = progress(desc="train: steps", unit="step", total=total)
    stop = threading.Event()
    offset = metrics.stat().st_size if metrics.exists() else 0  # a resumed run's earlier steps are not this run's

    pending = b""

    def read_new_steps():
        nonlocal offset, pending
        if not metrics.exists():
            return
        with metrics.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        offset += len(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError, KeyError):
                record = json.loads(line)
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
                if record["step"] > bar.n:
                    bar.update(record["step"] - bar.n)  # drawn at most every mininterval
                else:
                    bar.n = record["step"]  # a replaced worker group resumes at its checkpoint's step

    def follow():
        while not stop.wait(1.0):
            read_new_steps()

    thread = threading.Thread(target=follow, daemon=True, name="train-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            if not thread.is_alive():
                with contextlib.suppress(OSError):  # the steps of fit()'s last second (the bar ended short of them)
                    read_new_steps()
        finally:
            bar.close()
