"""The original's quirks as named settings beside their corrected variants: the feature layer at the input of the
last stage, the evaluation PGD's fixed step, the D' attack's loss on the softmax output / unclipped iterates /
random shifts, Keras' Adam epsilon; which preset uses which."""

import pytest
import torch

from rmc.artifacts.dprime import AugmentConfig, chunk_tasks, run_chunk
from rmc.attacks.gradient import LOSSES, cross_entropy, pgd, softmax_output_cross_entropy
from rmc.cli.config import load_config
from rmc.errors import RMCError
from rmc.models import build_model, default_layer, extract_features


@pytest.mark.parametrize("arch, channels, size, last_stage", [("small_cnn", 1, 28, "block3"),
                                                               ("resnet18", 3, 32, "layer4")])
def test_default_feature_layer_is_the_input_of_the_last_stage(arch, channels, size, last_stage):
    torch.manual_seed(0)
    model = build_model(arch, 10, channels).eval()
    seen = {}

    def record(_module, inputs):
        seen["x"] = inputs[0].mean(dim=(2, 3))   # returns None: the input is left as it is
    handle = dict(model.named_modules())[last_stage].register_forward_pre_hook(record)
    x = torch.rand(3, channels, size, size)
    feats = extract_features(model, default_layer(model), x)
    handle.remove()
    torch.testing.assert_close(feats, seen["x"])


def test_softmax_output_loss_vanishes_on_confident_examples():
    logits = torch.tensor([[12.0, 0.0, 0.0], [0.5, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    (g_sm,) = torch.autograd.grad(softmax_output_cross_entropy(logits, y).sum(), logits)
    (g_ce,) = torch.autograd.grad(cross_entropy(logits, y).sum(), logits)
    # On logits the confident row still has a gradient of order e^-12; through the double softmax the gradient of
    # both rows shrinks, the confident one to almost nothing (the softmax saturates).
    assert g_sm[0].abs().max() < 1e-4 < g_sm[1].abs().max()
    assert g_sm[1].abs().max() < g_ce[1].abs().max()
    assert set(LOSSES) == {"logits", "softmax_output"}


def test_pgd_without_clip_may_leave_the_unit_range_but_not_the_ball():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval()
    x = torch.zeros(4, 1, 8, 8)   # black images: any step down leaves [0, 1] unless clipped
    y = torch.zeros(4, dtype=torch.long)
    gen = lambda: torch.Generator().manual_seed(0)   # noqa: E731
    clipped = pgd(model, x, y, 0.1, 0.05, 3, generator=gen())
    free = pgd(model, x, y, 0.1, 0.05, 3, generator=gen(), clip=False)
    assert clipped.min() >= 0 and free.min() < 0
    assert (free - x).abs().max() <= 0.1 + 1e-6


def test_dprime_crop_shift_stores_the_shifted_image_within_eps(digits):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval()
    train = digits[0]
    cfg = AugmentConfig(steps=(2,), eps=0.1, step_size=0.02, chunk_size=32, batch_size=32, crop_shift=2)
    task = [t for t in chunk_tasks(32, cfg) if t.copy == 1][0]
    images, labels = train.images[:32], train.labels[:32]
    shifted = run_chunk(model, task, images, labels, cfg)
    plain = run_chunk(model, task, images, labels, AugmentConfig(**{**cfg.__dict__, "crop_shift": 0}))
    r = int(0.1 * 255)
    assert (plain.int() - images.int()).abs().max() <= r
    assert (shifted.int() - images.int()).abs().max() > r          # not a perturbation of the unshifted image
    # ... but of a shift of it: some shift by <= 2 pixels lies within eps of every stored image.
    pad = torch.nn.functional.pad(images.int(), (2, 2, 2, 2))
    for i in range(len(images)):
        assert min((shifted[i].int() - pad[i, :, dy:dy + 8, dx:dx + 8]).abs().max()
                   for dy in range(5) for dx in range(5)) <= r
    with pytest.raises(RMCError, match="augment.loss"):
        AugmentConfig(loss="probabilities").validate()


def test_rmc_adam_epsilon_reaches_the_stream_optimizer(tiny_trained, tiny_dprime):
    from rmc.defense import RMCConfig, build_rmc
    from rmc.defense.knn import NeighbourIndex
    dprime, feats = tiny_dprime
    r = build_rmc(tiny_trained, dprime, NeighbourIndex(feats), RMCConfig(k=16, adam_eps=1e-7), "block3")
    assert {g["eps"] for g in r.optimizer.param_groups} == {1e-7}


def test_paper_preset_follows_the_originals_quirks_and_default_the_corrected_variants():
    paper, default = load_config(preset="paper"), load_config()
    assert paper.attack.pgd_step_size == pytest.approx(0.1 / 16)
    assert (paper.augment.loss, paper.augment.clip, paper.augment.crop_shift) == ("softmax_output", False, 2)
    assert paper.rmc.adam_eps == 1e-7
    assert default.attack.pgd_step_size is None   # Madry et al.'s 2.5 eps / steps
    assert (default.augment.loss, default.augment.clip, default.augment.crop_shift) == ("logits", True, 0)
    assert default.rmc.adam_eps == 1e-8
