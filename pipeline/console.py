"""The terminal a person reads, and the log file that keeps everything else.

A stage's terminal shows its own lines, one live progress display per long stage and every error. Everything else
the run prints — Ray's and vLLM's logs, library warnings, the per-step reports of training workers — goes to the
run's log file, `<run_root>/logs/<stage>.log`, next to every line the terminal showed.

The routing is done on the process's file descriptors 1 and 2, not on `sys.stdout`, so it also catches what Ray
forwards from its workers (`log_to_driver`), what C++ code prints and what child processes inherit. A line reaches
the terminal when it is a stage's own — it starts with `<stage>: `, `error: ` or `warning: `, after the
`(Actor pid=…)` prefix Ray puts on a worker's lines — or belongs to a traceback the driver prints. The environment
variable `RAY_DISTILL_VERBOSE=1` turns the routing off (everything reaches the terminal, as before).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

VERBOSE_ENV = "RAY_DISTILL_VERBOSE"
_OWN = re.compile(r"(run|compare|label|sample|pairs|train|quantize|evaluate|serve|plan|error|warning): ")
_COLOR = r"(?:\x1b\[[\d;]*m)*"
# "(RayTrainWorker pid=123)", "(MapWorker(MapBatches(VLLMGenerator)) pid=45, ip=10.0.0.2)", "(pid=7)"
_RAY_PREFIX = re.compile(rf"{_COLOR}\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*?pid=\d+[^)]*\){_COLOR} ?")
_TRACEBACK_CONT = ("Traceback (most recent call last)", "During handling of", "The above exception")


class _Terminal:
    """The original stdout and stderr, shared by the routing threads and the progress displays so a line never
    lands in the middle of a live progress bar."""

    def __init__(self, out_fd: int, err_fd: int):
        self.fds = {1: out_fd, 2: err_fd}
        self.lock = threading.Lock()
        self.bar = ""  # the live progress display's last text (on stderr), re-drawn after a line
        self.tty = os.isatty(err_fd)

    def line(self, fd: int, data: bytes) -> None:
        with self.lock:
            if self.bar:  # clear the bar's line (a terminal) or end it (a file), write the line, re-draw the bar
                os.write(self.fds[2], b"\r\x1b[K" if self.tty else b"\n")
            os.write(self.fds[fd], data)
            if self.bar and self.tty:
                os.write(self.fds[2], self.bar.encode())
            elif self.bar:
                self.bar = ""

    def draw(self, text: str) -> None:
        with self.lock:
            os.write(self.fds[2], text.encode())
            tail = text.rsplit("\n", 1)
            self.bar = tail[-1] if len(tail) == 1 or tail[-1] else ""


class _BarFile:
    """What tqdm writes to: the terminal's stderr, through `_Terminal.draw`."""

    def __init__(self, terminal: _Terminal):
        self.terminal = terminal

    def write(self, text: str) -> int:
        self.terminal.draw(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.terminal.tty


class _WholeLines:
    """`sys.stdout` or `sys.stderr` while the output is routed. `print` writes a line's text and its newline in two
    calls, so two threads printing at once — the driver's own stage lines and the thread in which Ray prints its
    workers' lines — could join two lines into one (a stage's line after a worker's, where neither the terminal
    filter nor a reader finds it). This keeps each thread's text until its line ends and writes whole lines only."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.local = threading.local()
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        head, newline, self.local.pending = (getattr(self.local, "pending", "") + text).rpartition("\n")
        if newline:
            with self.lock:
                self.stream.write(head + newline)
        return len(text)

    def flush(self) -> None:
        pending, self.local.pending = getattr(self.local, "pending", ""), ""
        with self.lock:
            if pending:
                self.stream.write(pending)
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty, buffer, ...
        return getattr(self.stream, name)


class _Router:
    def __init__(self, log_path: Path):
        self.lock = threading.Lock()
        self.log: BinaryIO | None = None
        self.set_log(log_path)
        sys.stdout.flush()
        sys.stderr.flush()
        if not isinstance(sys.stdout, _WholeLines):
            sys.stdout, sys.stderr = _WholeLines(sys.stdout), _WholeLines(sys.stderr)
        self.terminal = _Terminal(os.dup(1), os.dup(2))
        self.threads = []
        self.recent_worker_lines: list[str] = []
        for fd in (1, 2):
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            thread = threading.Thread(target=self._pump, args=(read, fd), daemon=True, name=f"console-{fd}")
            thread.start()
            self.threads.append(thread)
        atexit.register(self.stop)  # registered before Ray's own exit handler, so it runs after it

    def set_log(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            if self.log:
                self.log.close()
            self.log = path.open("ab")
        self.path = path

    def _pump(self, read: int, fd: int) -> None:
        pending, traceback = b"", False
        while chunk := os.read(read, 1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                traceback = self._route(raw + b"\n", fd, traceback)
        if pending:
            self._route(pending + b"\n", fd, traceback)
        os.close(read)

    def _route(self, raw: bytes, fd: int, traceback: bool) -> bool:
        with self.lock:
            if self.log:
                self.log.write(raw)
                self.log.flush()
        text = raw.decode(errors="replace")
        own = _RAY_PREFIX.sub("", text, count=1) if _RAY_PREFIX.match(text) else text
        from_driver = own is text
        if from_driver and text.startswith(_TRACEBACK_CONT):
            traceback = True
        if traceback or (_OWN.match(own) and (from_driver or own not in self.recent_worker_lines)):
            self.terminal.line(fd if from_driver else 1, own.encode())  # a worker's own lines: one stream, in order
        if not from_driver and _OWN.match(own):
            # Ray Train forwards a worker's print twice (its stdout and its log), not always one after the other
            self.recent_worker_lines = (self.recent_worker_lines + [own])[-32:]
        if traceback and from_driver and text.strip() and not text[0].isspace() and not text.startswith(
                _TRACEBACK_CONT):
            traceback = False  # the exception's own line ends the traceback
        return traceback

    def stop(self) -> None:
        """Flush, give the terminal its descriptors back and wait (briefly) for the last lines to be routed."""
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(self.terminal.fds[fd], fd)  # closes the pipe's write end held by this descriptor
        for thread in self.threads:
            thread.join(timeout=2)  # a child that inherited the pipe may still hold it open
        with self.lock:
            if self.log:
                self.log.close()
                self.log = None


_router: _Router | None = None


def route(log_path: Path) -> None:
    """From now on (until the process exits) this process's output goes to `log_path`, and only a stage's own lines,
    progress and errors to the terminal. A second call moves the log to the new file."""
    global _router
    if os.environ.get(VERBOSE_ENV) == "1":
        return
    if _router is None:
        _router = _Router(Path(log_path))
    else:
        _router.set_log(Path(log_path))


def close() -> None:
    """Deliver the last lines and give the terminal its descriptors back now (as at exit), for a process that ends
    without its exit handlers."""
    if _router is not None:
        _router.stop()


def log_path() -> Path | None:
    """The log file this process writes to, if its output is routed."""
    return _router.path if _router else None


def show(text: str) -> None:
    """Text for the terminal (and the log) whatever its lines start with: a report printed at the end of a stage."""
    if _router is None:
        print(text, flush=True)
        return
    data = text if text.endswith("\n") else text + "\n"
    with _router.lock:
        if _router.log:
            _router.log.write(data.encode())
            _router.log.flush()
    _router.terminal.line(1, data.encode())


def progress(**kwargs: Any):
    """A tqdm progress display on the terminal (not the log); on a terminal that is not a tty (a CI log, `make demo >
    file`) it draws at most every 30 s, so a long stage leaves a few dozen bytes, not a line per update."""
    from tqdm import tqdm

    if _router is None:
        return tqdm(dynamic_ncols=True, **kwargs)
    tty = _router.terminal.tty
    return tqdm(file=_BarFile(_router.terminal), dynamic_ncols=tty, mininterval=0.5 if tty else 30,
                **({"ncols": 100} if not tty else {}), **kwargs)
