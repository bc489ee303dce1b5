"""Feature-denoising blocks (Xie et al. 2019): the operations against direct computations, the block, the models."""

import pytest
import torch

from rmc.defense import RMCConfig, build_rmc
from rmc.errors import RMCError
from rmc.models import build_model, load_checkpoint, save_checkpoint
from rmc.models.denoising import DenoiseBlock, mean_filter, median_filter, nonlocal_means
from rmc.training import TrainConfig, train_model


@pytest.fixture
def fmap():
    return torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))


def test_nonlocal_means_is_a_softmax_weighted_average_over_positions(fmap):
    n, c, h, w = fmap.shape
    want = torch.empty_like(fmap)
    for b in range(n):
        vecs = fmap[b].reshape(c, h * w).T                     # positions x channels
        for i in range(h * w):
            weights = torch.softmax(torch.stack([vecs[i] @ vecs[j] for j in range(h * w)]) / c ** 0.5, 0)
            want[b, :, i // w, i % w] = (weights[:, None] * vecs).sum(0)
    torch.testing.assert_close(nonlocal_means(fmap), want)


def test_mean_and_median_filters_match_a_direct_3x3_computation(fmap):
    n, c, h, w = fmap.shape
    mean, median = torch.empty_like(fmap), torch.empty_like(fmap)
    for i in range(h):
        for j in range(w):
            inside = fmap[:, :, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]       # borders: the valid neighbours
            mean[:, :, i, j] = inside.mean((2, 3))
            rows = [min(max(r, 0), h - 1) for r in (i - 1, i, i + 1)]          # borders: replicated
            cols = [min(max(q, 0), w - 1) for q in (j - 1, j, j + 1)]
            patch = fmap[:, :, rows][:, :, :, cols].reshape(n, c, 9)
            median[:, :, i, j] = patch.median(-1).values
    torch.testing.assert_close(mean_filter(fmap), mean)
    torch.testing.assert_close(median_filter(fmap), median)


@pytest.mark.parametrize("op", ["nonlocal", "mean", "median"])
def test_block_keeps_shape_starts_as_identity_and_passes_gradients(fmap, op):
    block = DenoiseBlock(3, op).train()
    x = fmap.clone().requires_grad_(True)
    torch.testing.assert_close(block(x), fmap)                  # zero-initialised scale: identity at first
    with torch.no_grad():
        block.bn.weight.fill_(1.0)
    out = block(x)
    assert out.shape == fmap.shape and not torch.allclose(out, fmap)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


@pytest.mark.parametrize("arch,shape", [("small_cnn", (1, 28, 28)), ("resnet18", (3, 32, 32))])
def test_denoising_models_build_and_round_trip_through_a_checkpoint(tmp_path, arch, shape):
    torch.manual_seed(0)
    model = build_model(arch, 10, shape[0], denoise="mean").eval()
    blocks = [m for m in model.modules() if isinstance(m, DenoiseBlock)]
    assert len(blocks) == len(type(model).denoise_stages)
    for b in blocks:                                   # make the blocks do something, so the round trip means it
        torch.nn.init.normal_(b.bn.weight)
    x = torch.rand(2, *shape)
    from rmc.models import ModelInfo
    save_checkpoint(model, ModelInfo(arch, 10, shape, denoise="mean"), tmp_path / "m.safetensors")
    loaded, info = load_checkpoint(tmp_path / "m.safetensors")
    assert info.denoise == "mean"
    torch.testing.assert_close(loaded(x), model(x))


def test_unknown_operation_and_user_factories_are_refused():
    with pytest.raises(RMCError, match="unknown denoising operation"):
        build_model("small_cnn", 10, 1, denoise="gaussian")
    with pytest.raises(RMCError, match="train.denoise"):
        TrainConfig(denoise="gaussian").validate()
    with pytest.raises(RMCError, match="built into"):
        build_model("collections:OrderedDict", 10, 1, denoise="mean")


def test_adversarial_training_of_a_denoising_model_is_seeded_and_rmc_adapts_it(digits, tiny_dprime):
    train, test = digits
    cfg = TrainConfig(epochs=1, batch_size=128, adversarial=True, adv_eps=0.1, adv_step_size=0.05, adv_steps=2,
                      denoise="nonlocal", train_subset=512, seed=3).validate()
    a, info = train_model(train, test, cfg, progress=False)
    b, _ = train_model(train, test, cfg, progress=False)
    assert info.denoise == "nonlocal" and info.adversarial
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    blocks = [m for m in a.modules() if isinstance(m, DenoiseBlock)]
    assert any(b.bn.weight.abs().sum() > 0 for b in blocks)    # training moved the blocks off the identity
    dprime, _ = tiny_dprime
    from rmc.defense.knn import NeighbourIndex
    from rmc.models.features import extract_features
    feats = extract_features(a, "block3", dprime.images)
    rmc = build_rmc(a, dprime, NeighbourIndex(feats.numpy()),
                    RMCConfig(k=32, lr=1e-3, max_epochs=1, batch_size=16, calib_k=16, calib_flip=False), "block3")
    before = {k: v.clone() for k, v in rmc.model.state_dict().items()}
    x = test.float_images()[:1]
    res = rmc.step(x, extract_features(a, "block3", x))
    assert 0 <= res.prediction < 10 and res.adapt_epochs == 1
    assert any(not torch.equal(v, rmc.model.state_dict()[k]) for k, v in before.items())   # it fine-tuned
