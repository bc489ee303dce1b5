"""The kernels (operators torch.ops.rmc.*) compute what the PyTorch operations they replace compute, values and
gradients, in every instruction-set copy; they pass PyTorch's operator checks; their absence only costs speed."""

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmc.defense import kernels
from rmc.defense.fastpath import ConvPoolRelu, ConvReluGap, FoldedConvBN, fast_forward
from rmc.defense.scope import configure_model
from rmc.models import build_model

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler: the kernels cannot be built here")


def _kernel(y: torch.Tensor) -> str | None:
    """Which rmc operator made y (from its autograd node), or None."""
    name = type(y.grad_fn).__name__
    for op in ("conv_pool_relu", "pool_relu", "relu_gap"):
        if f"rmc_{op}_default" in name:
            return op
    return None


def _isas() -> list[str]:
    """The kernels' instruction-set copies this CPU can run (up to ATen's capability)."""
    kernels.load()
    return list(kernels.ISA_NAMES[:torch.ops.rmc.isa() + 1])


def _conv_pool_relu(c_in, c_out, padding, bn):
    conv = nn.Conv2d(c_in, c_out, 3, padding=padding, bias=not bn)
    if not bn:
        return ConvPoolRelu(conv, nn.MaxPool2d(2))
    norm = nn.BatchNorm2d(c_out).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-0.3, 0.3)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return ConvPoolRelu(FoldedConvBN(conv, norm), nn.MaxPool2d(2))


def _values_and_grads(module, x, g, use_kernels):
    params = [p for p in module.parameters() if p.requires_grad]
    with kernels.use(use_kernels):
        y = module(x)
        grads = torch.autograd.grad(y, params, g)
    return y, grads


@needs_compiler
@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
@pytest.mark.parametrize("c_in,shape,padding,bn", [
    (1, (28, 28), 1, True),     # small_cnn's first block (K = 9)
    (3, (16, 16), 1, False),    # RGB with a bias (K = 27)
    (2, (15, 13), 0, True),     # odd sizes (floor-mode pooling drops a row and a column), no padding, K = 18
])
def test_first_block_kernel_matches_pytorch(c_in, shape, padding, bn, isa):
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} copy")
    torch.manual_seed(0)
    module = _conv_pool_relu(c_in, 32, padding, bn)
    x = torch.rand(5, c_in, *shape)
    x[0] = 0.0          # every window position equal: the first one wins, as in PyTorch's max-pooling
    with torch.no_grad():
        g = torch.randn_like(module(x))
    want_y, want_g = _values_and_grads(module, x, g, False)
    with kernels.isa(isa):
        got_y, got_g = _values_and_grads(module, x, g, True)
    assert got_y.is_contiguous(memory_format=torch.channels_last)
    assert (got_y == 0).any() and (got_y > 0).any()        # ReLU both clamps and passes values here
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-6)
    for got, want in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert _kernel(got_y) == "conv_pool_relu" and _kernel(want_y) is None


@needs_compiler
@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
@pytest.mark.parametrize("kind", ["pool", "gap"])
@pytest.mark.parametrize("shape,bn", [((14, 14), True), ((7, 9), False)])
def test_later_block_kernels_match_pytorch(kind, shape, bn, isa):
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} copy")
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 32, 3, padding=1, bias=not bn)       # C_in x 3 x 3 = 72: not a first layer
    if bn:
        norm = nn.BatchNorm2d(32).eval()
        with torch.no_grad():
            norm.running_mean.uniform_(-0.3, 0.3)
            norm.bias.uniform_(-0.2, 0.2)
        conv = FoldedConvBN(conv, norm)
    module = ConvPoolRelu(conv, nn.MaxPool2d(2)) if kind == "pool" else ConvReluGap(conv)
    x = torch.rand(4, 8, *shape).contiguous(memory_format=torch.channels_last)
    params = [p for p in module.parameters() if p.requires_grad]
    results = []
    for use in (False, True):
        xi = x.clone().requires_grad_()
        with kernels.use(use), kernels.isa(isa):
            y = module(xi)
            g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
            grads = torch.autograd.grad(y, [xi, *params], g)
        assert _kernel(y) == ({"pool": "pool_relu", "gap": "relu_gap"}[kind] if use else None)
        results.append((y, grads))
    (want_y, want_g), (got_y, got_g) = results
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-6)
    for got, want in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_compiler
