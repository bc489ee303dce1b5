"""The fast path's CPU kernels as PyTorch operators (`torch.ops.rmc.*`), built on first use.

`ops.cpp` defines the operators and their schemas; the loops (`conv_pool_relu.h`) are compiled in it once per
instruction set (baseline, AVX2, AVX-512) and each call runs the copy for ATen's CPU capability, so results depend on
that capability (recorded in every result, `rmc.defense.forwards.compute_path`), never on the build machine: no
`-march=native`. This module registers their fake (shape-only) and autograd implementations, so they behave as
ordinary operators under autograd, `torch.compile` and `torch.library.opcheck` (tests/test_kernels.py).

They are built with `torch.utils.cpp_extension` (a C++ compiler and ninja; ~20 s, once) into `$RMC_CACHE_DIR/kernels`
(default `~/.cache/rmc/kernels`), in a folder named by a hash of the sources, torch's version and the compiler, built
under a temporary name and renamed when complete. A process loads them once (the `rmc` operator namespace can be
registered only once per process). Without a compiler, after a failed build, or with `RMC_NO_KERNELS=1`, the fast
path runs the same computation in PyTorch operations (a one-time warning says so; the compute path then reads
'fast', not 'fast+kernels').
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).parent
_SOURCES = ("ops.cpp", "conv_pool_relu.h")
_CFLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi"]
_lock = threading.Lock()
_loaded: bool | None = None
_registered = False     # the operators are in this process
_enabled = True
ISA_NAMES = ("DEFAULT", "AVX2", "AVX512")   # rmc::isa() levels, named as torch.backends.cpu.get_cpu_capability()


def cache_dir() -> Path:
    return Path(os.environ.get("RMC_CACHE_DIR", Path.home() / ".cache" / "rmc")) / "kernels"


def _compiler() -> str:
    cxx = os.environ.get("CXX")
    found = shutil.which(cxx) if cxx else (shutil.which("c++") or shutil.which("g++"))
    if found is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    try:
        version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise RuntimeError(f"the C++ compiler {found} does not run ({e})") from e
    if version.returncode != 0:
        raise RuntimeError(f"the C++ compiler {found} does not run (--version exited with {version.returncode})")
    return found + "\0" + version.stdout


def library_path() -> Path:
    """Where the library for these sources, this torch and this compiler is (or will be) cached."""
    source = "".join((_HERE / s).read_text() for s in _SOURCES)
    parts = [source, _compiler(), torch.__version__, " ".join(_CFLAGS)]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return cache_dir() / key / f"rmc_kernels_{key}.so"


def _build(target: Path) -> None:
    """Builds the library into a fresh temporary folder (loading it into this process) and renames the folder to
    target's: an interrupted build leaves only a '.partial' folder, which is never loaded and never waited on."""
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is missing (pip install ninja)")
    try:
        target.parent.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.parent.name}.", suffix=".partial", dir=target.parent.parent))
    except OSError as e:
        raise RuntimeError(f"cannot write to {target.parent.parent} ({e.strerror}; set RMC_CACHE_DIR to a writable "
                           "folder)") from e
    print(f"rmc: building the fast path's kernels into {target.parent} (once per torch and compiler, ~20 s) ...",
          file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name=target.stem, sources=[str(_HERE / "ops.cpp")], extra_cflags=_CFLAGS,
                           extra_include_paths=[str(_HERE)], build_directory=str(tmp), is_python_module=False,
                           verbose=False)
        if target.parent.exists() and not target.exists():   # a folder whose library was deleted: replace it
            shutil.rmtree(target.parent, ignore_errors=True)
        try:
            os.rename(tmp, target.parent)
        except OSError:     # another process finished the same build first: keep its folder
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_library() -> None:
    global _registered
    target = library_path()
    if _registered:      # a second library registering the `rmc` namespace would abort the process
        return
    if target.exists():
        torch.ops.load_library(str(target))
    else:
        _build(target)
    _register_python_parts()
    _registered = True


