"""Reference definitions for the ImageNet architecture tests, written from the sources' own definitions
(torchvision/models/resnet.py; keras/src/applications/resnet.py + resnet_v2.py, keras/src/legacy/saving/
legacy_h5_format.py): the torchvision state-dict layout, Keras' ResNet-v2 weights, forward passes in
torch.nn.functional, and Keras' HDF5 weight layout. Independent of rmc's own model code."""

import numpy as np
import torch
import torch.nn.functional as F

TV_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}   # torchvision's resnet50/101/152
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
KERAS_BLOCKS = (3, 8, 36, 3)   # ResNet152V2: stack_residual_blocks_v2 x 4


def torchvision_layout(depth: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """name -> shape of torchvision's resnet{depth}().state_dict(): conv1 / bn1 stem, Bottleneck blocks (conv1,
    bn1, conv2, bn2, conv3, bn3, and downsample.0 / .1 in each stage's first block), fc."""
    out: dict[str, tuple[int, ...]] = {}

    def bn(name, c):
        out.update({f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
                    f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()})

    out["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), TV_BLOCKS[depth], strict=True)):
        for b in range(n):
            p = f"layer{i + 1}.{b}"
            out[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            out[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            out[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                out[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    out["fc.weight"] = (num_classes, 2048)
    out["fc.bias"] = (num_classes,)
    return out


def random_state(layout: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Weights of the given layout, random but of sane scale (so logits stay finite through 50 blocks) and with
    every batch-norm statistic away from the identity (a swapped mean / var or a missed entry shows)."""
    state = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(0)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=gen) + 0.5
        elif k.endswith(("running_mean", ".bias")):
            state[k] = torch.randn(shape, generator=gen) * 0.1
        elif len(shape) == 1:                                   # batch-norm scale
            state[k] = torch.rand(shape, generator=gen) * 0.4 + 0.2
        else:
            fan_in = int(np.prod(shape[1:]))
            state[k] = torch.randn(shape, generator=gen) * (2 / fan_in) ** 0.5
    return state


def reference_v1(sd, x, depth):
    """torchvision's ResNet forward (v1.5: the 3 x 3 conv strides), from the state dict, with ImageNet statistics.
    Returns (logits, layer3's output pooled)."""
    x = (x - IMAGENET[0]) / IMAGENET[1]

    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for i, n in enumerate(TV_BLOCKS[depth]):
        for b in range(n):
            p, stride = f"layer{i + 1}.{b}", (2 if i > 0 and b == 0 else 1)
            out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
            out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            short = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1") if b == 0 else x
            x = F.relu(out + short)
        if i == 2:
            feature = x.mean((2, 3))
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"]), feature


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


def keras_weights(blocks, classes: int, gen: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """layer -> weight -> array in Keras' layouts (HWIO kernels, in x out dense) for ResNet-v2 with `blocks` per
    stack: conv1_conv (bias), per block preact_bn, 0_conv (first block, bias), 1_conv, 1_bn, 2_conv, 2_bn, 3_conv
    (bias); post_bn; predictions. Random, of sane scale."""
    out: dict[str, dict[str, np.ndarray]] = {}

    def conv(name, k, cin, cout, bias):
        out[name] = {"kernel": gen.normal(0, (2 / (k * k * cin)) ** 0.5, (k, k, cin, cout)).astype(np.float32)}
        if bias:
            out[name]["bias"] = gen.normal(0, 0.1, cout).astype(np.float32)

    def bn(name, c):
        out[name] = {"gamma": gen.uniform(0.2, 0.6, c), "beta": gen.normal(0, 0.1, c),
                     "moving_mean": gen.normal(0, 0.1, c), "moving_variance": gen.uniform(0.5, 1.5, c)}
        out[name] = {k: v.astype(np.float32) for k, v in out[name].items()}

    conv("conv1_conv", 7, 3, 64, True)
    cin = 64
    for s, (filters, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=2):
        for b in range(1, n + 1):
            name = f"conv{s}_block{b}"
            bn(f"{name}_preact_bn", cin)
            if b == 1:
                conv(f"{name}_0_conv", 1, cin, 4 * filters, True)
            conv(f"{name}_1_conv", 1, cin, filters, False)
            bn(f"{name}_1_bn", filters)
            conv(f"{name}_2_conv", 3, filters, filters, False)
            bn(f"{name}_2_bn", filters)
            conv(f"{name}_3_conv", 1, filters, 4 * filters, True)
            cin = 4 * filters
    bn("post_bn", cin)
    # Variances near Keras' epsilon (1.001e-5) before the classifier: another epsilon shows in the logits.
    out["post_bn"]["moving_variance"] = gen.uniform(1e-5, 3e-5, cin).astype(np.float32)
    out["predictions"] = {"kernel": gen.normal(0, cin ** -0.5, (cin, classes)).astype(np.float32),
                          "bias": gen.normal(0, 0.1, classes).astype(np.float32)}
    return out


def reference_keras_v2(w, x, blocks):
    """Keras' ResNet-v2 forward (resnet.py: ResNet(preact=True, use_bias=True), residual_block_v2,
    stack_residual_blocks_v2) on Keras-layout weights, with ResNetV2's 'tf' preprocessing. Returns (logits, the
    output of conv5_block1_preact_bn pooled)."""
    def t(a):
        return torch.from_numpy(np.asarray(a))

    def conv(v, layer, stride=1, pad=0):
        bias = t(w[layer]["bias"]) if "bias" in w[layer] else None
        return F.conv2d(F.pad(v, (pad,) * 4), t(w[layer]["kernel"]).permute(3, 2, 0, 1), bias, stride)

    def bn(v, layer):
        g = w[layer]
        return F.batch_norm(v, t(g["moving_mean"]), t(g["moving_variance"]), t(g["gamma"]), t(g["beta"]),
                            False, 0.0, 1.001e-5)

    x = x * 255 / 127.5 - 1                               # preprocess_input(mode="tf")
    x = conv(x, "conv1_conv", 2, pad=3)                   # conv1_pad + conv1_conv, no BN (preact)
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)        # pool1_pad (zeros) + pool1_pool
    for s, (n, stride1) in enumerate(zip(blocks, (2, 2, 2, 1), strict=True), start=2):
        for b in range(1, n + 1):
            name, stride = f"conv{s}_block{b}", (stride1 if b == n else 1)
            preact_bn = bn(x, f"{name}_preact_bn")
            if name == "conv5_block1":
                feature = preact_bn.mean((2, 3))
            preact = F.relu(preact_bn)
            if b == 1:
                short = conv(preact, f"{name}_0_conv", stride)
            else:
                short = F.max_pool2d(x, 1, stride) if stride > 1 else x
            y = F.relu(bn(conv(preact, f"{name}_1_conv"), f"{name}_1_bn"))
            y = F.relu(bn(conv(y, f"{name}_2_conv", stride, pad=1), f"{name}_2_bn"))
            x = short + conv(y, f"{name}_3_conv")
    x = F.relu(bn(x, "post_bn")).mean((2, 3))
    return x @ t(w["predictions"]["kernel"]) + t(w["predictions"]["bias"]), feature


WEIGHTLESS = ["input_1", "conv1_pad", "pool1_pad", "pool1_pool", "conv2_block1_preact_relu", "conv2_block1_out",
              "post_relu", "avg_pool"]   # a few of the layers Keras lists with no weights


def write_keras_h5(path, weights, layout: str = "weights", suffix: str = ":0") -> None:
    """Keras' legacy HDF5 layout (legacy_h5_format.save_weights_to_hdf5_group): in the root ("weights": what
    save_weights and the published application files hold) or under model_weights ("model": a whole saved model),
    `layer_names` (split in two chunks for "chunked"), a group per layer with `weight_names` and each weight at
    <layer>/<layer>/<weight><suffix> (":0": Keras 2's names, "": Keras 3's)."""
    import h5py
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if layout == "model" else f
        names = np.array([n.encode() for n in WEIGHTLESS[:2] + list(weights) + WEIGHTLESS[2:]])
        if layout == "chunked":
            half = len(names) // 2
            root.attrs["layer_names0"], root.attrs["layer_names1"] = names[:half], names[half:]
        else:
            root.attrs["layer_names"] = names
        root.attrs["backend"], root.attrs["keras_version"] = b"tensorflow", b"2.13.1"
        for layer in sorted(n.decode() for n in names):
            group = root.create_group(layer)
            arrays = weights.get(layer, {})
            wnames = [f"{layer}/{k}{suffix}" for k in arrays]
            group.attrs["weight_names"] = np.array([n.encode() for n in wnames]) if wnames else np.array([])
            for wname, value in zip(wnames, arrays.values(), strict=True):
                group.create_dataset(wname, data=value)
