"""The tiny chain with its run root on S3 (`paths.root=s3://...`), against an S3-compatible server on 127.0.0.1
(moto's standalone server, tests/s3_server.py): a label run SIGKILLed once its first shards reached the bucket is
resumed by the chain exactly once, every stage's artifacts land in the bucket (corpus, models, labels, Ray Train's
checkpoints, the student, the quantized student, the evaluation, chain.json, the logs), no credential is written
anywhere, and a second node with an empty cache finds the whole run there (every stage skipped)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, free_port
from s3_server import ACCESS_KEY, SECRET_KEY, S3Server, env_with

pytestmark = pytest.mark.slow
ROWS = 400


def _args(root: str) -> list[str]:
    return ["debug=tiny", f"paths.root={root}", "run_name=s3chain", f"data.build.num_rows={ROWS}", "train.max_rows=24"]


def test_the_chain_runs_on_s3_and_resumes_a_killed_label_run(tmp_path):
    import pyarrow.dataset as pads

    with S3Server(free_port()) as s3:
        node_a, prefix = env_with(s3, tmp_path / "node-a"), "runs/s3chain"
        args = _args(f"s3://{s3.bucket}/runs")
        killed = subprocess.Popen([sys.executable, str(REPO / "ray_jobs" / "label.py"), *args, "label.batch_size=2",
                                   "label.prepare_batch_size=4"], cwd=REPO, env=node_a,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not any("/labels/part-" in k for k in s3.files(prefix)) and killed.poll() is None:
            assert time.time() < deadline, "no shard reached the bucket within 5 minutes"
            time.sleep(0.2)
        assert killed.poll() is None, "the label run finished before it could be killed; give it more rows"
        for p in psutil.Process(killed.pid).children(recursive=True) + [psutil.Process(killed.pid)]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        killed.wait()
        partial = sum(1 for k in s3.files(prefix) if "/labels/part-" in k)

        chain = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "run.py"), *args], cwd=REPO, env=node_a,
                               capture_output=True, text=True, timeout=900)
        assert chain.returncode == 0, chain.stdout[-3000:] + chain.stderr[-5000:]
        resumed = [line for line in chain.stdout.splitlines() if line.startswith(f"label: rows read {ROWS} = ")]
        assert resumed and "(0 finished by an earlier run)" not in resumed[0], chain.stdout[-3000:]
        assert f"run root s3://{s3.bucket}/runs/s3chain" in chain.stdout

        files = s3.files(prefix)
        for wanted in ("data/arithmetic-train.jsonl", "models/tiny-teacher/model.safetensors", "labels/manifest.json",
                       "labels/timeline.csv", "train/ray-distill-train.json", "student/lineage.json",
                       "student/adapter/adapter_model.safetensors", "student/metrics.jsonl",
                       "quantized/model.safetensors", "quantized/manifest.json", "eval/metrics.json", "eval/report.md",
                       "chain.json", "logs/run.log", "logs/label.log"):
            assert f"{prefix}/{wanted}" in files, f"{wanted} is not in the bucket"
        assert any("/train/train/checkpoint_" in k for k in files), "Ray Train wrote no checkpoint to the bucket"
        assert not any("staging" in k for k in files)

        # every corpus row exactly once, labeled or rejected, read back from the bucket
        fs = s3.filesystem()
        keys = []
        for folder in ("labels", "rejected"):
            if any(k.startswith(f"{prefix}/{folder}/part-") for k in files):
                table = pads.dataset(f"{s3.bucket}/{prefix}/{folder}", filesystem=fs, format="parquet",
                                     exclude_invalid_files=True).to_table(columns=["source", "line"])
                keys += list(zip(table.column("source").to_pylist(), table.column("line").to_pylist()))
        assert len(keys) == len(set(keys)) == ROWS, (len(keys), len(set(keys)), partial)

        # no credential in anything the run wrote: the bucket and this node's mirror, logs included
        for key in files:
            with fs.open_input_stream(f"{s3.bucket}/{key}") as f:
                data = f.read()
            assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, key
        for folder, _, names in os.walk(tmp_path / "node-a"):
            for name in names:
                data = open(os.path.join(folder, name), "rb").read()
                assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, name

        # a second node, its cache empty: the run root alone holds the whole run
        again = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "run.py"), *args], cwd=REPO,
                               env=env_with(s3, tmp_path / "node-b"), capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        skipped = [line for line in again.stdout.splitlines() if line.startswith("run: ") and " skipped " in line]
        assert len(skipped) == 4, again.stdout[-3000:]