def _register_python_parts() -> None:
    """Fake implementations (output shapes, for torch.compile and meta tensors) and autograd formulas."""
    lib = "rmc::"

    def nhwc(like, n, c, h, w, dtype=None):
        return like.new_empty((n, c, h, w), dtype=dtype).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake(lib + "conv_pool_relu")
    def _(x, weight, bias, padding):
        n, _, h, w = x.shape
        co, _, kh, kw = weight.shape
        ho, wo = (h + 2 * padding[0] - kh + 1) // 2, (w + 2 * padding[1] - kw + 1) // 2
        return nhwc(x, n, co, ho, wo), nhwc(x, n, co, ho, wo, torch.uint8)

    @torch.library.register_fake(lib + "conv_pool_relu_backward")
    def _(x, grad, idx, weight_shape, padding):
        return x.new_empty(weight_shape), x.new_empty(weight_shape[0])

    @torch.library.register_fake(lib + "pool_relu")
    def _(h, bias):
        n, c, hh, ww = h.shape
        return nhwc(h, n, c, hh // 2, ww // 2), nhwc(h, n, c, hh // 2, ww // 2, torch.uint8)

    @torch.library.register_fake(lib + "pool_relu_backward")
    def _(grad, idx, h_shape):
        return nhwc(grad, *h_shape), grad.new_empty(h_shape[1])

    @torch.library.register_fake(lib + "relu_gap")
    def _(h, bias):
        n, c, hh, ww = h.shape
        return h.new_empty(n, c, 1, 1), h.new_empty((n, hh * ww, c), dtype=torch.uint8), h.new_empty(n, c)

    @torch.library.register_fake(lib + "relu_gap_backward")
    def _(grad, mask, count, h_shape):
        return nhwc(grad, *h_shape), grad.new_empty(h_shape[1])

    def setup_conv(ctx, inputs, output):
        x, weight, bias, padding = inputs
        ctx.save_for_backward(x, output[1])
        ctx.weight_shape, ctx.padding = list(weight.shape), list(padding)

    def backward_conv(ctx, grad_y, grad_idx):
        x, idx = ctx.saved_tensors
        gw, gb = torch.ops.rmc.conv_pool_relu_backward(x, grad_y.float(), idx, ctx.weight_shape, ctx.padding)
        return None, gw, gb, None

    torch.library.register_autograd(lib + "conv_pool_relu", backward_conv, setup_context=setup_conv)

    def setup_pool(ctx, inputs, output):
        h, bias = inputs
        ctx.save_for_backward(output[1])
        ctx.h_shape, ctx.has_bias = list(h.shape), bias is not None

    def backward_pool(ctx, grad_y, grad_idx):
        (idx,) = ctx.saved_tensors
        gh, gb = torch.ops.rmc.pool_relu_backward(grad_y.float(), idx, ctx.h_shape)
        return gh, gb if ctx.has_bias else None

    torch.library.register_autograd(lib + "pool_relu", backward_pool, setup_context=setup_pool)

    def setup_gap(ctx, inputs, output):
        h, bias = inputs
        ctx.save_for_backward(output[1], output[2])
        ctx.h_shape, ctx.has_bias = list(h.shape), bias is not None

    def backward_gap(ctx, grad_y, grad_mask, grad_count):
        mask, count = ctx.saved_tensors
        gh, gb = torch.ops.rmc.relu_gap_backward(grad_y.float(), mask, count, ctx.h_shape)
        return gh, gb if ctx.has_bias else None

    torch.library.register_autograd(lib + "relu_gap", backward_gap, setup_context=setup_gap)


@contextlib.contextmanager
def use(enabled: bool):
    """Within the block the fast path uses (True) or does not use (False) the kernels: for comparisons (a
    process-wide switch, not per thread)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def load() -> bool:
    """Whether the operators are usable here (built and loaded now if need be). False with no compiler, after a
    failed build, with RMC_NO_KERNELS=1, or inside `use(False)`: callers then use PyTorch operations."""
    global _loaded
    if not _enabled or os.environ.get("RMC_NO_KERNELS", "") not in ("", "0"):
        return False
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            try:
                _load_library()
                _loaded = True
            except Exception as e:   # any failure only costs speed
                warnings.warn(f"rmc: C++ kernels unavailable ({str(e).strip().splitlines()[-1][:300]}); the fast "
                              "path uses PyTorch operations instead", stacklevel=2)
                _loaded = False
    return _loaded


@contextlib.contextmanager
def isa(name: str):
    """Within the block the kernels run their `name` copy ('DEFAULT', 'AVX2' or 'AVX512', at most ATen's
    capability): for tests comparing the copies on one machine."""
    before = torch.ops.rmc.isa()
    torch.ops.rmc.set_isa(ISA_NAMES.index(name))
    try:
        yield
    finally:
        torch.ops.rmc.set_isa(before)
