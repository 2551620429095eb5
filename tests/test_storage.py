"""The run root on object storage (pipeline/storage.py) against an S3-compatible server on 127.0.0.1 (moto's
standalone server, tests/s3_server.py): what a stage writes reaches the run root, a node's mirror is made what the
run root holds, and nothing of the run root's is overwritten by an older copy."""
from __future__ import annotations

import os
import time

import pytest

from conftest import free_port
from s3_server import S3Server


@pytest.fixture(scope="module")
def s3():
    with S3Server(free_port()) as server:
        yield server


@pytest.fixture()
def mirror(s3, tmp_path, monkeypatch):
    from pipeline import storage

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    uri = f"s3://{s3.bucket}/unit/{tmp_path.name}"
    storage.activate(uri)
    yield storage.active()
    storage.activate(None)


def test_a_stage_s_files_reach_the_run_root_and_come_back_on_another_node(s3, mirror, tmp_path, monkeypatch):
    from pipeline import storage
    from pipeline.data.schema import write_json_atomic

    local = tmp_path / "cache" / "mirror" / "s3" / s3.bucket / "unit" / tmp_path.name
    assert mirror.local == str(local) and mirror.remote_of(local / "a" / "b.txt") == f"{mirror.remote}/a/b.txt"
    assert mirror.remote_of(tmp_path / "elsewhere") is None
    write_json_atomic(local / "labels" / "manifest.json", {"k": 2})  # a record goes through at once
    prefix = f"unit/{tmp_path.name}"
    assert s3.files(prefix) == {f"{prefix}/labels/manifest.json": (local / "labels" / "manifest.json").stat().st_size}
    (local / "student" / "model").mkdir(parents=True)
    (local / "student" / "model" / "w.bin").write_bytes(b"x" * 1000)
    storage.push(local)
    assert s3.files(prefix)[f"{prefix}/student/model/w.bin"] == 1000
    # another node: an empty cache of its own, made what the run root holds
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "other-node"))
    other = storage.active()
    assert other.local != mirror.local
    storage.pull(other.local)
    assert (os.path.getsize(f"{other.local}/student/model/w.bin"), open(f"{other.local}/labels/manifest.json").read()) \
        == (1000, (local / "labels" / "manifest.json").read_text())
    # a file written there and never sent (a killed run's) stays, and goes with the next push; a copy that was in
    # step and is gone from the run root (another node started over) goes here too, and is never sent back
    open(f"{other.local}/student/model/unsent.bin", "w").write("new")
    s3.filesystem().delete_file(f"{s3.bucket}/{prefix}/student/model/w.bin")
    storage.fetched(f"{other.local}/student/model")
    assert os.path.exists(f"{other.local}/student/model/unsent.bin")
    assert not os.path.exists(f"{other.local}/student/model/w.bin")
    storage.push(other.local)
    assert set(s3.files(f"{prefix}/student")) == {f"{prefix}/student/model/unsent.bin"}


def test_a_file_changed_at_the_run_root_is_not_overwritten_by_an_older_copy(s3, mirror, tmp_path):
    """Ray Train writes its run folder at the run root itself: a push of the stage's mirror must not send back
    the copy it fetched before. A file changed here is sent; one changed there is left alone."""
    from pipeline import storage

    local = mirror.local
    os.makedirs(f"{local}/train/train")
    open(f"{local}/train/train/state.json", "w").write("v1")
    storage.push(local)
    time.sleep(1.1)  # the run root's times have whole seconds
    with s3.filesystem().open_output_stream(f"{s3.bucket}/unit/{tmp_path.name}/train/train/state.json") as f:
        f.write(b"v2, written at the run root")
    open(f"{local}/student.txt", "w").write("new here")
    storage.push(local)
    with s3.filesystem().open_input_stream(f"{s3.bucket}/unit/{tmp_path.name}/train/train/state.json") as f:
        assert f.read() == b"v2, written at the run root"
    assert f"unit/{tmp_path.name}/student.txt" in s3.files(f"unit/{tmp_path.name}")
    # and a file changed here after it was sent is sent again
    time.sleep(1.1)
    open(f"{local}/student.txt", "w").write("changed here, longer")
    storage.push(local)
    assert s3.files(f"unit/{tmp_path.name}")[f"unit/{tmp_path.name}/student.txt"] == len("changed here, longer")


def test_a_model_moved_into_place_is_kept_until_it_is_sent(s3, mirror, tmp_path):
    """Quantize stages its model, sends it, then renames it into place: until the renamed folder is sent, its files
    count as never sent, so a run killed in between loses neither copy (the next pull keeps them, its push sends them)."""
    from pipeline import storage

    local = mirror.local
    os.makedirs(f"{local}/.quantized.staging")
    open(f"{local}/.quantized.staging/model.bin", "w").write("4-bit")
    storage.push(f"{local}/.quantized.staging")
    os.rename(f"{local}/.quantized.staging", f"{local}/quantized")
    storage.moved(f"{local}/quantized")
    storage.pull(local)  # the next run's start, after a kill before the push
    assert open(f"{local}/quantized/model.bin").read() == "4-bit"
    storage.push(local)
    assert f"unit/{tmp_path.name}/quantized/model.bin" in s3.files(f"unit/{tmp_path.name}")


def test_remove_and_exists_see_both_sides(s3, mirror, tmp_path):
    from pipeline import storage

    local = mirror.local
    os.makedirs(f"{local}/quantized")
    open(f"{local}/quantized/model.bin", "w").write("q")
    storage.push(local)
    # a folder only the run root holds (Ray Train's checkpoints are never fetched)
    with s3.filesystem().open_output_stream(f"{s3.bucket}/unit/{tmp_path.name}/train/train/checkpoint_1/x") as f:
        f.write(b"c")
    assert storage.exists(f"{local}/train/train") and not os.path.exists(f"{local}/train/train")
    storage.pull(local)
    assert not os.path.exists(f"{local}/train/train/checkpoint_1/x")
    storage.remove(f"{local}/quantized")
    storage.remove(f"{local}/train/train")
    assert not os.path.exists(f"{local}/quantized") and s3.files(f"unit/{tmp_path.name}") == {}
    assert not storage.exists(f"{local}/train/train")


@pytest.mark.parametrize("uri, says", [
    ("s3://AKIAEXAMPLE:secret@bucket/runs", "carries a credential in its URI"),
    ("s3://AKIAEXAMPLE@bucket/runs", "carries a credential in its URI"),
    ("s3://bucket/runs?access_key=AKIAEXAMPLE&secret_key=x", "carries options after '\\?' or '#'"),
    ("s3://bucket/runs?region=us-east-1", "carries options after"),
    ("nosuchfs://bucket/runs", "cannot be opened"),
])
def test_a_run_root_uri_that_names_a_credential_or_no_filesystem_is_refused(uri, says):
    from pipeline import storage
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        storage.check_uri(uri, "paths.run_root")


def test_a_run_root_the_storage_does_not_answer_is_one_sentence(tmp_path):
    """Storage that refuses the connection: one sentence naming the run root and what to check, before any work."""
    import subprocess
    import sys

    from conftest import REPO
    from s3_server import env_with

    closed = S3Server(free_port())  # never started: nothing listens on its port
    proc = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "label.py"), "debug=tiny",
                           "paths.root=s3://bucket/prefix"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env_with(closed, tmp_path / "cache"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: Cannot write s3://bucket/prefix/default (")
    assert not (tmp_path / "cache" / "mirror" / "s3" / "bucket" / "prefix" / "default" / "labels").exists()
