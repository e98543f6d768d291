"""Settings and facts of the worker process: the allocator, its resident memory, the memory it
offers by default, and the address it is reached at."""

from __future__ import annotations

import os
import socket

# glibc mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # the largest value glibc accepts (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
TRIM_THRESHOLD_BYTES = 256 << 20
DEFAULT_MEMORY_FRACTION = 0.8  # of physical memory, offered when the worker is given no --memory-gb


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed step buffers instead of returning them to the kernel.

    A prefill step allocates and frees activations of several MB per layer ([512, 3072] float32 is
    6 MB). With glibc's defaults each one above the dynamic mmap threshold is a fresh mmap whose
    pages fault in (zeroed) on first touch and are unmapped on free, on every step; served from
    the heap they are reused without faulting (the remedy of the tcmalloc/jemalloc preload that
    CPU inference servers recommend, without the preload; tests/integration/test_worker_allocator.py
    counts the page faults). Allocations of 32 MiB and more (the KV pool, weights) are still
    mapped on their own; up to 256 MiB freed at the top of the heap stays with the process.
    Returns False where the C library has no mallopt (not glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                    and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def rss_bytes() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def default_memory_bytes() -> int:
    """Bytes a worker offers for weights and KV cache when none are given: 80% of physical memory."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * DEFAULT_MEMORY_FRACTION)


def local_ip_towards(address: str) -> str:
    """The local IPv4 address this host uses to reach tcp://HOST:PORT (no packet is sent).

    Raises OSError (socket.gaierror) when HOST does not resolve or no route leads to it."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), int(port)))
        return s.getsockname()[0]
