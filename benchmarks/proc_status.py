"""This process's memory figures from /proc/self/status (Linux).

A module of its own, importing nothing beyond the standard library, so that the light subprocess phases of
scale_store.py and scale.py measure their own memory without loading rmc (common.py imports it).
"""

from __future__ import annotations


def status_bytes(field: str) -> int | None:
    """A /proc/self/status field (VmRSS, VmHWM: the resident high-water mark, RssAnon, ...) in bytes; None where the
    file or the field is missing (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def status_mb(field: str) -> float:
    """The same in MiB; NaN where it cannot be read."""
    value = status_bytes(field)
    return float("nan") if value is None else value / (1 << 20)
