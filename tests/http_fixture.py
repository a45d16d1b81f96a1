"""A real ``deltalog serve-snapshot`` subprocess for tests.

    from http_fixture import serve_snapshot_url  # noqa: F401  (makes the fixture visible)

    def test_pull(serve_snapshot_url, tmp_path):
        url = serve_snapshot_url(replica_path)                      # http://127.0.0.1:PORT
        url = serve_snapshot_url(replica_path, "--token-file", f)   # extra CLI options

Every server started through the fixture is stopped (SIGTERM, then SIGKILL)
when the test ends. :func:`running_server` is the same as a context manager,
for module-scoped fixtures. The server's stderr goes to a file (a pipe
nobody drains would block it once full); its text is in failure messages.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

_SERVING = re.compile(r"^serving .* on (https?://\S+)\s*$", re.MULTILINE)
_START = [sys.executable, "-c", "from deltalog.cli import main; main()", "serve-snapshot"]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def running_server(replica_path, *args: str, startup_timeout: float = 20.0, env: dict | None = None) -> Iterator[ServerProcess]:
    """Start ``deltalog serve-snapshot REPLICA --port 0 ARGS...`` and yield it once it listens."""
    fd, log_path = tempfile.mkstemp(prefix="serve-snapshot-", suffix=".log")
    os.close(fd)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*_START, os.fspath(replica_path), "--port", "0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            env={**os.environ, **(env or {})},
        )
    server = None
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            with open(log_path, errors="replace") as f:
                m = _SERVING.search(f.read())
            if m:
                server = ServerProcess(m.group(1), proc, log_path)
                break
            if proc.poll() is not None:
                raise RuntimeError(f"serve-snapshot exited with {proc.returncode}:\n{_read(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve-snapshot did not start within {startup_timeout} s:\n{_read(log_path)}")
            time.sleep(0.02)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        os.unlink(log_path)


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


@pytest.fixture
def serve_snapshot_url() -> Iterator[Callable[..., str]]:
    """A function ``start(replica_path, *cli_args) -> base URL`` (servers stop after the test)."""
    with contextlib.ExitStack() as stack:

        def start(replica_path, *args: str, env: dict | None = None) -> str:
            return stack.enter_context(running_server(replica_path, *args, env=env)).url

        yield start


@pytest.fixture
def serve_snapshot_process() -> Iterator[Callable[..., ServerProcess]]:
    """Like serve_snapshot_url, but yields the :class:`ServerProcess` (log, stop, port)."""
    with contextlib.ExitStack() as stack:

        def start(replica_path, *args: str, env: dict | None = None) -> ServerProcess:
            return stack.enter_context(running_server(replica_path, *args, env=env))

        yield start
