"""A model cut at its feature layer (rmc.models.split)."""

import torch

from rmc.models import build_model
from rmc.models.split import split_at


def test_split_at_feature_layer():
    model = build_model("small_cnn", 10, 1).eval()
    sp = split_at(model, "block3")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        h = sp.backbone(x)
        torch.testing.assert_close(sp.head(h), model(x))
        assert sp.pooled_input
        torch.testing.assert_close(sp.head(sp.head_input(h.mean((2, 3)))), model(x), rtol=1e-5, atol=1e-6)
    assert not split_at(build_model("small_cnn", 10, 1), "block2").pooled_input
    assert split_at(build_model("resnet18", 10, 3), "layer4.0.conv1") is None   # a skip connection goes around it
