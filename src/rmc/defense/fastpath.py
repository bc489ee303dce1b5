"""A faster forward pass of the same network for RMC's fine-tuning (same parameters, same function).

`fast_forward(model)` rewrites the model's graph (torch.fx) into an equivalent one that is cheaper to train on a CPU:

- **Convolution + batch-norm in inference mode** become one convolution whose weight and bias are computed from the
  live parameters on every call (w * gamma / sqrt(var + eps), beta - mean * gamma / sqrt(var + eps)). Gradients reach
  the convolution weight and the batch-norm affine parameters by the chain rule, exactly as before; the per-pixel
  batch-norm pass and its backward disappear. When only the batch-norm parameters train (scope 'bn') folding would
  make the backward compute a convolution weight gradient it otherwise skips, so that case runs unfused.
- **ReLU then max-pooling** become max-pooling then ReLU (equal: both are monotone), so the ReLU touches 4x fewer
  values.
- **ReLU then global average pooling** become one operation whose backward is a single masked broadcast.
- Images go through in channels-last layout, the layout oneDNN's convolutions are fastest with.
- A first convolution with a tiny reduction (C_in x kh x kw <= 32) runs on the CPU as a matrix product over image
  patches (`_PatchConv`), bias included as a column of ones; its weight gradient is one more matrix product.
- **Convolution -> 2 x 2 max-pooling -> ReLU** and **convolution -> ReLU -> global average pooling** become one
  module each (`ConvPoolRelu`, `ConvReluGap`). On the CPU, with the kernels of `rmc.defense.kernels` (operators
  `torch.ops.rmc.*`), a first layer runs as one pass that never writes the full-resolution map (forward:
  convolution, pooling, ReLU and a one-byte argmax; backward: the weight and bias gradients straight from the pooled
  gradient); other layers run the convolution without its bias and add the bias in the pooling kernel (it commutes
  with max-pooling), whose backward writes the input gradient once and gives the bias gradient. Without a C++
  compiler the same modules run the PyTorch operations above.

The returned module shares every parameter and buffer with `model` (nothing is copied), so optimising `model`'s
parameters through it and reading `model.state_dict()` afterwards just works. It is checked against `model` on a
sample input when built; any model the rewrite cannot handle (untraceable code, a mismatch) gets `model` itself back.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from rmc.defense import kernels

_RELU_FUNCS = (F.relu, torch.relu)


class FoldedConvBN(nn.Module):
    """conv -> batch-norm (inference mode) as one convolution with folded weights; shares both modules."""

    def __init__(self, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.conv, self.bn = conv, bn

    def _foldable(self) -> bool:
        bn = self.bn
        if bn.training or bn.running_mean is None or bn.running_var is None:
            return False
        bn_trains = any(p.requires_grad for p in bn.parameters())
        # Folding turns gradients of gamma into a convolution weight gradient: only worth it when that gradient is
        # computed anyway (the convolution trains too) or nothing trains at all.
        return self.conv.weight.requires_grad or not bn_trains

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if not self._foldable():
            return bn(conv2d_channels_last(conv, x, conv.weight, conv.bias))
        return conv2d_channels_last(conv, x, *self.folded())

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the one convolution equal to conv -> batch-norm (inference mode)."""
        conv, bn = self.conv, self.bn
        # called only when _foldable(): the running statistics exist
        running_mean, running_var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
        scale = torch.rsqrt(running_var + bn.eps)
        if bn.weight is not None:
            scale = bn.weight * scale
        shift = -running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        return conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))), shift


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _stem_eligible(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """A convolution with a tiny reduction (C_in x kh x kw <= 32, e.g. the first layer on grey or RGB images), on the
    CPU: oneDNN runs it slowly and, with one input channel, returns a channels-first map (which makes the next
    max-pooling 6x slower). As a matrix product over image patches it is cheaper and lands in channels-last."""
    kh, kw = conv.kernel_size
    return (x.dim() == 4 and x.device.type == "cpu" and not x.requires_grad and conv.groups == 1
            and _pair(conv.dilation) == (1, 1)
            and not isinstance(conv.padding, str) and conv.in_channels * kh * kw <= 32)


def _patches(x: torch.Tensor, kernel, stride, padding, dtype: torch.dtype,
             ones: bool) -> tuple[torch.Tensor, int, int]:
    """im2col: (N * H_out * W_out) x (C * kh * kw [+ 1]) in the order of a convolution weight's flattening, with a
    trailing column of ones when `ones` (so the bias rides along in the same matrix product, forward and backward)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c = x.shape[:2]
    p = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    win = p.unfold(2, kh, sh).unfold(3, kw, sw)             # N, C, Ho, Wo, kh, kw
    ho, wo = win.shape[2], win.shape[3]
    k = c * kh * kw
    cols = torch.empty(n, ho, wo, k + int(ones), dtype=dtype)
    cols[..., :k].view(n, ho, wo, c, kh, kw).copy_(win.permute(0, 2, 3, 1, 4, 5))
    if ones:
        cols[..., k] = 1
    return cols.view(n * ho * wo, k + int(ones)), ho, wo


class _PatchConv(torch.autograd.Function):
    """Convolution as patches @ weight^T, output channels-last; the input needs no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel, stride, padding):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
        cols, ho, wo = _patches(x, kernel, stride, padding, dtype, bias is not None)
        w2 = weight.reshape(weight.shape[0], -1)
        if bias is not None:
            w2 = torch.cat([w2, bias[:, None]], 1)
        out = cols @ w2.to(dtype).t()
        ctx.save_for_backward(cols)
        ctx.meta = (weight.shape, weight.dtype, bias is not None)
        return out.view(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        (cols,) = ctx.saved_tensors
        wshape, wdtype, has_bias = ctx.meta
        g2 = grad.permute(0, 2, 3, 1).reshape(-1, wshape[0])   # a view when grad is channels-last
        gw_all = (cols.t() @ g2.to(cols.dtype)).t().to(wdtype)  # C_out x (K [+ 1])
        k = gw_all.shape[1] - int(has_bias)
        gw = gw_all[:, :k].reshape(wshape) if ctx.needs_input_grad[1] else None
        gb = gw_all[:, k].contiguous() if has_bias and ctx.needs_input_grad[2] else None
        return None, gw, gb, None, None, None


def conv2d_channels_last(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """`conv`'s convolution with the given weight and bias, returning a channels-last map."""
    if _stem_eligible(conv, x):
        return _PatchConv.apply(x, weight, bias, conv.kernel_size, conv.stride, _pair(conv.padding))
    if x.dim() == 4:
        weight = weight.contiguous(memory_format=torch.channels_last)
    return conv._conv_forward(x, weight, bias)


class _ReluGlobalAvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = torch.relu(x)
        ctx.save_for_backward(out)
        return out.mean((2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        scaled = (grad / (out.shape[2] * out.shape[3])).to(out.dtype)
        return torch.ops.aten.threshold_backward(scaled.expand_as(out), out, 0)


def relu_global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """relu(x) averaged over the spatial dimensions (N x C x 1 x 1), with a one-pass backward."""
    return _ReluGlobalAvgPool.apply(x)


def _is_pool2(pool: nn.MaxPool2d) -> bool:
    """2 x 2 max-pooling with stride 2, no padding or dilation, floor mode (what the kernels implement)."""
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return (_pair(pool.kernel_size) == _pair(stride) == (2, 2) and _pair(pool.padding) == (0, 0)
            and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices)


def _conv_parts(mod: nn.Module) -> tuple[nn.Conv2d, torch.Tensor, torch.Tensor | None] | None:
    """(convolution, weight, bias) of a Conv2d or of a FoldedConvBN with the batch-norm folded in; None when it
    cannot be folded (then the module runs as it is)."""
    if isinstance(mod, FoldedConvBN):
        return (mod.conv, *mod.folded()) if mod._foldable() else None
    conv = cast(nn.Conv2d, mod)
    return conv, conv.weight, conv.bias


def _kernel_ready(x: torch.Tensor, parts, first_layer: bool = False) -> bool:
    """The kernels apply: a float32 CPU input, a foldable convolution with a multiple of 16 output channels in
    float32, the built operators, and outside autocast unless it is a first layer (whose kernel computes in
    float32 from the float32 input; later convolutions would give bfloat16 maps)."""
    return (parts is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and parts[1].dtype == torch.float32 and parts[0].out_channels % 16 == 0
            and (first_layer or not torch.is_autocast_enabled("cpu")) and kernels.load())


def _map_ready(h: torch.Tensor) -> bool:
    """A map the pooling kernels take: channels-last float32 on the CPU, channels a multiple of 16."""
    return (h.dim() == 4 and h.device.type == "cpu" and h.dtype == torch.float32 and h.shape[1] % 16 == 0
            and h.is_contiguous(memory_format=torch.channels_last) and kernels.load())


def _with_bias(h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return h if bias is None else h + bias.reshape(1, -1, 1, 1)


def _conv_without_bias(mod: nn.Module, x: torch.Tensor, parts) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the convolution's output without its bias, the bias) when the kernels can add the bias, else
    (the module's output, None). `parts`: `_conv_parts(mod)`, computed once per call by the caller."""
    if _kernel_ready(x, parts):
        conv, weight, bias = parts
        return conv2d_channels_last(conv, x, weight, None), bias
    return mod(x), None


class ConvPoolRelu(nn.Module):
    """conv (or conv + folded batch-norm) -> max-pooling -> ReLU, sharing the given modules.

    With the kernels on the CPU (float32, 2 x 2 pooling): a first layer (tiny reduction, stride 1, input
    needing no gradient) runs as one kernel that never writes the full-resolution map; other layers run the
    convolution without its bias, then pooling, bias and ReLU in one kernel (the bias commutes with max-pooling).
    Otherwise the three steps run as PyTorch operations.
    """

    def __init__(self, conv: nn.Module, pool: nn.MaxPool2d):
        super().__init__()
        self.conv, self.pool = conv, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _is_pool2(self.pool):
            return F.relu(self.pool(self.conv(x)))
        parts = _conv_parts(self.conv)
        if parts is not None and _stem_eligible(parts[0], x) and _pair(parts[0].stride) == (1, 1) \
                and _kernel_ready(x, parts, first_layer=True):
            conv, weight, bias = parts
            bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
            return torch.ops.rmc.conv_pool_relu(x, weight, bias, _pair(conv.padding))[0]
        h, bias = _conv_without_bias(self.conv, x, parts)
        if _map_ready(h):
            return torch.ops.rmc.pool_relu(h, bias)[0]
        return F.relu(self.pool(_with_bias(h, bias)))


class ConvReluGap(nn.Module):
    """conv (or conv + folded batch-norm) -> ReLU -> global average pooling (N x C x 1 x 1), sharing the module.

    With the kernels on the CPU (float32): the convolution without its bias, then bias, ReLU and pooling
    in one kernel whose backward also gives the bias gradient. Otherwise `relu_global_avg_pool(conv(x))`.
    """

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, bias = _conv_without_bias(self.conv, x, _conv_parts(self.conv))
        if _map_ready(h):
            return torch.ops.rmc.relu_gap(h, bias)[0]
        return relu_global_avg_pool(_with_bias(h, bias))


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS and len(node.args) == 1 and not node.kwargs.get("inplace", False)
    if node.op == "call_method":
        return node.target == "relu" and len(node.args) == 1
    return False


def _module(gm: fx.GraphModule, node: fx.Node, cls) -> Any:
    """The submodule a call_module node runs if it is an instance of `cls`, else None."""
    if node.op != "call_module":
        return None
    m = gm.get_submodule(str(node.target))
    return m if isinstance(m, cls) else None


def _global_pool(m: nn.Module | None) -> bool:
    return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))


def _fold_conv_bn(gm: fx.GraphModule) -> None:
    """Each batch-norm that alone reads a convolution's output folded into it (FoldedConvBN)."""
    graph = gm.graph
    n_fold = 0
    for node in list(graph.nodes):
        bn = _module(gm, node, nn.BatchNorm2d)
        if bn is None or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        conv = _module(gm, src, nn.Conv2d) if isinstance(src, fx.Node) else None
        if conv is None or len(src.users) != 1 or conv.padding_mode != "zeros" or bn.num_features != conv.out_channels:
            continue
        name = f"_rmc_folded_{n_fold}"
        n_fold += 1
        gm.add_submodule(name, FoldedConvBN(conv, bn))
        with graph.inserting_after(node):
            fused = graph.call_module(name, src.args, src.kwargs)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(src)


def _swap_relu_pool(gm: fx.GraphModule) -> None:
    """ReLU -> max-pooling becomes max-pooling -> ReLU; ReLU -> global average pooling becomes one operation."""
    graph = gm.graph
    for node in list(graph.nodes):
        if not _is_relu(gm, node) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        src = node.args[0]
        if not isinstance(src, fx.Node) or len(src.users) != 1:   # an in-place ReLU changes what others read
            continue
        if _module(gm, user, nn.MaxPool2d) is not None and len(user.args) == 1 and not user.kwargs:
            if gm.get_submodule(user.target).return_indices:
                continue
            with graph.inserting_before(user):
                pooled = graph.call_module(user.target, (src,))
                relu = graph.call_function(F.relu, (pooled,))
            user.replace_all_uses_with(relu)
            graph.erase_node(user)
            graph.erase_node(node)
        elif _global_pool(_module(gm, user, nn.AdaptiveAvgPool2d)) and len(user.args) == 1 and not user.kwargs:
            with graph.inserting_before(user):
                fused = graph.call_function(relu_global_avg_pool, (src,))
            user.replace_all_uses_with(fused)
            graph.erase_node(user)
            graph.erase_node(node)


def _fuse_conv_pool_relu(gm: fx.GraphModule) -> None:
    """conv -> max-pool -> ReLU (after the swap) and conv -> ReLU + global pool become one module each."""
    graph = gm.graph
    n_fused = 0
    for node in list(graph.nodes):   # conv -> max-pool -> ReLU (after the swap above), conv -> ReLU + global pool
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if node.target is F.relu:
            pool_node = node.args[0]
            pool = _module(gm, pool_node, nn.MaxPool2d)
            if pool is None or len(pool_node.users) != 1 or len(pool_node.args) != 1:
                continue
            src, dead = pool_node.args[0], [node, pool_node]
        elif node.target is relu_global_avg_pool:
            pool, src, dead = None, node.args[0], [node]
        else:
            continue
        if not isinstance(src, fx.Node):
            continue
        conv = _module(gm, src, (nn.Conv2d, FoldedConvBN))
        if conv is None or len(src.users) != 1 or src.kwargs or len(src.args) != 1:
            continue
        if isinstance(conv, nn.Conv2d) and conv.padding_mode != "zeros":
            continue
        name = f"_rmc_conv_fused_{n_fused}"
        n_fused += 1
        gm.add_submodule(name, ConvPoolRelu(conv, pool) if pool is not None else ConvReluGap(conv))
        with graph.inserting_after(node):
            fused = graph.call_module(name, src.args)
        node.replace_all_uses_with(fused)
        for d in dead + [src]:
            graph.erase_node(d)


def _channels_last_input(gm: fx.GraphModule) -> None:
    """The input converted to channels-last once, where the graph starts."""
    graph = gm.graph
    for node in graph.nodes:
        if node.op == "placeholder":
            with graph.inserting_after(node):
                cl = graph.call_function(to_channels_last, (node,))
            node.replace_all_uses_with(cl, delete_user_cb=lambda u, cl=cl: u is not cl)
            break


def rewrite(model: nn.Module) -> fx.GraphModule:
    """The rewritten graph (raises if the model cannot be traced)."""
    gm = fx.symbolic_trace(model)
    _fold_conv_bn(gm)
    _swap_relu_pool(gm)
    _fuse_conv_pool_relu(gm)
    _channels_last_input(gm)
    graph = gm.graph
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def fast_forward(model: nn.Module, sample: torch.Tensor | None = None, rtol: float = 1e-4) -> nn.Module:
    """An equivalent, faster module sharing `model`'s parameters; `model` itself when the rewrite does not apply.

    `sample` (a few inputs) checks the rewrite: its outputs must match `model`'s (relative error <= rtol).
    """
    try:
        fast = rewrite(model)
    except Exception as e:   # untraceable Python control flow and the like: the plain model still works
        warnings.warn(f"rmc: fast path unavailable for {type(model).__name__} ({type(e).__name__}: {e}); "
                      "fine-tuning runs the model as it is", stacklevel=2)
        return model
    if sample is not None:
        with torch.no_grad():
            want, got = model(sample), fast(sample)
        err = (want - got).abs().max().item()
        scale = max(want.abs().max().item(), 1.0)
        if not torch.isfinite(got).all() or err > rtol * scale:
            warnings.warn(f"rmc: fast path of {type(model).__name__} differs from the model (max error {err:.3g}); "
                          "fine-tuning runs the model as it is", stacklevel=2)
            return model
    return fast


__all__ = ["ConvPoolRelu", "ConvReluGap", "FoldedConvBN", "fast_forward", "relu_global_avg_pool", "rewrite"]
