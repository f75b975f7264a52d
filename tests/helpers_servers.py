"""A real ``mlflow server`` on 127.0.0.1 for the tests that need one (registry over HTTP, request traces).

Started in its own process group with SQLite + proxied artifacts under a temporary folder; ``stop()``
(also run by the context manager) terminates the whole group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A running ``mlflow server``: its URL and a ``stop()`` that ends it (and is safe to call twice)."""

    def __init__(self, root: Path, env: dict[str, str] | None = None, ready_timeout_s: float = 300) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'db.sqlite'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        self._log = open(self.root / "server.log", "w")  # noqa: SIM115 - closed by stop()
        run_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
        self.proc = subprocess.Popen(args, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT, env=run_env,
                                     start_new_session=True)
        try:
            self._wait(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not ready after {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        return (self.root / "server.log").read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


@contextmanager
def mlflow_server(root: Path, env: dict[str, str] | None = None) -> Iterator[MlflowServer]:
    server = MlflowServer(root, env)
    try:
        yield server
    finally:
        server.stop()
