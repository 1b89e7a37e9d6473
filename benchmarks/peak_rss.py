"""Peak resident memory of a stretch of a process, for the benchmark scripts (Linux; None elsewhere).

`start()` resets the kernel's peak-RSS counter (VmHWM, through /proc/self/clear_refs) and returns the resident
size then; `mib_above(before)` is the peak since, above that. Memory an allocator kept from earlier work is
reused without showing, so in a process that already ran something the figure is a lower bound.
"""

from __future__ import annotations

from pathlib import Path


def status_kib(field: str) -> int | None:
    """A KiB field of /proc/self/status (VmRSS, VmHWM), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def start() -> int | None:
    """Reset the peak counter; the resident KiB now (None where it cannot be reset)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return status_kib("VmRSS")


def mib_above(before: int | None) -> float | None:
    """Peak resident MiB since `start()` above what was resident then."""
    peak = status_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024
