"""Local servers started by the project's own tools (the monitoring stack, benchmarks, tests): a
free port, a bounded wait until a URL answers, and a stop of the whole process group by PID."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, seconds: float = 60, log: Path | None = None) -> None:
    """Return once `url` answers 200; RuntimeError (with the log's tail) if `proc` exits or time runs out."""
    deadline, last = time.monotonic() + seconds, None
    tail = (lambda: "\n" + log.read_text(errors="replace")[-2000:]) if log else (lambda: "")
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds:g} s ({last}){tail()}")


def gone(pid: int) -> bool:
    """Whether the process `pid` (a child, or one a PID file names) has exited."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid  # our child: reap it, or it lingers as a zombie
    except ChildProcessError:  # started by another process (a PID file): ask the kernel
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        return False


def stop_group(proc: subprocess.Popen | int, seconds: float = 30) -> None:
    """SIGTERM the process group led by `proc` (started with start_new_session=True), SIGKILL it
    if it is still there after `seconds`."""
    pid = proc if isinstance(proc, int) else proc.pid
    done = (lambda: proc.poll() is not None) if isinstance(proc, subprocess.Popen) else (lambda: gone(pid))
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done():
        time.sleep(0.1)
    if not done():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if isinstance(proc, subprocess.Popen):
            proc.wait(timeout=10)
