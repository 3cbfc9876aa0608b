"""What ``/proc`` says about a process tree: peak and current memory, CPU time, mapped libraries.

Linux only, no extra dependency. Every reader tolerates a process that exited meanwhile.

    peak_rss_mib(pid)                  # VmHWM: the resident set's high-water mark
    maps_library(pid, "libtorch")      # True when the process has torch's native library loaded
    cpu_seconds(process_tree(pid))     # user + system time of the process and its descendants
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _status(pid: int) -> dict[str, str]:
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


def _kib(value: str) -> float:
    return float(value.split()[0]) if value else 0.0


def peak_rss_mib(pid: int) -> float:
    """VmHWM of ``pid`` in MiB (0 when it is gone)."""
    return _kib(_status(pid).get("VmHWM", "")) / 1024.0


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (0 when it is gone)."""
    return _kib(_status(pid).get("VmRSS", "")) / 1024.0


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces); [] when gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return []
    return text.rpartition(")")[2].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return [p for p in tree if (PROC / str(p)).exists()]


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of ``pids`` (each process: all its threads)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if len(fields) > 12:
            total += int(fields[11]) + int(fields[12])  # utime, stime: stat fields 14 and 15
    return total / CLOCK_TICKS


def system_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle, iowait and steal)."""
    values = _cpu_line()
    return (sum(values[:8]) - values[3] - values[4] - values[7]) / CLOCK_TICKS


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave to other guests while this one wanted to run (0 where not reported)."""
    return _cpu_line()[7] / CLOCK_TICKS


def _cpu_line() -> list[int]:
    return [int(v) for v in (PROC / "stat").read_text().splitlines()[0].split()[1:]]


def maps_library(pid: int, fragment: str) -> bool:
    """True when a file whose path contains ``fragment`` is mapped into ``pid``."""
    try:
        with (PROC / str(pid) / "maps").open() as maps:
            return any(fragment in line for line in maps)
    except OSError:
        return False


def command_name(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks after boot; 0 when gone): with the pid, names one process for good."""
    fields = _stat_fields(pid)
    return int(fields[19]) if len(fields) > 19 else 0


def same_process_alive(pid: int, started: int) -> bool:
    """True while the process ``pid`` that started at ``started`` runs (a reused pid is another process)."""
    return alive(pid) and start_time(pid) == started
