"""Run a CCELLACore job in a child process and follow it without blocking: the parent half of the protocol.

Pure Python (no Qt, no Slicer), so the same runner serves the Slicer panel, scripts and tests:

- the child's stdout and stderr are merged and read by a thread, line by line, into a queue; every line also goes
  to the job's log file (the "show log" button opens it); a GUI drains the queue from a timer with :meth:`poll`;
- :meth:`ChildJob.cancel` kills the whole process tree: ``PythonSlicer`` is a launcher, so killing the direct child
  alone would leave the real Python running (psutil walks the tree; without psutil the child's own session /
  process group is killed, which holds every descendant that did not leave it);
- a failure becomes one readable message (the child's ``error`` event, else the last log lines) plus the log path.

Why not ``slicer.util.launchConsoleProcess``: its non-blocking mode needs Slicer 5.12, and a plain ``Popen`` with a
reader thread behaves the same on 5.10, 5.12 and outside Slicer.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Mapping, Sequence

from CCELLACore.jobs.protocol import Event, parse_line

__all__ = ["ChildJob", "JobFailed", "python_command", "child_environment", "kill_process_tree"]

_TAIL_LINES = 20


class JobFailed(RuntimeError):
    """A child job ended without a result; ``str()`` is the message to show, ``log_path`` the full log."""

    def __init__(self, message: str, log_path: Path | None = None, kind: str = "internal", hint: str = ""):
        super().__init__(message)
        self.log_path, self.kind, self.hint = log_path, kind, hint


def _inside_slicer() -> bool:
    slicer = sys.modules.get("slicer")
    try:
        return slicer is not None and getattr(slicer, "app", None) is not None
    except Exception:  # noqa: BLE001 - slicer-core's module has no application
        return False


def python_command() -> list[str]:
    """The interpreter a child runs: ``PythonSlicer`` inside Slicer (Slicer's Python with its environment), else
    the current interpreter."""
    slicer_python = shutil.which("PythonSlicer")
    if slicer_python and _inside_slicer():
        return [slicer_python]
    return [sys.executable]


def child_environment(device: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: CCELLACore importable, unbuffered output, and no GPU at all for CPU runs.

    Args:
        device: ``"cpu"`` hides every GPU (``CUDA_VISIBLE_DEVICES=-1``) so no CUDA context is made.
        extra: more variables.
    """
    import CCELLACore

    env = dict(os.environ)
    package_parent = str(Path(CCELLACore.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_parent, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    env.update(extra or {})
    return env


def kill_process_tree(pid: int, timeout: float = 5.0) -> None:
    """Kill ``pid`` and all its descendants, and wait until they are gone."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
            procs = [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=timeout)
    if os.name == "posix":
        # The child leads its own session (start_new_session): this also reaches descendants psutil missed
        # because they were re-parented after their parent died.
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    elif psutil is None:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)


class ChildJob:
    """One child process speaking the :mod:`CCELLACore.jobs.protocol`.

    Args:
        command: the full command line (no report text in it: pass files).
        log_path: every output line is appended here (created with its folder).
        env: the child's environment (default :func:`child_environment`).
        cwd: the child's working folder.
        on_event: called from :meth:`poll` (the caller's thread) for each event.

    Example:
        >>> job = ChildJob([*python_command(), "-m", "CCELLACore.jobs", "generate", ...], log_path)  # doctest: +SKIP
        >>> job.start(); result = job.wait()  # or: poll() from a GUI timer, cancel() on demand   # doctest: +SKIP
    """

    def __init__(self, command: Sequence[str], log_path: str | Path, *, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, on_event: Callable[[Event], None] | None = None):
        self.command = [str(c) for c in command]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else child_environment()
        self.cwd = cwd
        self.on_event = on_event
        self.process: subprocess.Popen | None = None
        self.result: Event | None = None
        self.error: Event | None = None
        self.cancelled = False
        self.started_at: float | None = None
        self._queue: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._log_lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------- running
    def start(self) -> "ChildJob":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(self.command)}\n")
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True
        else:
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )
        self.started_at = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="ccella-job-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in self.process.stdout:
                with self._log_lock:
                    log.write(line)
                    log.flush()
                self._queue.put(parse_line(line))
        self._queue.put(None)  # end of output

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def finished(self) -> bool:
        """The child exited and all its output was read (or it was cancelled)."""
        if self.process is None:
            return False
        if self.cancelled:
            return self.process.poll() is not None
        reader_done = self._reader is not None and not self._reader.is_alive() and self._queue.empty()
        return self.process.poll() is not None and (reader_done or self.result is not None)

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def poll(self) -> list[Event]:
        """Events that arrived since the last call (never blocks); keeps the result and error events."""
        events = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if event is None:
                continue
            if event.kind == "result":
                self.result = event
            elif event.kind == "error":
                self.error = event
            if event.kind == "log" or event.kind == "error":
                self._tail.append(event.message)
            events.append(event)
            if self.on_event is not None:
                self.on_event(event)
        return events

    def cancel(self) -> None:
        """Kill the child and every process it started; the job then reports ``cancelled``."""
        if self.process is None or self.cancelled:
            return
        self.cancelled = True
        if self.process.poll() is None:
            kill_process_tree(self.process.pid)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kill above is SIGKILL
            pass
        with self._log_lock, open(self.log_path, "a", encoding="utf-8") as log:
            log.write("[cancelled by the user]\n")

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> Event:
        """Block until the job ends (scripts, tests and ``waitForCompletion=True``) and return its result event.

        Raises:
            JobFailed: the child failed, was cancelled, or ``timeout`` seconds passed (then it is cancelled).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise JobFailed(f"the job did not finish within {timeout:g} s and was stopped", self.log_path)
            self.poll()
            time.sleep(interval)
        self.poll()
        return self.outcome()

    def outcome(self) -> Event:
        """The result event of a finished job.

        Raises:
            JobFailed: cancelled, or failed: the child's error message (and hint), else its exit status and the
                last lines it printed; always with the log path.
        """
        if self.cancelled:
            raise JobFailed("cancelled", self.log_path, kind="cancelled")
        if self.returncode == 0 and self.error is None:
            # A plain command (``ccella classify``) prints no protocol lines: exit status 0 is its result.
            return self.result or Event("result", {}, protocol=False)
        if self.error is not None:
            raise JobFailed(self.error.message, self.log_path, kind=self.error.get("kind", "internal"),
                            hint=self.error.get("hint", ""))
        tail = "\n".join(line for line in self._tail if line.strip())
        raise JobFailed(f"the job stopped with exit status {self.returncode}" + (f":\n{tail}" if tail else ""),
                        self.log_path)

    @staticmethod
    def failure_message(exc: JobFailed) -> str:
        """What a user reads: the message, the hint, and where the full log is."""
        parts = [str(exc)]
        if exc.hint:
            parts.append(exc.hint)
        parts.append(f"Log: {exc.log_path}")
        return "\n".join(parts)
