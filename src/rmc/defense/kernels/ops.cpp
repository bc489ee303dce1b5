// The fast path's CPU kernels as PyTorch operators (namespace `rmc`), built by torch.utils.cpp_extension on first use.
//
// conv_pool_relu.h holds the loops; it is compiled here once per instruction set, as ATen compiles its own CPU
// kernels: a baseline copy, an AVX2 + FMA copy and an AVX-512 copy (GCC's target pragma, no -march=native), and
// every call takes the copy for ATen's CPU capability (`torch.backends.cpu.get_cpu_capability()`, which honours
// ATEN_CPU_CAPABILITY). So a result depends on that capability alone, which rmc records with it, and one library
// serves every x86 CPU. Schemas are defined here; the fake (shape-only) and autograd implementations are registered
// from Python (rmc.defense.kernels), so torch.compile, torch.func and opcheck see ordinary operators.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RMC_X86 1
#endif

#define restrict __restrict__

// VW: floats per vector, the width of the copy's registers (wider vectors would be lowered to scalar code).
#define VW 4
namespace rmc_default {
#include "conv_pool_relu.h"
}
#undef VW

#ifdef RMC_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define VW 8
#define RMC_AVX2 1
namespace rmc_avx2 {
#include "conv_pool_relu.h"
}
#undef RMC_AVX2
#undef VW
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define VW 16
#define RMC_AVX512 1
namespace rmc_avx512 {
#include "conv_pool_relu.h"
}
#undef RMC_AVX512
#undef VW
#pragma GCC pop_options
#endif

