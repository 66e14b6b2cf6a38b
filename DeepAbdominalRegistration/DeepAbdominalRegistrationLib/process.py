"""Running ``python -m dareg ...`` in a background process without blocking 3D Slicer.

Why a separate process: TensorFlow never loads into Slicer's own interpreter (no version clashes, GPU
memory is freed when the run ends, a crash cannot take Slicer down), and the GUI stays responsive.

How: the process is started with its stdout and stderr piped; one reader thread per stream puts
``(stream, line)`` pairs into a :class:`queue.Queue`. Nothing else happens off the main thread:
:meth:`BackgroundProcess.poll` (called by a ``qt.QTimer`` in the widget, or by :meth:`wait`) drains
the queue, turns ``PROGRESS <fraction> <stage>`` lines into progress callbacks and every other line
into log callbacks, and decides the outcome from the exit code once both streams are closed:

- 0: succeeded;
- 2: a user error; the ``dareg: error: ...`` message becomes :attr:`BackgroundProcess.error_message`;
- 130 (dareg's own Ctrl-C / SIGTERM handling) or a kill by :meth:`cancel`: cancelled;
- anything else: failed; the last stderr line is the message and the full log stays with the caller.

:meth:`cancel` kills the whole process tree: the process is started in its own process group
(session) so that ``os.killpg`` reaches every descendant, and psutil (bundled with 3D Slicer) is used
as well where available, for descendants that left the group and on Windows.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

PROGRESS_PREFIX = "PROGRESS "
USER_ERROR_PREFIX = "dareg: error: "
_STDERR_LINES_KEPT = 200
_POLL_INTERVAL_S = 0.05
_CANCEL_GRACE_S = 5.0

ProgressCallback = Callable[[float, str], None]
LogCallback = Callable[[str], None]


class ExitCode(IntEnum):
    """Exit codes of the ``dareg`` command line (``dareg.cli.ExitCode``; a test keeps them equal)."""

    OK = 0
    ERROR = 1
    USER_ERROR = 2
    CANCELLED = 130


class ProcessStatus(IntEnum):
    """Where a background process stands; everything but RUNNING is final."""

    NOT_STARTED = 0
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    CANCELLED = 4


@dataclass(frozen=True)
class Progress:
    """One ``PROGRESS`` line: ``fraction`` in [0, 1] and the stage name."""

    fraction: float
    stage: str


def parse_progress(line: str) -> Progress | None:
    """``PROGRESS 0.440 instance optimisation 1/5`` -> Progress(0.44, "instance optimisation 1/5").

    Anything else (including a malformed PROGRESS line) is an ordinary log line: None.
    """
    if not line.startswith(PROGRESS_PREFIX):
        return None
    fraction_text, _, stage = line[len(PROGRESS_PREFIX) :].partition(" ")
    try:
        fraction = float(fraction_text)
    except ValueError:
        return None
    return Progress(min(max(fraction, 0.0), 1.0), stage.strip())


def python_executable() -> str:
    """The interpreter that runs ``-m dareg``.

    In 3D Slicer ``sys.executable`` is the application itself; its Python is started through the
    ``PythonSlicer`` launcher, which sets up the environment (found on PATH inside Slicer, or next to
    the executable). Outside Slicer (tests, scripts) it is this interpreter.
    """
    suffix = ".exe" if os.name == "nt" else ""
    candidates = [
        shutil.which("PythonSlicer"),
        str(Path(sys.executable).with_name("PythonSlicer" + suffix)),
    ]
    return next((c for c in candidates if c and Path(c).is_file()), sys.executable)


def process_environment(
    python_paths: Sequence[Path], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment, with ``python_paths`` first on PYTHONPATH and UTF-8, unbuffered output.

    The module folder goes on PYTHONPATH so that ``-m dareg`` finds the engine shipped inside the
    extension; UTF-8 keeps non-ASCII paths intact in the log; unbuffered output makes progress live.
    """
    env = dict(os.environ)
    paths = [str(p) for p in python_paths] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _descendants(pid: int) -> list:
    """psutil handles of every descendant of ``pid`` (empty without psutil or once it is gone)."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def poll_until_finished(poll: Callable[[], ProcessStatus], timeout_s: float | None = None) -> ProcessStatus:
    """Call ``poll`` until it no longer reports RUNNING (or ``timeout_s`` passed): the blocking way to
    wait (scripts, tests, ``waitForCompletion``) for something the GUI polls from a timer instead."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = poll()
    while status == ProcessStatus.RUNNING and (deadline is None or time.monotonic() <= deadline):
        time.sleep(_POLL_INTERVAL_S)
        status = poll()
    return status


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill ``process`` and all its descendants at once (no graceful shutdown: outputs are discarded).

    Descendants are listed before anything dies (killing the parent would orphan them); the process
    group is killed on POSIX; Windows without psutil falls back to ``taskkill /T``.
    """
    descendants = _descendants(process.pid)
    if os.name == "posix":
        try:
            os.killpg(process.pid, signal.SIGKILL)  # started with start_new_session: pgid == pid
        except ProcessLookupError:
            pass
    elif not descendants:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
    for child in descendants:
        try:
            child.kill()
        except Exception:  # psutil.NoSuchProcess/AccessDenied: already gone or not ours
            pass
    if process.poll() is None:
        process.kill()
    process.wait()


def _read_lines(stream, name: str, lines: queue.Queue) -> None:
    """Reader thread body: every line of ``stream`` into ``lines``, then ``(name, None)`` at the end."""
    try:
        for line in stream:
            lines.put((name, line.rstrip("\r\n")))
    finally:
        lines.put((name, None))
        stream.close()


class BackgroundProcess:
    """One command in a background process, polled from the main thread.

    Parameters
    ----------
    args
        Command line (``[python, "-m", "dareg", "register", ...]``); arguments are passed as a list, so
        paths with spaces or non-ASCII characters need no quoting.
    cwd, env
        Working folder and environment of the process.
    on_progress, on_log
        Called from :meth:`poll` (so on the caller's thread) for each ``PROGRESS`` line and for every
        other stdout/stderr line.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
        on_log: LogCallback | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.cwd = Path(cwd)
        self.env = dict(env) if env is not None else None
        self.on_progress = on_progress
        self.on_log = on_log
        self.status = ProcessStatus.NOT_STARTED
        self.returncode: int | None = None
        self.error_message = ""
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._open_streams = 0
        self._stderr_tail: deque[str] = deque(maxlen=_STDERR_LINES_KEPT)
        self._cancel_requested = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the process and its two reader threads; returns at once."""
        if self.status != ProcessStatus.NOT_STARTED:
            raise RuntimeError("A BackgroundProcess can be started only once.")
        session = (
            {"start_new_session": True}
            if os.name == "posix"
            else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
        )
        self._process = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            **session,
        )
        self.status = ProcessStatus.RUNNING
        for name, stream in (("stdout", self._process.stdout), ("stderr", self._process.stderr)):
            self._open_streams += 1
            threading.Thread(target=_read_lines, args=(stream, name, self._lines), daemon=True).start()

    def poll(self) -> ProcessStatus:
        """Forward the lines read so far; once both streams closed and the process exited, decide."""
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                break
            self._dispatch(name, line)
        if self.status == ProcessStatus.RUNNING and self._open_streams == 0:
            self.returncode = self._process.wait()
            self._conclude(self.returncode)
        return self.status

    def wait(self, timeout_s: float | None = None) -> ProcessStatus:
        """Poll until the process is finished (or ``timeout_s`` passed); for scripts and tests."""
        return poll_until_finished(self.poll, timeout_s)

    def cancel(self) -> None:
        """Kill the whole process tree; the status becomes CANCELLED (no-op once finished)."""
        if self.status != ProcessStatus.RUNNING:
            return
        self._cancel_requested = True
        kill_process_tree(self._process)
        self.wait(timeout_s=_CANCEL_GRACE_S)  # the pipes close once every descendant is gone
        if self.status == ProcessStatus.RUNNING:  # a descendant that left the group still holds a pipe
            self.returncode = self._process.returncode
            self._conclude(self.returncode)

    def _dispatch(self, name: str, line: str | None) -> None:
        if line is None:
            self._open_streams -= 1
            return
        if name == "stderr":
            self._stderr_tail.append(line)
        progress = parse_progress(line) if name == "stdout" else None
        if progress is not None:
            if self.on_progress is not None:
                self.on_progress(progress.fraction, progress.stage)
        elif self.on_log is not None:
            self.on_log(line)

    def _conclude(self, returncode: int) -> None:
        if self._cancel_requested or returncode == ExitCode.CANCELLED:
            self.status = ProcessStatus.CANCELLED
            self.error_message = "Cancelled."
        elif returncode == ExitCode.OK:
            self.status = ProcessStatus.SUCCEEDED
        elif returncode == ExitCode.USER_ERROR:
            self.status = ProcessStatus.FAILED
            messages = [
                line[len(USER_ERROR_PREFIX) :]
                for line in self._stderr_tail
                if line.startswith(USER_ERROR_PREFIX)
            ]
            self.error_message = "\n".join(messages) or self._last_stderr_line(returncode)
        else:
            self.status = ProcessStatus.FAILED
            self.error_message = self._last_stderr_line(returncode)

    def _last_stderr_line(self, returncode: int) -> str:
        last = next((line.strip() for line in reversed(self._stderr_tail) if line.strip()), "")
        detail = f": {last}" if last else ""
        return f"dareg stopped with exit code {returncode}{detail}"
