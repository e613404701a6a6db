"""A process's resident memory (VmRSS from /proc/<pid>/status) and CPU time, read once or
sampled over time.

The memory figures of the overload and memory-attack studies (and of
tests/integration/test_memory_attacks.py) are the server subprocess's own VmRSS: a server
run as a thread of the test process would share its RSS with the clients.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen.cpu import tree_cpu_s

MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` in bytes (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


@dataclass(frozen=True, slots=True)
class Sample:
    at_ns: int  # time.monotonic_ns()
    rss: int  # bytes
    cpu_s: float  # CPU seconds of the process and its children so far


class ProcessSampler:
    """Samples ``pid``'s VmRSS and CPU time every ``interval_s`` in a thread while in its
    ``with`` block; the first sample is taken on entry and the last on exit, so the peak
    covers the whole block. With ``kill_above`` (bytes) it kills the process once its RSS
    passes that (a safety on a shared machine: ``killed`` says so)."""

    def __init__(self, pid: int, interval_s: float = 0.1, kill_above: int | None = None) -> None:
        self.pid = pid
        self.samples: list[Sample] = []
        self.killed = False
        self._kill_above = kill_above
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{pid}", daemon=True)

    def _sample(self) -> None:
        sample = Sample(time.monotonic_ns(), rss_bytes(self.pid), tree_cpu_s(self.pid) or 0.0)
        self.samples.append(sample)
        if self._kill_above is not None and sample.rss > self._kill_above and not self.killed:
            self.killed = True
            os.kill(self.pid, signal.SIGKILL)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def peak(self, start_ns: int = 0, end_ns: int = 2**63) -> int:
        """The highest RSS sampled between ``start_ns`` and ``end_ns``."""
        return max((s.rss for s in self.samples if start_ns <= s.at_ns <= end_ns), default=0)

    def __enter__(self) -> ProcessSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
