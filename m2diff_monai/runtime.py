"""How many CPU threads this process may use, applied once to torch, ITK and ANTs.

Why: torch defaults to one thread per *visible* core. On a shared node (a container with a CPU quota, a SLURM
allocation, a laptop running two jobs) every process then takes every core, and two of them slow each other
down ~15× (measured: 0.5 s → 14 s per demo training iteration, two processes on 2 cores). The count chosen here
is, in order of precedence:

1. ``OMP_NUM_THREADS`` when set (the user's explicit choice; also what ``scripts/*.sh`` and the tests set);
2. the cgroup CPU quota (v2 ``/sys/fs/cgroup/cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), rounded up;
3. SLURM's ``SLURM_CPUS_PER_TASK``;
4. the CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that does not exist).

Whatever the source, the result is never above the affinity count (a quota or an env var cannot grant cores the
scheduler will not give) and never below 1. :func:`configure_threads` is cheap and idempotent: every CLI entry
point and the bundle imports call it.

ITK (and ANTs through it) is the exception: its pool gets **one** thread unless
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` is set. Why: ANTs' Mattes-MI registration does not reproduce when its
metric runs on 2+ threads (measured: two runs on the same files gave T1s up to 55 of 950 apart on a demo subject),
and everything downstream then differs too; with one thread and a seed it is bit-reproducible
(``tests/test_registration.py``). The cost is small where our ITK work is (a rigid 4 mm registration: 0.49 → 0.72 s);
``m2diff-preprocess --workers N`` runs subjects in parallel instead. Set the variable to trade reproducibility for
speed (e.g. SyN at 1 mm on many cores).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")

# ITK's thread-pool size, which ANTs (antspyx) reads as well; set (when unset) before either starts its pool.
ITK_THREADS_VARIABLE = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
ITK_REPRODUCIBLE_THREADS = 1

_configured: dict[str, int | str] | None = None


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if value >= 1 else None


def affinity_cpus() -> int:
    """CPUs the scheduler lets this process run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cgroup_cpu_limit() -> int | None:
    """The cgroup CPU quota in whole CPUs (rounded up), or None when there is no quota or no cgroup files."""
    try:
        if CGROUP_V2_CPU_MAX.exists():
            quota, _, period = CGROUP_V2_CPU_MAX.read_text().strip().partition(" ")
            if quota == "max":
                return None
            return max(1, math.ceil(int(quota) / int(period or 100000)))
        if CGROUP_V1_QUOTA.exists() and CGROUP_V1_PERIOD.exists():
            quota_us = int(CGROUP_V1_QUOTA.read_text().strip())
            period_us = int(CGROUP_V1_PERIOD.read_text().strip())
            if quota_us <= 0 or period_us <= 0:  # -1: no quota
                return None
            return max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):
        return None
    return None


def allowed_threads() -> tuple[int, str]:
    """``(threads, source)``: the thread count this process should use and where it came from."""
    limit = affinity_cpus()
    env = _positive_int(os.environ.get("OMP_NUM_THREADS"))
    if env is not None:
        return min(env, limit), "OMP_NUM_THREADS"
    quota = cgroup_cpu_limit()
    if quota is not None:
        return min(quota, limit), "cgroup CPU quota"
    slurm = _positive_int(os.environ.get("SLURM_CPUS_PER_TASK"))
    if slurm is not None:
        return min(slurm, limit), "SLURM_CPUS_PER_TASK"
    return limit, "CPU affinity"


def default_itk_threads() -> None:
    """One ITK thread unless ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` is set (reproducible registration; ITK reads
    the variable once, at its first use). Called by :func:`configure_threads` and by the one place that loads ANTs
    (:func:`m2diff_monai.data.grid._ants`), so the Python API gets the same default as the CLIs."""
    os.environ.setdefault(ITK_THREADS_VARIABLE, str(ITK_REPRODUCIBLE_THREADS))


def configure_threads(threads: int | None = None, import_torch: bool = True) -> dict[str, int | str]:
    """Apply the allowed thread count (or an explicit ``threads``, e.g. a CLI's ``--threads``) to torch, and set
    ITK's/ANTs' thread variable to one thread when unset (``import_torch=False``: torch only if already imported).
    Returns ``{"threads", "source"}`` for logs and run summaries.

    Idempotent: later calls without ``threads`` return the first decision; an explicit ``threads`` re-applies.
    torch's inter-op pool can be sized only once, before any parallel work, so a failure there is ignored.
    """
    global _configured
    if _configured is not None and threads is None:
        return dict(_configured)
    if threads is not None:
        count, source = max(1, int(threads)), "--threads"
    else:
        count, source = allowed_threads()
    default_itk_threads()
    # Preprocessing does not otherwise need torch (seconds to import): size its pools only once something loaded it.
    torch = sys.modules.get("torch")
    if torch is None and import_torch:
        import torch
    if torch is not None:
        torch.set_num_threads(count)
        if _configured is None:
            with contextlib.suppress(RuntimeError):  # the pool already started (e.g. the host ran torch work first)
                torch.set_num_interop_threads(count)
    _configured = {"threads": count, "source": source}
    logger.info("using %d CPU thread(s) (%s)", count, source)
    return dict(_configured)


def reset_for_tests() -> None:
    """Forget the first decision (tests only)."""
    global _configured
    _configured = None
