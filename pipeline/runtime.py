"""Ray start-up and the user-facing error boundary shared by every `ray_jobs/` entrypoint.

Under `ray job submit` RAY_ADDRESS is set and `ray.init()` joins that cluster; on a laptop the same call
starts an embedded local Ray, so one config runs in both places.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import ClusterConfig
from pipeline.errors import ConfigError, DistillError

log = logging.getLogger("ray_distill")


def is_embedded(cluster: ClusterConfig) -> bool:
    """Whether the run starts (or started) its own local Ray: `cluster.address` is "local", or neither it nor
    RAY_ADDRESS names a cluster."""
    return cluster.address == "local" or (cluster.address is None and not os.environ.get("RAY_ADDRESS"))


@dataclass(frozen=True)
class Ask:
    """What a stage needs at once: `count` × `each` (resource → amount), named for the error by the `setting` that
    sets `count`, the `noun` counted and the `fix` to suggest."""
    setting: str
    count: int
    noun: str
    each: dict[str, float]
    fix: str


def init_ray(cluster: ClusterConfig, *asks: Ask) -> None:
    """Join the configured cluster (or RAY_ADDRESS), else start a local one (no-op when Ray is up); then each of
    `asks` must fit (`require_resources`). An embedded Ray is checked before it starts (`local_resources`), so a
    run that cannot fit starts no Ray."""
    import ray

    if not ray.is_initialized():
        check_local_fit(cluster, *asks)
        from pipeline import storage

        env_vars = {**storage.worker_env(), **{k: str(v) for k, v in cluster.env_vars.items()}}
        runtime_env: dict = {"env_vars": env_vars}
        kwargs = {}
        if is_embedded(cluster):
            kwargs = dict(num_cpus=cluster.num_cpus, include_dashboard=False)
            if cluster.metrics_export_port is not None:  # Ray's documented (if underscored) argument for it
                kwargs["_metrics_export_port"] = cluster.metrics_export_port
            runtime_env["worker_process_setup_hook"] = quiet_state_api_pollers
        ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=True, **kwargs)
    for ask in asks:
        require_resources(cluster, ask)


def check_local_fit(cluster: ClusterConfig, *asks: Ask) -> None:
    """Before an embedded Ray starts: stop with one sentence when it could not hold each of `asks`. A stage calls
    this before its first piece of work (building a model, reading a corpus); `init_ray` calls it again."""
    import ray

    if asks and is_embedded(cluster) and not ray.is_initialized():
        have = local_resources(cluster)
        for ask in asks:
            _check(cluster, ask, have)


def check_room_for_tasks(cluster: ClusterConfig, pools: dict[str, float], fix: str) -> None:
    """Before an embedded Ray starts: stop with one sentence when the actor pools' minimums (`pools`: the setting that
    sizes each → the CPUs its minimum takes) leave no CPU for Ray Data's read and prepare tasks, which run beside them
    and ask for one each: the pools would start and wait forever for rows. A cluster may grow, so it is not checked."""
    if not is_embedded(cluster):
        return
    have, taken = local_resources(cluster)["CPU"], sum(pools.values())
    if taken + 1 > have + 1e-6:
        raise ConfigError(f"The actor pools' minimums ({', '.join(pools)}) take {taken:g} of the embedded Ray's "
                          f"{have:g} CPUs and leave less than the one Ray Data's reading tasks need beside them, so the stage "
                          f"would wait forever; {fix}.")


def local_resources(cluster: ClusterConfig) -> dict[str, float]:
    """The CPUs and GPUs an embedded Ray has (or will have when it starts): `cluster.num_cpus`, else what Ray
    detects on this machine, as `ray.init` counts them."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.utils import get_num_cpus

    gpus = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    return {"CPU": cluster.num_cpus if cluster.num_cpus is not None else get_num_cpus(), "GPU": gpus}


def require_resources(cluster: ClusterConfig, ask: Ask) -> None:
    """Stop with one sentence when the embedded local Ray cannot hold `ask` at once.

    Ray waits for resources it lacks without end (a Ray Train worker group, a Ray Data actor pool's minimum),
    and an embedded local Ray never grows. A cluster may (an autoscaler), so there the shortfall is logged.
    Totals are compared, so a pool that fits in total but not per node (or per GPU, for fractions of GPUs) is
    not caught here."""
    import ray

    _check(cluster, ask, ray.cluster_resources())


def _check(cluster: ClusterConfig, ask: Ask, total: dict[str, float]) -> None:
    need = {k: ask.count * v for k, v in ask.each.items() if v}
    have = {k: total.get(k, 0) for k in need}
    if all(need[k] <= have[k] + 1e-6 for k in need):  # 1e-6: float products such as 10 × 0.7
        return
    many = ask.count != 1
    problem = (f"{ask.setting}={ask.count} {ask.noun}{'s' if many else ''} of {_amounts(ask.each)} "
               f"need{'' if many else 's'} {_amounts(need)}, but the Ray cluster has {_amounts(have, keep_zero=True)}")
    if is_embedded(cluster):
        raise ConfigError(f"{problem}; {ask.fix}.")
    log.warning("%s now; Ray waits until the cluster has grown to hold them.", problem)


