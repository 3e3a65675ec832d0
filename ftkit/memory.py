"""Peak resident memory of this process."""

from __future__ import annotations

import resource


def current_rss_mb() -> float:
    """This process's resident set now, in MiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb() -> float:
    """High-water mark of this process's resident set, in MiB.

    Linux's VmHWM belongs to the process's own address space. `ru_maxrss` would also do, except that it survives
    exec: a child started from a large parent reports the parent's peak. VmHWM is used where it exists.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
