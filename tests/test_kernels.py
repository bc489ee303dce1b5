"""The C kernels compute what the PyTorch operations they replace compute, values and gradients, and their absence
only costs speed."""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmc.defense import kernels
from rmc.defense.fastpath import ConvPoolRelu, ConvReluGap, FoldedConvBN, _PoolReluKernel, _ReluGapKernel, fast_forward
from rmc.defense.scope import configure_model
from rmc.models import build_model

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler: the kernels cannot be built here")


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
@pytest.mark.parametrize("c_in,shape,padding,bn", [
    (1, (28, 28), 1, True),     # small_cnn's first block (K = 9)
    (3, (16, 16), 1, False),    # RGB with a bias (K = 27)
    (2, (15, 13), 0, True),     # odd sizes (floor-mode pooling drops a row and a column), no padding, K = 18
])
def test_first_block_kernel_matches_pytorch(c_in, shape, padding, bn):
    torch.manual_seed(0)
    module = _conv_pool_relu(c_in, 32, padding, bn)
    x = torch.rand(5, c_in, *shape)
    x[0] = 0.0          # every window position equal: the first one wins, as in PyTorch's max-pooling
    with torch.no_grad():
        g = torch.randn_like(module(x))
    want_y, want_g = _values_and_grads(module, x, g, False)
    got_y, got_g = _values_and_grads(module, x, g, True)
    assert got_y.is_contiguous(memory_format=torch.channels_last)
    assert (got_y == 0).any() and (got_y > 0).any()        # ReLU both clamps and passes values here
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-6)
    for got, want in zip(got_g, want_g):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert type(got_y.grad_fn).__name__ == "_ConvPoolReluKernelBackward"
    assert type(want_y.grad_fn).__name__ != "_ConvPoolReluKernelBackward"


@needs_compiler
@pytest.mark.parametrize("kind", ["pool", "gap"])
@pytest.mark.parametrize("shape,bn", [((14, 14), True), ((7, 9), False)])
def test_later_block_kernels_match_pytorch(kind, shape, bn):
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
        with kernels.use(use):
            y = module(xi)
            g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
            grads = torch.autograd.grad(y, [xi, *params], g)
        fused = type(y.grad_fn).__name__ in ("_PoolReluKernelBackward", "_ReluGapKernelBackward")
        assert fused == use
        results.append((y, grads))
    (want_y, want_g), (got_y, got_g) = results
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-6)
    for got, want in zip(got_g, want_g):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_compiler
def test_pool_and_gap_kernels_on_ties_and_nan():
    lib = kernels.load()
    torch.manual_seed(2)
    h = torch.randn(3, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    h[0, :, :2, :2] = 0.5                        # ties: the first window position wins, as in PyTorch
    h[1, 3] = float("nan")                       # NaN propagates through max-pooling and ReLU
    b = torch.randn(32)
    for fn, ref in ((_PoolReluKernel, lambda h, b: F.relu(F.max_pool2d(h + b.view(1, -1, 1, 1), 2))),
                    (_ReluGapKernel, lambda h, b: F.relu(h + b.view(1, -1, 1, 1)).mean((2, 3), keepdim=True))):
        outs, grads = [], []
        for use in (False, True):
            hi, bi = h.clone().requires_grad_(), b.clone().requires_grad_()
            y = fn.apply(hi, bi, lib) if use else ref(hi, bi)
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
    assert sum(isinstance(m, ConvPoolRelu) for m in fast.modules()) == 2 and kernels.load() is not None
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
    """A fresh, empty kernel cache: rmc.defense.kernels forgets what it loaded and builds into tmp_path."""
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("RMC_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_kernels_unavailable_falls_back_with_a_warning(monkeypatch, cache):
    monkeypatch.setenv("CC", "false")                       # a "compiler" that always fails
    with pytest.warns(UserWarning, match="C kernels unavailable"):
        assert kernels.load() is None
    assert not list((cache / "kernels").glob("*"))          # nothing half-written left behind
    model = build_model("small_cnn", 10, 1).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast_forward(model, x)(x), model(x), rtol=1e-4, atol=1e-5)


@needs_compiler
def test_unwritable_cache_names_the_fix(monkeypatch, cache):
    blocker = cache / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("RMC_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="set RMC_CACHE_DIR to a writable folder"):
        assert kernels.load() is None


@needs_compiler
def test_kernels_build_once_into_the_cache(monkeypatch, cache):
    assert kernels.load() is not None
    built = list((cache / "kernels").glob("*"))
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(kernels, "_tried", False)
    assert kernels.load() is not None
    assert [p.stat().st_mtime_ns for p in (cache / "kernels").glob("*")] == [stamp]
    monkeypatch.setenv("RMC_NO_KERNELS", "1")
    assert kernels.load() is None


@needs_compiler
def test_bf16_autocast_keeps_the_first_block_kernel_only():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval()
    x = torch.rand(8, 1, 28, 28)
    fast = fast_forward(model, x[:2])
    seen = []
    for m in fast.modules():
        if isinstance(m, (ConvPoolRelu, ConvReluGap)):
            m.register_forward_hook(lambda mod, inp, out: seen.append((type(out.grad_fn).__name__, out.dtype)))
    outs = []
    for use in (True, False):
        with kernels.use(use), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(fast(x).float())
    first, second, gap = seen[:3]
    assert first == ("_ConvPoolReluKernelBackward", torch.float32)      # float32 arithmetic inside the kernel
    assert second[0] != "_PoolReluKernelBackward" and second[1] == torch.bfloat16
    assert gap[0] != "_ReluGapKernelBackward"
    torch.testing.assert_close(outs[0], outs[1], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("c_out,pool", [(24, nn.MaxPool2d(2)), (32, nn.MaxPool2d(3, 2, 1))])
def test_shapes_the_kernels_do_not_cover_run_as_pytorch_operations(c_out, pool):
    torch.manual_seed(3)
    conv = nn.Conv2d(1, c_out, 3, padding=1)
    module = ConvPoolRelu(conv, pool)
    x = torch.rand(2, 1, 12, 12)
    y = module(x)
    assert "Kernel" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.relu(pool(conv(x))))
