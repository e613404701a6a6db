"""CPU time: our own (getrusage) and another process tree's (/proc), without psutil."""

from __future__ import annotations

import os
import resource
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    """User + system CPU seconds of this process, all its threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stat_cpu_s(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds of ``pid`` alone (all its threads); None when it is gone."""
    try:
        return _stat_cpu_s(pid)
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            found.extend(int(child) for child in text)
    except OSError:
        return found
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (worker processes of a multi-process server)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(_children(current))
    return tree


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its live descendants; None when ``pid`` is gone."""
    total = 0.0
    for member in process_tree(pid):
        try:
            total += _stat_cpu_s(member)
        except (OSError, ValueError, IndexError):
            if member == pid:
                return None
    return total


def affinity_of(pid: int) -> list[int] | None:
    """The CPUs ``pid`` may run on (0 = this process), or None when it cannot be read."""
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1],
                                                             16) == port:
                inodes.add(fields[9])
    return inodes


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this machine, if /proc lets us see it."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


def pin_self(cpus: str) -> list[int]:
    """Pin this process to ``cpus`` (a comma list) when they exist and there is a choice;
    returns the CPUs it may run on afterwards."""
    wanted = {int(c) for c in cpus.split(",") if c.strip()}
    available = os.sched_getaffinity(0)
    if wanted and wanted <= available and len(available) > 1:
        os.sched_setaffinity(0, wanted)
    return sorted(os.sched_getaffinity(0))