def _amounts(resources: dict[str, float], keep_zero: bool = False) -> str:
    return " and ".join(f"{v:g} {k}{'' if v == 1 else 's'}" for k, v in resources.items() if v or keep_zero)


def quiet_state_api_pollers() -> None:
    """Run in every worker of the embedded local Ray: it has no dashboard, so Ray Train's placement-group
    cleaner finds the state API unavailable at every poll and warns each time (hundreds of lines per training
    run). Its real failures (a placement group it could not remove) are still logged as warnings."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(
        lambda record: "State API may be temporarily unavailable" not in record.getMessage())


def unwrap(error: BaseException) -> BaseException:
    """The DistillError inside a Ray task/actor error, if there is one."""
    seen = error
    while seen is not None:
        if isinstance(seen, DistillError):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    return error


@contextlib.contextmanager
def entrypoint(cfg, name: str):
    """The boundary of every `ray_jobs/` entrypoint: its output routed (pipeline/console.py: the stage's own lines,
    progress and errors to the terminal, everything to `<run_root>/logs/<name>.log`), a DistillError printed as its
    one sentence (exit 2) instead of a traceback, and Ctrl-C or SIGTERM (`ray job stop`) turned into a clean stop.

    A terminal sends Ctrl-C to its whole foreground process group, the embedded Ray's workers and engines included,
    so the error the driver sees first may be a worker's death rather than its own KeyboardInterrupt: once a signal
    has arrived, whatever ends the run is treated as the interruption. A joined driver then disconnects from its
    cluster (with a time limit); a driver that started an embedded Ray exits first and what it started is killed
    right after (`_kill_after_exit`), so nothing of the run is left behind; exit code 130."""
    import signal
    from pathlib import Path

    from pipeline import console

    with user_errors():
        mirror = _open_run_root(cfg, name)
    try:
        log = Path(str(cfg.paths.run_root)) / "logs" / f"{name}.log"
    except Exception:  # noqa: BLE001 - a config that does not resolve is reported by the stage, as one sentence
        log = None
    if log is not None:
        try:
            console.route(log)
        except OSError as e:  # a run root the driver cannot write: the stage itself says so, as one sentence
            print(f"warning: {name}'s output is not kept in {log} ({e.strerror}); all of it goes to the terminal",
                  file=sys.stderr, flush=True)
        if console.log_path():
            print(f"{name}: Ray's, vLLM's and every worker's output in {log}", flush=True)
    received: list[int] = []

    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        received.append(signum)
        if len(received) == 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        with user_errors():
            try:
                yield
            except BaseException:
                if mirror:  # what a failed or interrupted stage wrote is kept: the same command continues from it
                    _send_back(mirror, name, failing=True)
                raise
            if mirror:
                _send_back(mirror, name)
    except BaseException as e:
        if not received or isinstance(e, SystemExit) and e.code == 0:
            raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the shutdown short
        print(f"{name}: interrupted ({signal.Signals(received[0]).name}); stopping Ray and everything this run "
              "started", file=sys.stderr, flush=True)
        stopped = f"{name}: stopped; the same command continues from what this run finished"
        started = _started_here()
        if started:  # an embedded Ray: this process leaves first, then what it started is killed
            _kill_after_exit(started)
            print(stopped, file=sys.stderr, flush=True)
            _exit_without_ray(130)
        within(shutdown_ray, 15)  # a joined cluster: the driver disconnects, the cluster stops the run's actors
        kill_children()
        print(stopped, file=sys.stderr, flush=True)
        sys.exit(130)


def _started_here() -> list:
    """Every process under this one (an embedded Ray's, its workers', engines', HAProxy's)."""
    import psutil

    return psutil.Process().children(recursive=True)


def _kill(procs: list, timeout: float) -> None:
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)


_undertaker = None  # kept open until this process exits: its stdin's end is the signal


def _kill_after_exit(procs: list) -> None:
    """Kill `procs` (an embedded Ray's processes, its workers and engines) once this process has exited, from a
    process of a session of its own (`_kill_listed`), so that a terminal's process group is not waited on for it.

    Why not `ray.shutdown()` and then the children, as a joined driver does: with Ray 2.60 an embedded driver
    interrupted this way can end itself with exit code 1 in the middle of `ray.shutdown()` (whatever of Ray's in the
    driver reaches its core worker once `ray.shutdown()` has removed it, Ray logs "The core worker process is not
    initialized yet or already shutdown" and ends the process), before what is left is killed; and the raylet's
    dashboard agent, orphaned when the raylet goes, then waits for a GCS that is gone and outlives the run (seen once
    on a loaded 2-core box, 30 s after Ctrl-C). Killed after this process has exited, nothing of the run can call
    back into it."""
    import json
    import subprocess
    from pathlib import Path

    global _undertaker
    listed = []
    for proc in procs:
        try:
            listed.append([proc.pid, proc.create_time()])
        except Exception:  # noqa: BLE001 - gone already
            pass
    root = str(Path(__file__).resolve().parents[1])
    code = f"import sys; sys.path.insert(0, {root!r}); from pipeline.runtime import _kill_listed; _kill_listed()"
    _undertaker = subprocess.Popen([sys.executable, "-c", code, json.dumps(listed)], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_listed() -> None:
    """`_kill_after_exit`'s process: waits for the end of its stdin (the driver's exit closes it), then kills the
    processes of its argument ([pid, creation time], ...) that are still those."""
    import json

    import psutil

    sys.stdin.read()
    procs = []
    for pid, created in json.loads(sys.argv[1]):
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                procs.append(proc)
        except psutil.Error:
            pass
    _kill(procs, timeout=10)


def _flushed() -> bool:
    """Flush stdout and stderr; False if one cannot be flushed."""
    ok = True
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - reported by the caller's exit code
            ok = False
    return ok


def _exit_without_ray(code: int) -> None:
    """Exit now with `code`, the last lines delivered (pipeline/console.py) and logging flushed, but without the exit
    handlers that stop an embedded Ray (see `_kill_after_exit`)."""
    from pipeline import console

    console.close()
    logging.shutdown()
    _flushed()
    os._exit(code)


def _open_run_root(cfg, name: str):
    """A URI run root (pipeline/storage.py): the config pointed at this node's mirror, brought up to date."""
    from pipeline import storage

    try:
        mirror = storage.localize(cfg)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - a config that does not resolve is reported by the stage, as one sentence
        return None
    if mirror:
        print(f"{name}: run root {mirror.remote}, worked on in {mirror.local}", flush=True)
        storage.push(mirror.local)  # what a run killed here never sent (a shard, its log) reaches the other nodes
        storage.pull(mirror.local)
    return mirror


def _send_back(mirror, name: str, failing: bool = False) -> None:
    from pipeline import storage
    from pipeline.errors import StorageError

    try:
        storage.push(mirror.local)
    except StorageError as e:
        sentence = f"{e} What this run made is kept in {mirror.local}; the same command sends it."
        if not failing:
            raise StorageError(sentence) from None
        print(f"{name}: {sentence}", file=sys.stderr, flush=True)
    else:
        print(f"{name}: the run's files are in {mirror.remote}", flush=True)


@contextlib.contextmanager
def user_errors():
    """Print a DistillError as its one sentence and exit 2, instead of a traceback from a worker."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - this is the boundary that turns errors into sentences
        inner = unwrap(e)
        if isinstance(inner, DistillError):
            print(f"error: {inner}", file=sys.stderr)
            sys.exit(2)
        raise


def leave() -> None:
    """End an entrypoint's process once its Hydra `main` has returned: non-daemon threads are waited for and the exit
    handlers run (Ray's shutdown, the console's last lines, logging's flush), as at any exit; then the process ends
    without the interpreter's teardown of every loaded module, which serves a process about to end nothing and
    takes a stage driver 1.2 s of CPU with torch, transformers and Ray loaded (0.04 s this way; measured here).
    An entrypoint that fails or is interrupted ends the usual way (`sys.exit`) before it gets here."""
    import atexit

    # what interpreter shutdown runs first, in its order (threading's exit hooks, such as concurrent.futures'
    # stopping its idle workers, then the non-daemon threads joined; then the exit handlers); Python has no public
    # call for either
    threading._shutdown()
    atexit._run_exitfuncs()
    os._exit(0 if _flushed() else 120)  # 120: as Python itself exits when its streams cannot be flushed


def interrupt_and_wait(proc, timeout: float = 90, group: bool = False) -> int:
    """Stop a long-running entrypoint as Ctrl-C would (SIGINT, so it shuts its engines down cleanly); kill its
    process group if it has not exited after `timeout` seconds. `proc` must lead its own process group
    (`start_new_session=True`). `group`: signal the whole process group, as a terminal does (the embedded Ray's
    processes included), instead of the entrypoint alone. Returns its exit code."""
    import signal
    import subprocess

    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def within(call, timeout_s: float, interrupted: threading.Event | None = None):
    """`call()` in a daemon thread: its result, or None if it raised, took longer than `timeout_s` or
    `interrupted` was set meanwhile (the thread is left to die with the process)."""
    box: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: box.update(result=call()), daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    while worker.is_alive() and time.monotonic() < deadline and not (interrupted and interrupted.is_set()):
        worker.join(0.1)
    return box.get("result")


def interruptible(call):
    """`call()` in a daemon thread, waited on from the main one: its result, or its exception raised here. For calls
    that install their own SIGINT handler when run in the main thread — Ray Train 2.60's `fit()` installs one that
    aborts the run and exits with code 0 or 1 — so that Ctrl-C still reaches `entrypoint`, which stops everything
    and exits with 130 (Ray Train skips its handler outside the main thread)."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["result"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True, name="interruptible")
    worker.start()
    while worker.is_alive():
        worker.join(0.2)  # short waits, so a signal's handler runs in the main thread
    if "error" in box:
        raise box["error"]
    return box.get("result")


def shutdown_ray() -> None:
    import ray

    ray.shutdown()


def kill_children() -> None:
    """Kill what is left under this process (an embedded Ray's workers, HAProxy, an engine core)."""
    _kill(_started_here(), timeout=5)
