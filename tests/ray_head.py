"""A real Ray cluster head on 127.0.0.1 (`ray start --head`) for the tests that submit stages as Ray jobs, as a user
submits them to a cluster: started once per session (conftest's `ray_head`), stopped without touching any other Ray
on the machine."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start_head(extra_env: dict[str, str], free_port, num_cpus: int = 2,
               worker_nodes: dict | None = None) -> tuple[str, str, dict[str, str], Path, int, int, str]:
    """Start a head of `num_cpus` CPUs; returns (the `ray` CLI, the dashboard address jobs are submitted to, the
    environment the CLI and every process of the head run with, the head's temp dir, its Ray Client server's port,
    the port on which it serves its metrics to Prometheus, the GCS address a driver joins it at as `RAY_ADDRESS`).

    `worker_nodes` (autoscaler node types: resources, min_workers, max_workers) makes it an autoscaling cluster of
    fake nodes, as Ray's `ray.cluster_utils.AutoscalingCluster` starts one: the head runs the autoscaler with Ray's
    fake multi-node provider, which starts each node it adds as a real raylet on this machine and stops it when it
    has idled for 6 s. AutoscalingCluster itself cannot be used: in Ray 2.60's wheel it reads a config file the wheel
    does not ship (fake_multi_node/example.yaml), and it runs `ray stop --force`, which would stop every other Ray on
    the machine; `autoscaling_config` is the same config."""
    # Ray's socket paths must stay under 107 bytes, so its temp dir cannot live under pytest's tmp_path
    temp_dir = Path(tempfile.mkdtemp(prefix="rd-ray-"))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dash, agent, client, metrics = free_port(), free_port(), free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    autoscaling = []
    if worker_nodes is not None:
        config = temp_dir / "autoscaling.json"
        config.write_text(json.dumps(autoscaling_config(num_cpus, worker_nodes, f"127.0.0.1:{gcs}")))
        autoscaling = [f"--autoscaling-config={config}"]
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    # Ray 2.60 turns token auth on for new local clusters; say so explicitly so the CLI sends the token
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())  # 9101 by default: another test's Serve may hold it
    env["RAY_metrics_report_interval_ms"] = "1000"  # workers hand their metrics to the node's agent every second
    env.update(extra_env)  # e.g. every Ray process of the head (the job's driver too) sees an offline HF cache
    # the job driver runs `python` from PATH: make it this interpreter (the one with the project installed)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={num_cpus}", *autoscaling,
                    # the job agent's HTTP port defaults to 52365 on every Ray: another Ray on this machine (a test
                    # running beside this one) may hold it, and the head then answers "No available agent" forever
                    f"--dashboard-agent-listen-port={agent}",
                    # Ray Client's server (10001 by default) is started apart from the head's other processes: its
                    # own port, by which stop_head finds it
                    f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_job_agent(ray_bin, address, env)
    except BaseException:
        stop_head(temp_dir, client)
        raise
    return ray_bin, address, env, temp_dir, client, metrics, f"127.0.0.1:{gcs}"


def autoscaling_config(head_cpus: int, worker_nodes: dict, gcs_address: str) -> dict:
    """The cluster config of Ray's fake multi-node provider, as `AutoscalingCluster` builds it from the example in
    Ray's source (python/ray/autoscaler/_private/fake_multi_node/example.yaml), for a head on `gcs_address`."""
    return {
        "cluster_name": "fake_multinode", "max_workers": sum(t["max_workers"] for t in worker_nodes.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                      "max_workers": 0},
                                 **{name: {"node_config": {}, **t} for name, t in worker_nodes.items()}},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": []}


def wait_for_job_agent(ray_bin: str, address: str, env: dict, timeout_s: float = 180) -> None:
    """`ray start` returns before the head's dashboard agent takes jobs; on a loaded machine a submission then
    fails with "No available agent to submit job". Submit an empty job until one is taken, as a user would retry."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc = subprocess.run([ray_bin, "job", "submit", f"--address={address}", "--", "true"], env=env,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return
        assert "No available agent" in proc.stdout + proc.stderr and time.monotonic() < deadline, \
            proc.stdout[-2000:] + proc.stderr[-2000:]
        time.sleep(2)


def stop_head(temp_dir: Path, client_port: int | None = None) -> None:
    """Stop this head's processes only (`ray stop` would stop every Ray cluster on the machine): those whose
    command line names its temp dir or its Ray Client server's port, and everything they started."""
    import shutil

    import psutil

    def ours(cmdline: list[str]) -> bool:
        return any(str(temp_dir) in a for a in cmdline) or (
            "ray.util.client.server" in cmdline and f"--port={client_port}" in cmdline)

    for _ in range(3):  # again, for what started meanwhile (an autoscaling head's monitor adding a fake node)
        roots = [p for p in psutil.process_iter(["cmdline"]) if ours(p.info["cmdline"] or [])]
        if not roots:
            break
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
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit(ray_head, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python <args>` from the repo root, as a user submits a stage."""
    ray_bin, address, env, *_ = ray_head
    return subprocess.run([ray_bin, "job", "submit", f"--address={address}", "--working-dir", ".", "--", "python",
                           *args], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=timeout)


class Scraper:
    """Polls a Prometheus endpoint (a Ray node's metrics export port) every `every_s` seconds while in a `with`
    block, keeping every sample whose name starts with `prefix`: [(seconds since start, name, labels, value)]."""

    def __init__(self, port: int, prefix: str = "ray_distill_", every_s: float = 1.0):
        import threading

        self.url, self.prefix, self.every_s = f"http://127.0.0.1:{port}/metrics", prefix, every_s
        self.samples: list[tuple[float, str, dict[str, str], float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self.start = time.monotonic()
        self.thread.start()
        return self

    def elapsed(self) -> float:
        """Seconds since the scraping started (the samples' clock)."""
        return time.monotonic() - self.start

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)

    def _poll(self) -> None:
        import re
        import urllib.request

        start = self.start
        sample = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')
        while not self.stop.is_set():
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                text = ""
            now = time.monotonic() - start
            for line in text.splitlines():
                match = sample.match(line) if line.startswith(self.prefix) else None
                if match:
                    labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
                    self.samples.append((now, match.group(1), labels, float(match.group(3))))
            self.stop.wait(self.every_s)
