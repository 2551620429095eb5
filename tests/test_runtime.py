"""The embedded local Ray's worker set-up: Ray Train's placement-group cleaner polls the state API, which a
Ray without a dashboard does not serve; the set-up hook drops that one warning and nothing else."""
import logging

from pipeline.runtime import quiet_state_api_pollers

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
UNAVAILABLE = ("Failed to query Ray Train Controller actor state. "
               "State API may be temporarily unavailable. Continuing to monitor.")


def _passes(message: str) -> bool:
    record = logging.LogRecord(CLEANER, logging.WARNING, __file__, 1, message, None, None)
    return bool(logging.getLogger(CLEANER).filter(record))


def test_only_the_state_api_warning_is_dropped():
    assert _passes(UNAVAILABLE)
    quiet_state_api_pollers()
    assert not _passes(UNAVAILABLE)
    assert _passes("Failed to clean up placement group: timed out")
    assert _passes("Detected that the Ray Train controller actor (abc) is dead. Cleaning up placement group")


def test_ctrl_c_exits_130_and_what_the_entrypoint_started_is_killed_after_it(tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to the process group) to an entrypoint that started a process of its
    own, as an embedded Ray starts its processes (a `sleep` here, which does not die of SIGINT's default, since it is
    sent SIGINT with the group: it is made to ignore it, as Ray's processes block it): the entrypoint says it stopped
    and exits with 130, and the process it started is killed once it has exited, by a process of another session
    (`pipeline.runtime._kill_after_exit`), so nothing of the run is left in the terminal's group."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    import psutil

    from conftest import REPO

    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(f"""
        import signal, subprocess, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from omegaconf import OmegaConf
        from pipeline.runtime import entrypoint
        cfg = OmegaConf.create({{"paths": {{"run_root": {str(tmp_path / "run")!r}}}}})
        with entrypoint(cfg, "train"):
            child = subprocess.Popen(["sleep", "300"], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
            print(f"train: started {{child.pid}}", flush=True)
            time.sleep(300)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    while not (lines and lines[-1].startswith("train: started")):
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    child = psutil.Process(int(lines[-1].split()[-1]))
    os.killpg(proc.pid, signal.SIGINT)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(30) == 130, out
    assert "train: interrupted (SIGINT)" in out and "train: stopped" in out and "Traceback" not in out, out
    deadline = time.monotonic() + 15
    while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the process the entrypoint started outlived it"
        time.sleep(0.1)
