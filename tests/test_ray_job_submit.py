"""A user's cluster path: `ray start --head` on 127.0.0.1, then `ray job submit --working-dir .` of the
label stage, which must succeed and write the labels, and of the serve stage, whose application must outlive
the job and answer the official `openai` client at the URL the job printed. The head's nodes share a Hugging Face
cache with no hub access (as cluster/ sets HF_HOME on shared storage): the label job names its teacher by hub id
and tag, and every teacher actor loads the commit the driver pinned."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, free_port
from labels_check import read_dir


@pytest.fixture(scope="module")
def ray_head(hub_models):
    # Ray's socket paths must stay under 107 bytes, so its temp dir cannot live under pytest's tmp_path
    temp_dir = Path(tempfile.mkdtemp(prefix="rd-ray-"))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dash, agent = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray 2.60 turns token auth on for new local clusters; say so explicitly so the CLI sends the token
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())  # 9101 by default: another test's Serve may hold it
    env.update(hub_models["env"])  # every Ray process of the head (the job's driver too) sees the offline cache
    # the job driver runs `python` from PATH: make it this interpreter (the one with the project installed)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                    # the job agent's HTTP port defaults to 52365 on every Ray: another Ray on this machine (a test
                    # running beside this one) may hold it, and the head then answers "No available agent" forever
                    f"--dashboard-agent-listen-port={agent}",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=180)
    try:
        _wait_for_job_agent(ray_bin, f"http://127.0.0.1:{dash}", env)
        yield ray_bin, f"http://127.0.0.1:{dash}", env
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_agent(ray_bin: str, address: str, env: dict, timeout_s: float = 180) -> None:
    """`ray start` returns before the head's dashboard agent takes jobs; on a loaded machine a submission then
    fails with "No available agent to submit job". Submit an empty job until one is taken, as a user would retry."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        proc = subprocess.run([ray_bin, "job", "submit", f"--address={address}", "--", "true"], env=env,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return
        assert "No available agent" in proc.stdout + proc.stderr and time.monotonic() < deadline, \
            proc.stdout[-2000:] + proc.stderr[-2000:]
        time.sleep(2)


def _stop_cluster(temp_dir: Path) -> None:
    """Stop this head's processes only (`ray stop` would stop every Ray cluster on the machine): those whose
    command line names its temp dir, and everything they started."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if any(str(temp_dir) in a for a in p.info["cmdline"] or ())]
    procs = set(roots)
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.update(root.children(recursive=True))
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)  # a test cluster: what has not stopped by then is killed
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def test_label_job_submitted_to_a_real_head(ray_head, hub_models, tmp_path):
    ray_bin, address, env = ray_head
    run_root = tmp_path / "run"
    proc = subprocess.run(
        [ray_bin, "job", "submit", f"--address={address}", "--working-dir", ".", "--",
         "python", "ray_jobs/label.py", "debug=tiny", f"paths.run_root={run_root}", *hub_models["overrides"]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout
    # the job's driver joined the head (ray.init under RAY_ADDRESS) rather than starting a Ray of its own: the head's
    # state API lists the teacher actor the job ran
    listed = subprocess.run([ray_bin, "list", "actors", f"--address={address}", "--format=json", "--limit=1000",
                             "--detail"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert any("VLLMGenerator" in (a.get("class_name") or "") for a in json.loads(listed.stdout)), listed.stdout[-2000:]
    labels = read_dir(run_root / "labels")
    assert labels is not None and labels.num_rows == 24  # debug=tiny generates 24 rows, all valid
    teacher = json.loads((run_root / "labels" / "manifest.json").read_text())["teacher"]
    assert teacher["name_or_path"] == "ray-distill/tiny-teacher"
    assert teacher["revision"] == hub_models["commits"]["teacher"]
    assert not (run_root / "models").exists()  # no local build: the teacher came from the cache


def test_serve_job_deploys_on_the_head_and_prints_the_url(ray_head, tiny_models, tmp_path):
    import re

    import openai

    ray_bin, address, env = ray_head
    run_root = tmp_path / "run"
    shutil.copytree(tiny_models["student"], run_root / "student" / "model")
    port = free_port()
    proc = subprocess.run(
        [ray_bin, "job", "submit", f"--address={address}", "--working-dir", ".", "--",
         "python", "ray_jobs/serve.py", "debug=tiny", f"paths.run_root={run_root}", f"serve.port={port}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout  # the job ends; the application stays deployed on the cluster
    url = re.search(r"at (http://\S+)/v1", proc.stdout).group(1)
    assert url == f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2, timeout=120)
    assert [m.id for m in client.models.list().data] == ["student"]
    reply = client.chat.completions.create(model="student", messages=[{"role": "user", "content": "what is 2 + 3?"}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