namespace {

// 0 baseline, 1 AVX2, 2 AVX-512: ATen's capability unless `rmc::set_isa` chose another (tests compare the copies).
int64_t isa_level = -1;

int64_t aten_level() {
#ifdef RMC_X86
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return 2;
    if (cap == "AVX2") return 1;
#endif
    return 0;
}

int64_t level() {
    if (isa_level < 0) isa_level = aten_level();
    return isa_level;
}

// The copy of `fn` for the current level.
#ifdef RMC_X86
#define DISPATCH(fn, ...)                                                                  \
    (level() == 2 ? rmc_avx512::fn(__VA_ARGS__)                                           \
                  : level() == 1 ? rmc_avx2::fn(__VA_ARGS__) : rmc_default::fn(__VA_ARGS__))
#else
#define DISPATCH(fn, ...) rmc_default::fn(__VA_ARGS__)
#endif

void checked(int rc, const char *op) {
    TORCH_CHECK(rc == 0, "rmc::", op, ": the kernel refused its arguments (shapes out of its range)");
}

void check_float_cpu(const at::Tensor &t, const char *what) {
    TORCH_CHECK(t.device().is_cpu(), "rmc kernels: ", what, " must be on the CPU, got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "rmc kernels: ", what, " must be float32, got ", t.scalar_type());
}

void check_channels(int64_t c) {
    TORCH_CHECK(c % 16 == 0, "rmc kernels: channels must be a multiple of 16, got ", c);
}

// Channels-last (N x H x W x C in memory) maps as N x C x H x W tensors.
at::Tensor nhwc(const at::Tensor &like, int64_t n, int64_t c, int64_t h, int64_t w, at::ScalarType dtype) {
    return at::empty({n, c, h, w}, like.options().dtype(dtype).memory_format(at::MemoryFormat::ChannelsLast));
}

const float *ptr_or_null(const c10::optional<at::Tensor> &t) {
    return t.has_value() ? t->data_ptr<float>() : nullptr;
}

c10::optional<at::Tensor> contiguous_bias(const c10::optional<at::Tensor> &bias, int64_t c) {
    if (!bias.has_value()) return bias;
    check_float_cpu(*bias, "bias");
    TORCH_CHECK(bias->numel() == c, "rmc kernels: bias has ", bias->numel(), " values for ", c, " channels");
    return bias->contiguous();
}

// relu(max_pool2d(conv2d(x, weight, bias, stride 1, padding), 2)): y (N x CO x HO x WO, channels-last) and idx
// (uint8, N x HO x WO x CO: the window position of the maximum, 255 where ReLU zeroed it).
std::tuple<at::Tensor, at::Tensor> conv_pool_relu(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &bias,
                                                  at::IntArrayRef padding) {
    check_float_cpu(x, "x");
    check_float_cpu(weight, "weight");
    check_float_cpu(bias, "bias");
    TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(1) == x.size(1) && padding.size() == 2,
                "rmc::conv_pool_relu: x N x C x H x W, weight CO x C x KH x KW and two paddings expected");
    const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
    const int64_t co = weight.size(0), kh = weight.size(2), kw = weight.size(3);
    check_channels(co);
    TORCH_CHECK(bias.numel() == co, "rmc::conv_pool_relu: bias has ", bias.numel(), " values for ", co, " channels");
    const int64_t ho = (h + 2 * padding[0] - kh + 1) / 2, wo = (w + 2 * padding[1] - kw + 1) / 2;
    const at::Tensor xc = x.contiguous(), wt = weight.reshape({co, -1}).t().contiguous(), b = bias.contiguous();
    at::Tensor y = nhwc(x, n, co, ho, wo, at::kFloat), idx = nhwc(x, n, co, ho, wo, at::kByte);
    checked(DISPATCH(stem_forward, xc.data_ptr<float>(), wt.data_ptr<float>(), b.data_ptr<float>(),
                     y.data_ptr<float>(), idx.data_ptr<uint8_t>(), n, c, h, w, kh, kw, padding[0], padding[1], co),
            "conv_pool_relu");
    return {y, idx};
}

// The gradients of conv_pool_relu's weight and bias given the gradient of y.
std::tuple<at::Tensor, at::Tensor> conv_pool_relu_backward(const at::Tensor &x, const at::Tensor &grad,
                                                           const at::Tensor &idx, at::IntArrayRef weight_shape,
                                                           at::IntArrayRef padding) {
    check_float_cpu(x, "x");
    check_float_cpu(grad, "grad");
    const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
    const int64_t co = weight_shape[0], kh = weight_shape[2], kw = weight_shape[3];
    const at::Tensor xc = x.contiguous(), g = grad.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor ic = idx.contiguous(at::MemoryFormat::ChannelsLast);
    TORCH_CHECK(g.sizes() == ic.sizes() && g.size(1) == co, "rmc::conv_pool_relu_backward: grad and idx differ");
    at::Tensor gwt = at::empty({c * kh * kw, co}, x.options()), gb = at::empty({co}, x.options());
    checked(DISPATCH(stem_backward, xc.data_ptr<float>(), g.data_ptr<float>(), ic.data_ptr<uint8_t>(),
                     gwt.data_ptr<float>(), gb.data_ptr<float>(), n, c, h, w, kh, kw, padding[0], padding[1], co),
            "conv_pool_relu_backward");
    return {gwt.t().contiguous().reshape(weight_shape), gb};
}

// relu(max_pool2d(h, 2) + bias) of a map (N x C x H x W, laid out channels-last): y and idx as conv_pool_relu's.
std::tuple<at::Tensor, at::Tensor> pool_relu(const at::Tensor &h, const c10::optional<at::Tensor> &bias) {
    check_float_cpu(h, "h");
    TORCH_CHECK(h.dim() == 4, "rmc::pool_relu: h must be N x C x H x W");
    const int64_t n = h.size(0), c = h.size(1), hh = h.size(2), ww = h.size(3);
    check_channels(c);
    const at::Tensor hc = h.contiguous(at::MemoryFormat::ChannelsLast);
    const auto b = contiguous_bias(bias, c);
    at::Tensor y = nhwc(h, n, c, hh / 2, ww / 2, at::kFloat), idx = nhwc(h, n, c, hh / 2, ww / 2, at::kByte);
    checked(DISPATCH(pool_relu_forward, hc.data_ptr<float>(), ptr_or_null(b), y.data_ptr<float>(),
                     idx.data_ptr<uint8_t>(), n, hh, ww, c),
            "pool_relu");
    return {y, idx};
}

// The gradients of pool_relu's h (h_shape, channels-last; zeros where pooling did not look) and of its bias.
std::tuple<at::Tensor, at::Tensor> pool_relu_backward(const at::Tensor &grad, const at::Tensor &idx,
                                                      at::IntArrayRef h_shape) {
    check_float_cpu(grad, "grad");
    const int64_t n = h_shape[0], c = h_shape[1], hh = h_shape[2], ww = h_shape[3];
    TORCH_CHECK(c <= 4096, "rmc::pool_relu_backward: at most 4096 channels, got ", c);
    const at::Tensor g = grad.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor ic = idx.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor gh = nhwc(grad, n, c, hh, ww, at::kFloat), gb = at::empty({c}, grad.options());
    checked(DISPATCH(pool_relu_backward, g.data_ptr<float>(), ic.data_ptr<uint8_t>(), gh.data_ptr<float>(),
                     gb.data_ptr<float>(), n, hh, ww, c),
            "pool_relu_backward");
    return {gh, gb};
}

// mean over H x W of relu(h + bias) (N x C x 1 x 1); mask (uint8, N x HW x C) where ReLU passed, count (N x C) how
// often.
std::tuple<at::Tensor, at::Tensor, at::Tensor> relu_gap(const at::Tensor &h, const c10::optional<at::Tensor> &bias) {
    check_float_cpu(h, "h");
    TORCH_CHECK(h.dim() == 4, "rmc::relu_gap: h must be N x C x H x W");
    const int64_t n = h.size(0), c = h.size(1), hw = h.size(2) * h.size(3);
    check_channels(c);
    const at::Tensor hc = h.contiguous(at::MemoryFormat::ChannelsLast);
    const auto b = contiguous_bias(bias, c);
    at::Tensor y = at::empty({n, c, 1, 1}, h.options()), count = at::empty({n, c}, h.options());
    at::Tensor mask = at::empty({n, hw, c}, h.options().dtype(at::kByte));
    checked(DISPATCH(relu_gap_forward, hc.data_ptr<float>(), ptr_or_null(b), y.data_ptr<float>(),
                     mask.data_ptr<uint8_t>(), count.data_ptr<float>(), n, hw, c),
            "relu_gap");
    return {y, mask, count};
}

// The gradients of relu_gap's h (h_shape, channels-last) and of its bias.
std::tuple<at::Tensor, at::Tensor> relu_gap_backward(const at::Tensor &grad, const at::Tensor &mask,
                                                     const at::Tensor &count, at::IntArrayRef h_shape) {
    check_float_cpu(grad, "grad");
    const int64_t n = h_shape[0], c = h_shape[1], hh = h_shape[2], ww = h_shape[3];
    const at::Tensor g = grad.reshape({n, c}).contiguous(), m = mask.contiguous(), k = count.contiguous();
    at::Tensor gh = nhwc(grad, n, c, hh, ww, at::kFloat), gb = at::empty({c}, grad.options());
    checked(DISPATCH(relu_gap_backward, g.data_ptr<float>(), m.data_ptr<uint8_t>(), k.data_ptr<float>(),
                     gh.data_ptr<float>(), gb.data_ptr<float>(), n, hh * ww, c),
            "relu_gap_backward");
    return {gh, gb};
}

// Chooses the copy of the loops (0 baseline, 1 AVX2, 2 AVX-512, -1 ATen's capability) and returns the one now in
// use; a level the CPU or this build lacks is refused.
int64_t set_isa(int64_t wanted) {
    if (wanted == -1) wanted = aten_level();
    TORCH_CHECK(wanted >= 0 && wanted <= aten_level(), "rmc::set_isa: level ", wanted,
                " is above what this CPU and ATen allow (", aten_level(), ")");
    isa_level = wanted;
    return isa_level;
}

int64_t isa() { return level(); }

}  // namespace

