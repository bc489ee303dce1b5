"""CPU facts that decide how numeric libraries should be configured (imports nothing heavy)."""

from __future__ import annotations

import os
import sys
import time


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read(65536).split("\n\n", 1)[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}


def openblas_coretype_for_avx512() -> str | None:
    """'SKYLAKEX' on AMD CPUs with AVX-512 (Zen 4, Zen 5) on Linux, else None.

    OpenBLAS 0.3.15 (bundled with faiss-cpu) does not recognise Zen 5 and falls back to its generic SSE3 'Prescott'
    kernels; `OPENBLAS_CORETYPE=Haswell` gives AVX2 kernels; the CPU can run the AVX-512 'SkylakeX' ones, which make
    FAISS's flat search faster than Haswell's (figures in benchmarks/README.md).
    """
    if sys.platform != "linux":
        return None
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    family = info.get("cpu family", "0")
    if info.get("vendor_id") == "AuthenticAMD" and family.isdigit() and int(family) >= 25 and \
            {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "SKYLAKEX"
    return None


def configure_openblas(force: bool = False) -> str | None:
    """Set OPENBLAS_CORETYPE for OpenBLAS copies not loaded yet (FAISS's is loaded by `import faiss`).

    Leaves a value the user set alone unless `force`. Returns the value set, or None when nothing was changed.
    """
    want = openblas_coretype_for_avx512()
    if want is None or (not force and "OPENBLAS_CORETYPE" in os.environ):
        return None
    os.environ["OPENBLAS_CORETYPE"] = want
    return want


def tune_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed blocks for reuse instead of returning them to the kernel (the `rmc` command does this
    at start-up; library users may call it once themselves).

    With glibc's defaults every large tensor freed and allocated again (activations, gradients, PGD batches) can be
    a fresh memory map whose pages fault in one by one: `rmc augment` ran 1.7x slower for it, and in an earlier
    benchmark the plain PyTorch training loop lost ~35% (benchmarks/README.md). Process-wide; the environment's
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do the same. Returns False where unavailable.
    """
    if sys.platform != "linux":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(mmap_threshold))) and bool(libc.mallopt(-1, int(trim_threshold)))
    except (OSError, AttributeError):
        return False


def tune_allocator() -> bool:
    """`tune_malloc` for a process rmc owns (the `rmc` command, Ray's workers), unless told not to:
    RMC_DEFAULT_MALLOC=1, or the user's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, leave glibc as it is."""
    if os.environ.get("RMC_DEFAULT_MALLOC") == "1" or any(
            v in os.environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    return tune_malloc()


BUSY_WINDOW = 0.25   # seconds over which pick_threads samples how busy the cores are now


def _cpu_times(stat: str) -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat's text, None if it has no readable 'cpu' line."""
    fields = stat.split("\n", 1)[0].split()
    if len(fields) < 5 or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]   # user nice system idle iowait irq softirq steal
    return ticks[3] + ticks[4], sum(ticks)


def busy_cores(window: float = BUSY_WINDOW, stat_path: str = "/proc/stat") -> float | None:
    """How many cores other processes keep busy now: the busy share of all CPUs over `window` seconds (while this
    process sleeps) times their number. None where /proc/stat cannot be read."""
    try:
        with open(stat_path) as f:
            first = f.read()
        time.sleep(window)
        with open(stat_path) as f:
            second = f.read()
        a, b = _cpu_times(first), _cpu_times(second)
    except (OSError, ValueError):
        return None
    if a is None or b is None or b[1] <= a[1]:
        return None
    cpus = sum(1 for line in second.splitlines() if line[:3] == "cpu" and line[3:4].isdigit())
    return (1 - (b[0] - a[0]) / (b[1] - a[1])) * max(cpus, 1)


def pick_threads(cores: int | None = None, load: float | None = None) -> int:
    """Torch intra-op threads for this machine now: the cores not already busy, at least one.

    rmc's batches are small, so threads that must wait for a busy core cost more than they give: on the 2-core
    machine of benchmarks/README.md one thread beat two while another job ran, and two beat one when it was quiet
    (an epoch over 20k images: 22 s with two, 38 s with one). `cores`: those this process may use; `load`: busy
    cores (read from the system when not given: the 1-minute load average, or the cores busy right now if fewer,
    since the average still counts a job that ended in the last minutes).
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        now = busy_cores() if load >= 0.5 else None   # only when the average would cost a thread
        if now is not None:
            load = min(load, now)
    return max(1, min(cores, int(cores - load + 0.5)))


__all__ = ["busy_cores", "configure_openblas", "cpu_info", "openblas_coretype_for_avx512", "pick_threads",
           "tune_allocator", "tune_malloc"]
