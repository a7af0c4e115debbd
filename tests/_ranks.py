"""Starting the processes of a multi-rank test: a free port, and N processes run to the end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Optional, Sequence

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argvs: Sequence[Sequence[str]], timeout: float, what: str, env: Optional[dict] = None,
              tail: int = 4000) -> list[str]:
    """Run one ``python ARGV`` process per rank (one thread each) and wait for all of them; a hang
    fails the test at ``timeout`` (every process killed), a failed rank fails it with its log.
    Returns the ranks' logs (stdout and stderr together)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    procs = [subprocess.Popen([sys.executable, *map(str, argv)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for argv in argvs]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{what} did not finish in {timeout:g} s (hang?)")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-tail:]}"
    return logs