def test_pool_and_gap_kernels_on_ties_and_nan():
    assert kernels.load()
    torch.manual_seed(2)
    h = torch.randn(3, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    h[0, :, :2, :2] = 0.5                        # ties: the first window position wins, as in PyTorch
    h[1, 3] = float("nan")                       # NaN propagates through max-pooling and ReLU
    b = torch.randn(32)
    for op, ref in ((torch.ops.rmc.pool_relu, lambda h, b: F.relu(F.max_pool2d(h + b.view(1, -1, 1, 1), 2))),
                    (torch.ops.rmc.relu_gap, lambda h, b: F.relu(h + b.view(1, -1, 1, 1)).mean((2, 3), keepdim=True))):
        outs, grads = [], []
        for use in (False, True):
            hi, bi = h.clone().requires_grad_(), b.clone().requires_grad_()
            y = op(hi, bi)[0] if use else ref(hi, bi)
            outs.append(y)
            grads.append(torch.autograd.grad(y, (hi, bi), torch.ones_like(y)))
        torch.testing.assert_close(outs[1], outs[0], equal_nan=True)
        torch.testing.assert_close(grads[1][0], grads[0][0], equal_nan=True)
        torch.testing.assert_close(grads[1][1], grads[0][1], equal_nan=True, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_fast_path_with_and_without_kernels_trains_alike():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    fast = fast_forward(model, x[:4])
    assert sum(isinstance(m, ConvPoolRelu) for m in fast.modules()) == 2 and kernels.load()
    assert sum(isinstance(m, ConvReluGap) for m in fast.modules()) == 1
    results = []
    for use in (True, False):
        net = configure_model(copy.deepcopy(model))
        fwd = fast_forward(net, x[:4])
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        with kernels.use(use):
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(fwd(x), y).backward()
                opt.step()
            with torch.no_grad():
                results.append(net(x))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fresh, empty kernel cache: rmc.defense.kernels forgets whether it loaded and builds into tmp_path."""
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setenv("RMC_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_kernels_unavailable_falls_back_with_a_warning(monkeypatch, cache):
    monkeypatch.setenv("CXX", "false")                      # a "compiler" that does not run
    with pytest.warns(UserWarning, match="kernels unavailable.*does not run"):
        assert kernels.load() is False
    assert not list(cache.rglob("*"))                       # nothing half-written left behind
    model = build_model("small_cnn", 10, 1).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast_forward(model, x)(x), model(x), rtol=1e-4, atol=1e-5)


def _load_in_new_process(cache, **env) -> subprocess.CompletedProcess:
    """kernels.load() in a fresh process (this one has its operators already; a process loads them once)."""
    code = ("from rmc.defense import kernels; import torch; "
            "print(kernels.load(), kernels.load() and torch.ops.rmc.isa())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RMC_CACHE_DIR": str(cache), **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return out


@needs_compiler
def test_unwritable_cache_names_the_fix(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    out = _load_in_new_process(blocker)
    assert out.stdout.split() == ["False", "False"] and "set RMC_CACHE_DIR to a writable folder" in out.stderr


@pytest.mark.slow
@needs_compiler
def test_kernels_build_once_into_the_cache_and_follow_atens_capability(cache):
    """A fresh process builds the library (~20 s) into a folder renamed when complete; the next one loads it
    without building; one library serves every instruction set, chosen by ATen's capability."""
    level = kernels.ISA_NAMES.index(torch.backends.cpu.get_cpu_capability())
    assert _load_in_new_process(cache).stdout.split() == ["True", str(level)]
    built = list(cache.rglob("*.so"))
    assert len(built) == 1 and not list(cache.rglob("*.partial"))
    stamp = built[0].stat().st_mtime_ns
    assert _load_in_new_process(cache, ATEN_CPU_CAPABILITY="default").stdout.split() == ["True", "0"]
    assert [p.stat().st_mtime_ns for p in cache.rglob("*.so")] == [stamp]
    if level >= 1:
        assert _load_in_new_process(cache, ATEN_CPU_CAPABILITY="avx2").stdout.split() == ["True", "1"]


def test_rmc_no_kernels_switches_them_off(monkeypatch):
    monkeypatch.setenv("RMC_NO_KERNELS", "1")
    assert kernels.load() is False


def _backward_args(op: str, x: torch.Tensor, *rest) -> tuple:
    """Arguments of `op`'s backward operator, from a forward call on x (channels-last unless the first block)."""
    if op != "conv_pool_relu":
        x = x.contiguous(memory_format=torch.channels_last)
    out = getattr(torch.ops.rmc, op)(x, *rest)
    grad = torch.randn_like(out[0])
    if op == "conv_pool_relu":
        return x, grad, out[1], list(rest[0].shape), rest[2]
    return (grad, *out[1:], list(x.shape))


@needs_compiler
@pytest.mark.parametrize("op,args", [
    ("conv_pool_relu", lambda: (torch.rand(3, 1, 9, 8), torch.randn(16, 1, 3, 3, requires_grad=True),
                                torch.randn(16, requires_grad=True), [1, 0])),
    ("pool_relu", lambda: (torch.randn(2, 32, 7, 6).contiguous(memory_format=torch.channels_last).requires_grad_(),
                           torch.randn(32, requires_grad=True))),
    ("pool_relu", lambda: (torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last), None)),
    ("relu_gap", lambda: (torch.randn(2, 32, 5, 3).contiguous(memory_format=torch.channels_last).requires_grad_(),
                          torch.randn(32, requires_grad=True))),
    ("conv_pool_relu_backward", lambda: _backward_args("conv_pool_relu", torch.rand(3, 1, 9, 8),
                                                       torch.randn(16, 1, 3, 3), torch.randn(16), [1, 0])),
    ("pool_relu_backward", lambda: _backward_args("pool_relu", torch.randn(2, 32, 7, 6), None)),
    ("relu_gap_backward", lambda: _backward_args("relu_gap", torch.randn(2, 32, 5, 3), None)),
])
def test_operators_pass_pytorchs_opcheck(op, args):
    """Schema, fake (shape-only) implementation, autograd registration and AOT dispatch, as torch.compile and
    torch.func need them."""
    assert kernels.load()
    torch.library.opcheck(getattr(torch.ops.rmc, op).default, args())


@needs_compiler
def test_operators_refuse_what_they_cannot_compute():
    assert kernels.load()
    h = torch.randn(2, 24, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.rmc.pool_relu(h, None)
    with pytest.raises(RuntimeError, match="must be float32"):
        torch.ops.rmc.relu_gap(h.double()[:, :16], None)
    with pytest.raises(RuntimeError, match="above what this CPU"):
        torch.ops.rmc.set_isa(3)


@pytest.mark.slow
@needs_compiler
def test_fast_path_with_kernels_compiles(monkeypatch, tmp_path):
    """torch.compile (inductor) traces through the operators via their fake implementations: same loss, same
    gradients as eager. (A private inductor cache: its on-disk cache does not key on ATen's CPU capability.)"""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    model = configure_model(build_model("small_cnn", 10, 1).eval())
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    fast = fast_forward(model, x[:2])
    assert kernels.load()
    losses, grads = [], []
    for f in (fast, torch.compile(fast)):
        model.zero_grad()
        loss = F.cross_entropy(f(x), y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_compiler
def test_bf16_autocast_keeps_the_first_block_kernel_only():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval()
    x = torch.rand(8, 1, 28, 28)
    fast = fast_forward(model, x[:2])
    seen = []
    for m in fast.modules():
        if isinstance(m, (ConvPoolRelu, ConvReluGap)):
            m.register_forward_hook(lambda mod, inp, out: seen.append((_kernel(out), out.dtype)))
    outs = []
    for use in (True, False):
        with kernels.use(use), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(fast(x).float())
    first, second, gap = seen[:3]
    assert first == ("conv_pool_relu", torch.float32)      # float32 arithmetic inside the kernel
    assert second[0] is None and second[1] == torch.bfloat16
    assert gap[0] is None
    torch.testing.assert_close(outs[0], outs[1], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("c_out,pool", [(24, nn.MaxPool2d(2)), (32, nn.MaxPool2d(3, 2, 1))])
def test_shapes_the_kernels_do_not_cover_run_as_pytorch_operations(c_out, pool):
    torch.manual_seed(3)
    conv = nn.Conv2d(1, c_out, 3, padding=1)
    module = ConvPoolRelu(conv, pool)
    x = torch.rand(2, 1, 12, 12)
    y = module(x)
    assert _kernel(y) is None
    torch.testing.assert_close(y, F.relu(pool(conv(x))))
