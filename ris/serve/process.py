"""Run ``ris-serve`` as a child process and wait for its ready line (tests, benchmarks)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


class ServerProcess:
    """A ``ris-serve`` subprocess; ``url`` is read from the line it prints when ready."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "ris.cli.serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=lambda s=stream, o=sink: o.extend(iter(s.readline, "")), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready = [line for line in self.stdout if " ready: " in line]
            if ready:
                self.url = ready[0].rsplit(" at ", 1)[1].strip().rstrip("/")
                return
            time.sleep(0.05)
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError("ris-serve did not get ready: " + "".join(self.stderr)[-3000:])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a graceful stop), then the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
