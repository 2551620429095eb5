"""What reaches the terminal (pipeline/console.py): a stage's own lines, its progress display and every error; what
reaches the run's log: everything. Checked on a real child process whose descriptors 1 and 2 are routed, with the
kinds of lines a run prints: Ray-forwarded worker lines (printed twice, as Ray Train does), library noise on
both streams, a child process's output, a progress display and the driver's traceback."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent('''
    import logging, os, subprocess, sys
    from pathlib import Path
    from pipeline import console

    console.route(Path(sys.argv[1]))
    print("label: 3 rows read")
    print("INFO 12-06 vLLM engine started", flush=True)
    logging.getLogger("noisy").warning("a library warning")
    worker = "\\x1b[36m(MapWorker(MapBatches(VLLMGenerator)) pid=123, ip=10.0.0.2)\\x1b[0m "
    print(worker + "train: held-out at step 4")
    print(worker + "train: held-out at step 4")
    print(worker + "a worker's INFO line")
    sys.stdout.flush()
    subprocess.run(["echo", "from a child process"], check=True)
    with console.progress(desc="train: steps", total=2) as bar:
        bar.update(2)
    console.show("# Report\\n| a | b |")
    raise ValueError("boom")
''')


def test_the_terminal_gets_the_stage_lines_and_the_log_gets_everything(tmp_path):
    log = tmp_path / "logs" / "label.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == ["label: 3 rows read", "train: held-out at step 4", "# Report", "| a | b |"]
    err = proc.stderr
    assert "train: steps: 100%" in err and "Traceback (most recent call last)" in err and "ValueError: boom" in err
    for noise in ("vLLM engine", "library warning", "INFO line", "child process", "pid=123"):
        assert noise not in proc.stdout + err, noise
    text = log.read_text()
    for line in ("label: 3 rows read", "vLLM engine started", "a library warning", "a worker's INFO line",
                 "from a child process", "# Report", "ValueError: boom"):
        assert line in text, line
    assert text.count("train: held-out at step 4") == 2  # the log keeps both copies; the terminal shows one


def test_verbose_turns_the_routing_off(tmp_path):
    log = tmp_path / "logs" / "label.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                           "RAY_DISTILL_VERBOSE": "1"})
    assert "vLLM engine started" in proc.stdout and "from a child process" in proc.stdout and not log.exists()


THREADS = textwrap.dedent('''
    import sys, threading
    from pathlib import Path
    from pipeline import console

    console.route(Path(sys.argv[1]))
    worker = "\\x1b[36m(MapWorker(MapBatches(Scorer)) pid=7)\\x1b[0m \\rINFO  gc.collect() reclaimed 238 objects" + " " * 30

    def ray_prints_worker_lines():  # as ray._private.worker.print_worker_logs does, from its own thread
        for _ in range(3000):
            print(worker)

    thread = threading.Thread(target=ray_prints_worker_lines)
    thread.start()
    for i in range(3000):
        print(f"evaluate: model {i} results reused", flush=True)
    thread.join()
''')


def test_two_threads_printing_at_once_never_join_their_lines(tmp_path):
    """`print` writes a line and its newline in two calls; a stage's line printed while Ray's thread prints a worker's
    line once landed after the worker's text on one line (found by neither the terminal filter nor a reader). Unbuffered,
    as the tests' runs are, each of those writes is a system call during which the other thread runs."""
    log = tmp_path / "logs" / "evaluate.log"
    proc = subprocess.run([sys.executable, "-c", THREADS, str(log)], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"evaluate: model {i} results reused" for i in range(3000)]
    lines = log.read_bytes().decode().split("\n")[:-1]  # not read_text(): the worker's text holds a "\\r"
    assert len(lines) == 6000 and sum(line.startswith("evaluate: ") for line in lines) == 3000
