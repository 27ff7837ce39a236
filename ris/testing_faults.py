"""Faults a test provokes in a child process: a full disk without root or a tmpfs.

A process whose file size limit is set (``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored) gets ``EFBIG`` from
every write past it, exactly as a full disk gives ``ENOSPC``: the same failed writes reach ris's
code, so the tests of "nothing torn, one clear line" need no privileges.
"""
from __future__ import annotations

import subprocess
import sys


def size_limit(limit: int) -> str:
    """Python source that caps its process's file size at ``limit`` bytes: every write past it then
    fails with EFBIG (SIGXFSZ ignored), as a write on a full disk fails with ENOSPC; no root, no tmpfs."""
    return ("import resource, signal\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({int(limit)}, {int(limit)}))\n")


def run_size_limited(command: str, args: list, limit: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """``ris-<command> args`` in a child process under ``size_limit(limit)``, output captured."""
    script = size_limit(limit) + f"from ris.cli.{command} import entry\nentry()\n"
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