TORCH_LIBRARY(rmc, m) {
    m.def("conv_pool_relu(Tensor x, Tensor weight, Tensor bias, int[2] padding) -> (Tensor, Tensor)");
    m.def("conv_pool_relu_backward(Tensor x, Tensor grad, Tensor idx, int[] weight_shape, int[2] padding)"
          " -> (Tensor, Tensor)");
    m.def("pool_relu(Tensor h, Tensor? bias) -> (Tensor, Tensor)");
    m.def("pool_relu_backward(Tensor grad, Tensor idx, int[] h_shape) -> (Tensor, Tensor)");
    m.def("relu_gap(Tensor h, Tensor? bias) -> (Tensor, Tensor, Tensor)");
    m.def("relu_gap_backward(Tensor grad, Tensor mask, Tensor count, int[] h_shape) -> (Tensor, Tensor)");
    m.def("set_isa(int level) -> int", &set_isa);
    m.def("isa() -> int", &isa);
}

TORCH_LIBRARY_IMPL(rmc, CPU, m) {
    m.impl("conv_pool_relu", &conv_pool_relu);
    m.impl("conv_pool_relu_backward", &conv_pool_relu_backward);
    m.impl("pool_relu", &pool_relu);
    m.impl("pool_relu_backward", &pool_relu_backward);
    m.impl("relu_gap", &relu_gap);
    m.impl("relu_gap_backward", &relu_gap_backward);
}
