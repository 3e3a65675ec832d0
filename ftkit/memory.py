"""Resident memory of this process: now, and its peak."""

from __future__ import annotations

import resource
from contextlib import contextmanager


def current_rss_mb() -> float:
    """This process's resident set now, in MiB (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else 0.0


def peak_rss_mb() -> float:
    """High-water mark of this process's resident set, in MiB.

    Linux's VmHWM belongs to the process's own address space. `ru_maxrss` would also do, except that it survives
    exec: a child started from a large parent reports the parent's peak. VmHWM is used where it exists.
    """
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart the high-water mark from the current resident set (Linux: `5` into /proc/self/clear_refs), so a
    later `peak_rss_mb` measures one phase, say a training step after the model is built. False where the kernel
    does not allow it; the peak then still covers everything before."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def return_freed_memory_to_the_system() -> None:
    """Fix glibc's mmap and trim thresholds at 128 KiB, for loading.

    By default glibc raises its mmap threshold after large blocks are freed, so the next fp32 layers come from the
    heap and stay resident after they are freed: loading grows by a layer's size per layer. Fixed thresholds keep
    large tensors in their own mappings, returned to the system as soon as they are freed (BENCHMARKS.md, streaming
    load). Process-wide; the streaming loader sets it while it loads (`memory_returned_while_loading`).
    """
    _set_malloc_thresholds(mmap_bytes=128 << 10, trim_bytes=128 << 10)


def reuse_freed_memory() -> None:
    """Fix glibc's thresholds at 4 MiB (mmap) and 64 MiB (trim), for training and evaluation.

    With 128 KiB thresholds every temporary of 128 KiB or more (a layer's dequantized weight, the int4 kernel's
    buffers, a chunk of random numbers) was a mapping of its own, faulted in page by page and unmapped when freed,
    which slowed int4 forwards and full-parameter QuZO steps severalfold (measured in BENCHMARKS.md, "Zeroth-order
    step cost on SmolLM2-135M"). Blocks up to 4 MiB (a layer's temporaries in a model of that size)
    are now reused from the heap and at most 64 MiB of freed heap stays resident; larger tensors, 16 MiB chunks of
    random directions included, still get mappings of their own, returned when freed, so a step over a large tensor
    holds a few chunks, not copies (tests/test_zo.py). Fixed rather than glibc's moving default, so what stays
    resident does not depend on what was freed before.
    """
    _set_malloc_thresholds(mmap_bytes=4 << 20, trim_bytes=64 << 20)


@contextmanager
def memory_returned_while_loading():
    """Within: `return_freed_memory_to_the_system` (loading a model layer by layer). After, even on an error:
    `reuse_freed_memory` (what training and evaluation want)."""
    return_freed_memory_to_the_system()
    try:
        yield
    finally:
        reuse_freed_memory()


def _set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)
        libc.mallopt(M_TRIM_THRESHOLD, trim_bytes)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
