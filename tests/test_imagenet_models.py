"""ImageNet architectures: torchvision's state-dict layout for ResNet-50/101/152, Keras' ResNet152V2, their
feature layers, and Keras .h5 weights read without TensorFlow.

The expected layouts are written from the two sources' definitions (tests/reference_nets.py), and each model's
logits are checked against a forward pass written straight from those definitions with torch.nn.functional on the
same weights.
"""

import numpy as np
import pytest
import torch
from reference_nets import (
    KERAS_BLOCKS,
    close,
    keras_weights,
    random_state,
    reference_keras_v2,
    reference_v1,
    torchvision_layout,
    write_keras_h5,
)

from rmc.errors import RMCError
from rmc.models import build_model, default_layer, extract_features, load_checkpoint, save_checkpoint
from rmc.models.checkpoint import ModelInfo
from rmc.models.keras_h5 import read_keras_resnet_v2
from rmc.models.preact_resnet_v2 import PreActResNetV2

h5py = pytest.importorskip("h5py")

# torchvision's published parameter counts and the key counts of their state dicts.
TV_PARAMS = {50: 25_557_032, 101: 44_549_160, 152: 60_192_808}
TV_KEYS = {50: 320, 101: 626, 152: 932}


# ---------------------------------------------------------------- torchvision's ResNets

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


# ---------------------------------------------------------------- Keras' ResNet152V2

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
