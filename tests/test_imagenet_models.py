"""ImageNet architectures: torchvision's state-dict layout for ResNet-50/101/152, Keras' ResNet152V2, their
feature layers, and Keras .h5 weights read without TensorFlow.

The expected layouts are written here from the two sources' definitions (torchvision/models/resnet.py;
keras/src/applications/resnet.py + resnet_v2.py), and each model's logits are checked against a forward pass
written straight from those definitions with torch.nn.functional on the same weights.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rmc.errors import RMCError
from rmc.models import build_model, default_layer, extract_features, load_checkpoint, save_checkpoint
from rmc.models.checkpoint import ModelInfo
from rmc.models.keras_h5 import read_keras_resnet_v2
from rmc.models.preact_resnet_v2 import PreActResNetV2

h5py = pytest.importorskip("h5py")

TV_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}   # torchvision's resnet50/101/152
# torchvision's published parameter counts and the key counts of their state dicts.
TV_PARAMS = {50: 25_557_032, 101: 44_549_160, 152: 60_192_808}
TV_KEYS = {50: 320, 101: 626, 152: 932}
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
KERAS_BLOCKS = (3, 8, 36, 3)   # ResNet152V2: stack_residual_blocks_v2 x 4


# ---------------------------------------------------------------- torchvision's layout, written from its source

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
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), TV_BLOCKS[depth])):
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
        elif k.endswith("running_mean") or k.endswith(".bias"):
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


@pytest.mark.parametrize("depth", [50, 101, 152])
def test_torchvision_state_dicts_load_as_they_are_and_give_torchvision_logits(depth):
    layout = torchvision_layout(depth, 1000)
    model = build_model(f"resnet{depth}", 1000, 3)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert mine == layout and len(mine) == TV_KEYS[depth]          # names and shapes, no normalisation buffers
    assert sum(p.numel() for p in model.parameters()) == TV_PARAMS[depth]
    assert default_layer(model) == "layer3"

    state = random_state(torchvision_layout(depth, 7), torch.Generator().manual_seed(depth))
    model = build_model(f"resnet{depth}", 7, 3)
    model.load_state_dict(state, strict=True)
    model.eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    logits, feature = reference_v1(state, x, depth)
    with torch.no_grad():
        close(model(x), logits)
    # The default feature layer is the input of the last stage's first block: layer3's output, pooled (1024-d).
    close(extract_features(model, default_layer(model), x), feature)
    assert feature.shape == (1, 1024)


def test_normalisation_is_inside_but_out_of_the_state_dict_and_checkpoints_keep_it(tmp_path):
    model = build_model("resnet50", 5, 3, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)).eval()
    assert not [k for k in model.state_dict() if "normalize" in k]
    assert build_model("resnet50", 5, 3).normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert build_model("resnet152v2", 5, 3).normalize.std.flatten().tolist() == [0.5, 0.5, 0.5]   # Keras 'tf'
    info = ModelInfo("resnet50", 5, (3, 32, 32), mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    save_checkpoint(model, info, tmp_path / "m.safetensors")
    again, _ = load_checkpoint(tmp_path / "m.safetensors")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    # rmc's own small architectures keep their statistics in the state dict, as their checkpoints always had.
    assert "normalize.mean" in build_model("small_cnn", 10, 1).state_dict()


def test_denoising_blocks_need_declared_stages():
    with pytest.raises(RMCError, match="declares no stages"):
        build_model("resnet152v2", 10, 3, denoise="mean")


# ---------------------------------------------------------------- Keras' ResNet152V2, written from its source

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
    for s, (filters, n) in enumerate(zip((64, 128, 256, 512), blocks), start=2):
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
    for s, (n, stride1) in enumerate(zip(blocks, (2, 2, 2, 1)), start=2):
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
            for wname, value in zip(wnames, arrays.values()):
                group.create_dataset(wname, data=value)


def test_keras_resnet152v2_layout_matches_keras_published_counts():
    """Keras' applications table: ResNet152V2 has 60,380,648 parameters (moving statistics included) in 816 weight
    arrays; the model here holds the same numbers in the same shapes."""
    w = keras_weights(KERAS_BLOCKS, 1000, np.random.default_rng(0))
    arrays = [a for layer in w.values() for a in layer.values()]
    assert len(arrays) == 816 and sum(a.size for a in arrays) == 60_380_648
    model = build_model("resnet152v2", 1000, 3)
    state = model.state_dict()
    counted = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert counted == 60_380_648
    assert len([k for k in state if not k.endswith("num_batches_tracked")]) == 816
    assert all(m.eps == 1.001e-5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert default_layer(model) == "layer4.0.preact_bn"


@pytest.mark.parametrize("layout,suffix", [("weights", ":0"), ("model", ":0"), ("chunked", "")])
def test_keras_h5_layouts_map_to_the_v2_model_and_give_kerass_logits_and_feature(tmp_path, layout, suffix):
    blocks = (2, 3, 2, 2)   # a shallow ResNet-v2: the same layer names and rules as ResNet152V2, quick to check
    w = keras_weights(blocks, 6, np.random.default_rng(3))
    write_keras_h5(tmp_path / "w.h5", w, layout, suffix)
    model = PreActResNetV2(blocks, num_classes=6)
    model.load_state_dict(read_keras_resnet_v2(tmp_path / "w.h5"), strict=True)
    model.eval()
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    logits, feature = reference_keras_v2(w, x, blocks)
    with torch.no_grad():
        close(model(x), logits)
    # The default feature layer is Keras' conv5_block1_preact_bn output, pooled: 1024-d.
    close(extract_features(model, default_layer(model), x), feature)
    assert feature.shape == (2, 1024)


def test_keras_pool_pads_with_zeros_not_minus_infinity(tmp_path):
    """The stem's output is not rectified in v2, so the zero padding of Keras' pool1 is visible at the border: a
    torch-style max-pool (padding -inf) gives other logits."""
    blocks = (2, 2, 2, 2)
    w = keras_weights(blocks, 4, np.random.default_rng(5))
    w["conv1_conv"]["bias"] -= 3.0   # a stem output mostly below zero: the border maxima are the padding's zeros
    write_keras_h5(tmp_path / "w.h5", w)
    model = PreActResNetV2(blocks, num_classes=4)
    model.load_state_dict(read_keras_resnet_v2(tmp_path / "w.h5"), strict=True)
    model.eval()
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        keras_like = model(x)
        model.maxpool = torch.nn.MaxPool2d(3, 2, 1)
        torch_like = model(x)
    close(keras_like, reference_keras_v2(w, x, blocks)[0])
    assert (keras_like - torch_like).abs().max() > 1e-3


def test_keras_h5_that_is_not_resnet_v2_is_refused(tmp_path):
    w = keras_weights((2, 2, 2, 2), 4, np.random.default_rng(0))
    w["dense_7"] = {"kernel": np.zeros((3, 3), np.float32)}
    write_keras_h5(tmp_path / "w.h5", w)
    with pytest.raises(RMCError, match="dense_7.*not a layer of ResNet-v2"):
        read_keras_resnet_v2(tmp_path / "w.h5")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(RMCError, match="no Keras `layer_names`"):
        read_keras_resnet_v2(tmp_path / "empty.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(RMCError, match="not a readable HDF5 file"):
        read_keras_resnet_v2(tmp_path / "text.h5")
