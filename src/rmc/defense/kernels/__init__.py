"""Optional C kernels for the CPU fast path, compiled on first use and cached.

They need a C compiler (`cc`/`gcc`, found on PATH or named by $CC). Without one, or with `RMC_NO_KERNELS=1`, the
fast path runs the same computation in PyTorch operations (a one-time warning says so). The shared library is built
with `-O3 -march=native` into `$RMC_CACHE_DIR/kernels` (default `~/.cache/rmc/kernels`), named by a hash of the
source, the compiler command and the CPU, so a machine never loads a library built for another. It is written under
a temporary name and renamed, so an interrupted build leaves nothing half-written. Calls go through ctypes, which
releases the interpreter lock while a kernel runs (the batched-episodic worker threads run them in parallel).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

_SOURCES = ("conv_pool_relu.c",)
_FLAGS = ["-O3", "-march=native", "-std=c99", "-ffp-contract=fast", "-fPIC", "-shared", "-fno-math-errno", "-Wno-psabi"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_enabled = True


def cache_dir() -> Path:
    return Path(os.environ.get("RMC_CACHE_DIR", Path.home() / ".cache" / "rmc")) / "kernels"


def _cpu_id() -> str:
    from rmc.cpu import cpu_info
    info = cpu_info()
    return f"{platform.machine()}|{info.get('model name', '')}|{info.get('flags', '')}"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    here = Path(__file__).parent
    source = "".join((here / s).read_text() for s in _SOURCES)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([source, cc, version, " ".join(_FLAGS), _cpu_id()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"rmc_kernels_{key}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        except OSError as e:
            raise RuntimeError(f"cannot write to {out.parent} ({e.strerror}; set RMC_CACHE_DIR to a writable "
                               "folder)") from e
        os.close(fd)
        try:
            res = subprocess.run([cc, *_FLAGS, "-o", tmp, *(str(here / s) for s in _SOURCES), "-lm"],
                                 capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()[:500]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    ptr, i = ctypes.c_void_p, ctypes.c_int
    for name, n_ptr, n_int in (("stem_forward", 5, 9), ("stem_backward", 5, 9),
                                ("pool_relu_forward", 4, 4), ("pool_relu_backward", 4, 4),
                                ("relu_gap_forward", 5, 3), ("relu_gap_backward", 5, 3)):
        fn = getattr(lib, name)
        fn.argtypes = [ptr] * n_ptr + [i] * n_int
        fn.restype = i
    return lib


@contextlib.contextmanager
def use(enabled: bool):
    """Within the block the fast path uses (True) or does not use (False) the C kernels: for comparisons (a
    process-wide switch, not per thread)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, a failed build, RMC_NO_KERNELS=1, or inside `use(False)`):
    callers then fall back to PyTorch operations."""
    global _lib, _tried
    if not _enabled or os.environ.get("RMC_NO_KERNELS", "") not in ("", "0"):
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _build()
            except Exception as e:   # any failure only costs speed
                warnings.warn(f"rmc: C kernels unavailable ({e}); the fast path uses PyTorch operations instead",
                              stacklevel=2)
            _tried = True
    return _lib
