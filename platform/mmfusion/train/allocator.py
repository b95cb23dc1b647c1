"""glibc malloc settings for a Ray Train worker, whose training loop runs outside the process's main thread.

Ray Train V2 runs the train function in a thread of the worker actor (its TrainingThread). glibc gives such a
thread an arena of its own, and that arena hands freed memory back to the system eagerly: it shrinks its heap
and unmaps whole heaps as soon as their top is free. A training step allocates and frees the same tens of MiB
of activations and gradients each time, so step after step faulted the same pages in again. Measured on the
AVT-Digits demo model (bench/results/train_overhead_malloc.json: 2 ranks x 1 thread on 2 cores, 8 epochs):
each Ray worker took 34,000-38,000 minor page faults and 0.09 s of system time per second of steady training;
a torchrun rank, whose loop runs in the main thread's arena, 2,500-7,000 and 0.03 s, and the same torchrun
script with its loop moved into a thread 44,000 and 0.11 s on one of its ranks. With the settings below the
Ray workers took 600-1,800 faults and 0.02 s per second, and their epochs no longer slowed down.

`tune_malloc()` fixes three of glibc's thresholds (fixing them also turns its dynamic mmap threshold off):
M_MMAP_THRESHOLD 32 MiB (the largest glibc takes): blocks up to that size come from the arena, not from an
mmap of their own; M_TRIM_THRESHOLD 1 GiB: freed memory up to that stays mapped; M_TOP_PAD 64 MiB (one
heap): a thread arena keeps its heaps instead of unmapping them. The price is memory kept between steps:
the measured workers held 150-250 MiB more (RSS ~1.75-1.9 GiB instead of ~1.5-1.7 GiB).

A setting made through glibc's own environment variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
MALLOC_TOP_PAD_, or glibc.malloc.* in GLIBC_TUNABLES) is left as it is. Without glibc (macOS, musl) nothing
changes.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

MiB = 2**20
# name -> (mallopt parameter number from glibc's malloc.h, value, glibc environment variable, tunable)
SETTINGS: dict[str, tuple[int, int, str, str]] = {
    "mmap_threshold": (-3, 32 * MiB, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    "trim_threshold": (-1, 1024 * MiB, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
    "top_pad": (-2, 64 * MiB, "MALLOC_TOP_PAD_", "glibc.malloc.top_pad"),
}


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # not glibc (macOS, musl): no arenas of this kind, no mallopt
    return libc


def tune_malloc(environ: dict[str, str] | None = None) -> dict[str, int]:
    """Apply SETTINGS to this process's glibc malloc; returns the ones applied (name -> bytes), {} when none.

    Call it once in a training process before its loop; it holds for every thread, running or later."""
    env = os.environ if environ is None else environ
    libc = _glibc()
    if libc is None:
        return {}
    tunables = env.get("GLIBC_TUNABLES", "")
    applied: dict[str, int] = {}
    for name, (param, value, var, tunable) in SETTINGS.items():
        if var in env or f"{tunable}=" in tunables:
            log.debug("malloc %s left as set by the environment", name)
            continue
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            applied[name] = value
        else:
            log.debug("mallopt refused %s=%d", name, value)
    return applied
