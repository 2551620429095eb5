"""Shared fixtures: tiny models and corpora built locally (no download), and helpers to run entrypoints."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def free_port() -> int:
    """A TCP port that is free now and that nobody else is handed meanwhile: below Linux's ephemeral range (32768 up,
    where bind(0) and every outgoing connection take theirs, so a port found with bind(0) can be taken by another
    test's Ray before the server that was meant to listen on it starts) and above Ray's worker ports (10002-19999)."""
    import random
    import socket

    for _ in range(200):
        port = random.randrange(20000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def run_job(script: str, *overrides: str, timeout: int = 900, check: bool = True,
            env: dict[str, str] | None = None, head: tuple | None = None) -> subprocess.CompletedProcess:
    """Run `python ray_jobs/<script> overrides...` exactly as a user would, from the repo root (`env`: variables
    to add, e.g. an offline Hugging Face cache; `head`: see `start_job`)."""
    return start_job(script, *overrides, env=env, head=head).result(timeout, check)


class start_job:
    """`python ray_jobs/<script> overrides...` started now, its output kept in files (no pipe to fill while nobody
    reads it); `result()` waits for it, as `run_job` returns it.

    `head` (conftest's `ray_head`): the driver joins that Ray head with `RAY_ADDRESS`, as a user's driver joins a
    cluster, instead of starting an embedded Ray of its own, and runs with the head's environment (its workers are
    the head's processes). Measured here: 5-6 s less for a reference-mode label run, 10-12 s less for a training run
    (no Ray to start and stop, and Ray Data's helper actors already up)."""

    def __init__(self, script: str, *overrides: str, env: dict[str, str] | None = None, head: tuple | None = None):
        import tempfile

        self.script = script
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.args = [sys.executable, str(REPO / "ray_jobs" / script), *overrides]
        joined = {**head[2], "RAY_ADDRESS": head[6]} if head else {}
        self.proc = subprocess.Popen(self.args, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **joined,
                                                               **(env or {})},
                                     stdout=self.out, stderr=self.err, text=True)

    def result(self, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.out.seek(0)
        self.err.seek(0)
        proc = subprocess.CompletedProcess(self.args, code, self.out.read(), self.err.read())
        if check and code != 0:
            raise AssertionError(f"{self.script} failed ({code}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc


def interrupt_like_a_terminal(proc: subprocess.Popen, lines: list[str]) -> tuple[int, float]:
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group of `proc` (started with
    `start_new_session=True`), the embedded Ray's processes included. Waits up to 30 s for it to exit and then up to
    the same 30 s for every process of its session to be gone; returns (exit code, seconds to exit). `lines`: its
    output so far, for the failure message."""
    import time

    import psutil

    from pipeline.runtime import interrupt_and_wait

    started = time.monotonic()
    code = interrupt_and_wait(proc, timeout=30, group=True)
    took = time.monotonic() - started

    def session(p):
        try:
            return os.getsid(p.pid)
        except OSError:
            return None

    while left := [" ".join(p.info["cmdline"] or [])[:120] for p in psutil.process_iter(["cmdline"])
                   if session(p) == proc.pid]:
        assert time.monotonic() - started < 30, (left, "".join(lines[-40:]))
        time.sleep(0.5)
    return code, took


# A test is `slow` (left out by `make test-fast`) when it runs a stage entrypoint, an engine or a Ray cluster: every
# test of these modules, and any test that uses one of these fixtures.
SLOW_MODULES = {"test_chain", "test_train_stage", "test_label_stage", "test_ray_job_submit", "test_autoscaling"}
SLOW_FIXTURES = {"server", "client", "run_root", "hub_models", "ray_head", "submitted_label_run", "chain"}


# runs last: the application it deploys on the shared Ray head outlives its job and holds a CPU other jobs would wait for
LAST = "test_serve_job_deploys_on_the_head_and_prints_the_url"


def _slow(item) -> bool:
    return item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or bool(SLOW_FIXTURES & set(item.fixturenames))


def pytest_collection_modifyitems(items):
    """Order: the quick tests, while the chain run and the Ray head start beside them (`_started_early`); then the
    chain's tests; then the other slow ones (nothing that starts engines runs beside the chain run); `LAST` last."""
    for item in items:
        if _slow(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: (item.name == LAST, _slow(item) and "chain" not in item.fixturenames, _slow(item)))


_EARLY: dict = {}


@pytest.fixture(scope="session", autouse=True)
def _started_early(request):
    """The chain run (conftest's `chain`, 2-3 minutes) and the Ray head (`ray_head`) are started when the session
    starts, if any selected test uses them: they run beside the quick tests, which use one of the two cores, and
    their fixtures wait for them."""
    import threading

    uses = set().union(*(item.fixturenames for item in request.session.items))
    if "chain" in uses:
        hub = request.getfixturevalue("hub_models")
        uri, root = on_s3(hub, request.getfixturevalue("tmp_path_factory").mktemp("chain").name)
        args = _chain_args(uri, root, hub)
        from ray_head import Scraper

        port = free_port()  # the chain's embedded Ray serves its metrics there; scraped every second while it runs
        _EARLY["figures"] = Scraper(port).__enter__()
        _EARLY["chain"] = (root, args, start_job("run.py", *args, f"cluster.metrics_export_port={port}",
                                                 env={**hub["env"], "RAY_metrics_report_interval_ms": "1000"}), hub)
    if "ray_head" in uses:
        from ray_head import start_head

        hub = request.getfixturevalue("hub_models")
        box: dict = {}

        def start():
            try:
                box["head"] = start_head(hub["env"], free_port)
            except BaseException as e:  # noqa: BLE001 - raised by `ray_head`, in the test that needs it
                box["error"] = e

        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        _EARLY["ray_head"] = (thread, box)
    yield
    _EARLY.clear()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny tokenizer, teacher and student exactly as conf/{teacher,student}/tiny.yaml build them."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = tmp_path_factory.mktemp("models-run")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["debug=tiny", f"paths.run_root={root}"])
    out = {}
    for role in ("teacher", "student"):
        model = OmegaConf.to_container(cfg[role], resolve=True)
        instantiate(model["build"], out_dir=model["name_or_path"])
        out[role] = Path(model["name_or_path"])
    out["tokenizer"] = Path(model["build"]["tokenizer_dir"])
    out["run_root"] = root
    return out


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server on 127.0.0.1 for the session (tests/s3_server.py, moto's): the run roots of the chain
    and of the submitted label run live in its bucket."""
    from s3_server import S3Server

    with S3Server(free_port()) as server:
        yield server


@pytest.fixture(scope="session")
def hub_models(tiny_models, tmp_path_factory, s3) -> dict:
    """The tiny teacher and student published as hub repos `ray-distill/tiny-teacher` and `ray-distill/tiny-student`
    (tag `v1`) in a Hugging Face cache, with the offline environment that loads them from it: the code path of a
    user whose models come from the hub, without a network. Overrides select them in place of the local builds.
    The environment also reaches the session's S3 server (`s3`), with this machine's mirrors of run roots there
    under one cache folder (`on_s3`)."""
    from hub_cache import offline_env, publish

    cache = tmp_path_factory.mktemp("hf-cache")
    commits = {role: publish(tiny_models[role], cache, f"ray-distill/tiny-{role}", tag="v1")
               for role in ("teacher", "student")}
    overrides = [f"{role}.{key}={value}" for role in ("teacher", "student")
                 for key, value in (("name_or_path", f"ray-distill/tiny-{role}"), ("revision", "v1"),
                                    ("build", "null"))]
    env = {**offline_env(cache), **s3.env, "RAY_DISTILL_CACHE": str(tmp_path_factory.mktemp("node-cache"))}
    return {"cache": cache, "env": env, "commits": commits, "overrides": overrides, "s3": s3}


def on_s3(hub: dict, name: str) -> tuple[str, Path]:
    """A run root in the session's bucket: its URI, and this machine's mirror of it (what the run wrote, as files)."""
    bucket = hub["s3"].bucket
    return f"s3://{bucket}/{name}", Path(hub["env"]["RAY_DISTILL_CACHE"]) / "mirror" / "s3" / bucket / name


@pytest.fixture(scope="session")
def ray_head(hub_models):
    """A real 2-CPU Ray head (`ray start --head`, tests/ray_head.py) whose processes see the offline hub cache,
    started at the session's start (`_started_early`)."""
    from ray_head import start_head, stop_head

    if "ray_head" in _EARLY:
        thread, box = _EARLY["ray_head"]
        thread.join(300)
        if "error" in box:
            raise box["error"]
        head = box["head"]
    else:
        head = start_head(hub_models["env"], free_port)
    yield head
    stop_head(head[3], head[4])


@pytest.fixture(scope="session")
def submitted_label_run(ray_head, hub_models, tmp_path_factory) -> dict:
    """The label stage in generate mode over a corpus salted with every kind of bad row (400 good rows), its teacher
    named by hub id and tag. First run here and SIGKILLed — driver, embedded Ray and vLLM at once — as soon as its
    first shards are written; then the same command is submitted as a Ray job to the real head (`ray job submit
    --working-dir .`) and finishes the rest. The label stage's generate run, its kill and resume included, for
    tests/test_label_stage.py, and the cluster path's label job for tests/test_ray_job_submit.py. Its run root is in
    the session's S3 bucket (`root`: this machine's mirror of it), so the killed run's shards are resumed from there.
    The head's Prometheus endpoint is scraped every second while the job runs (`scraped`: the project's metrics)."""
    import signal
    import time

    import psutil

    from labels_check import read_dir, write_corpus
    from ray_head import Scraper, submit

    corpus = tmp_path_factory.mktemp("label-generate")
    uri, root = on_s3(hub_models, corpus.name)  # the run root in the session's bucket, its shards sent as written
    paths, good, total = write_corpus(corpus / "corpus", 400, with_response=False, seed=3)
    args = ["ray_jobs/label.py", "debug=tiny", f"paths.run_root={uri}", "data.build=null",
            f"data.paths=[{','.join(str(p) for p in paths)}]", "label.mode=generate", "label.max_response_tokens=48",
            *hub_models["overrides"]]
    killed = subprocess.Popen([sys.executable, str(REPO / args[0]), *args[1:], "label.batch_size=4",
                               "label.prepare_batch_size=8"], cwd=REPO, env={**os.environ, **hub_models["env"]},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list((root / "labels").glob("part-*.parquet")) and killed.poll() is None:
        assert time.time() < deadline, "no shards within 10 minutes"
        time.sleep(0.1)
    assert killed.poll() is None, "the run finished before it could be killed; give it more rows"
    for p in psutil.Process(killed.pid).children(recursive=True) + [psutil.Process(killed.pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    killed.wait()
    partial = read_dir(root / "labels").num_rows
    with Scraper(ray_head[5]) as scraped:  # the head's Prometheus endpoint while the job runs
        proc = submit(ray_head, *args)
        ended = scraped.elapsed()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    commit = hub_models["commits"]["teacher"]
    teacher = hub_models["cache"] / "models--ray-distill--tiny-teacher" / "snapshots" / commit
    return {"mode": "generate", "root": root, "paths": paths, "good": good, "total": total, "proc": proc,
            "teacher": teacher, "partial": partial, "scraped": scraped.samples, "scraped_until": ended}


ALL_LINEAR = "train.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


@pytest.fixture(scope="session")
def chain(tmp_path_factory, hub_models):
    """One tiny chain run (ray_jobs/run.py: SFT teacher → label → train → quantize → evaluate) on the hub models,
    both trainings under ZeRO-3 with optimizer states and parameters offloaded to CPU memory (the teacher's SFT:
    full fine-tuning; the student's KD: LoRA), with the LM head fused into the loss (64 positions a chunk). Its run
    root is in the session's S3 bucket (`on_s3`). The chain's tests (tests/test_chain.py) and the job-submitted serve
    test (its quantized student) use it. Returns (this machine's mirror of the run root, the run's overrides, the
    finished process, hub_models)."""
    if "chain" in _EARLY:  # started with the session
        root, args, job, hub = _EARLY["chain"]
        proc = job.result()
        _EARLY["figures"].__exit__()
        return root, args, proc, hub
    uri, root = on_s3(hub_models, tmp_path_factory.mktemp("chain").name)
    args = _chain_args(uri, root, hub_models)
    return root, args, run_job("run.py", *args, env=hub_models["env"]), hub_models


@pytest.fixture(scope="session")
def chain_figures(chain) -> list:
    """What the chain's embedded Ray served to Prometheus while the chain ran, scraped every second: the project's
    samples [(seconds, name, labels, value)] (ray_head.Scraper)."""
    assert "figures" in _EARLY, "the chain was not started with the session, so nobody scraped it"
    return _EARLY["figures"].samples


def _chain_args(uri: str, root: Path, hub_models: dict) -> list[str]:
    return ["debug=tiny", f"paths.run_root={uri}", *hub_models["overrides"], "run.teacher_sft.enabled=true",
            "train.lr=1e-2", "train.epochs=6", ALL_LINEAR, "deepspeed=zero3_offload", "train.loss_chunk_tokens=64",
            f"evaluate.baseline_path={uri}/teacher_sft/student/model"]
