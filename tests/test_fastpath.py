"""The fast path (rmc.defense.fastpath) computes what the model computes: same outputs, same gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmc.defense.fastpath import FoldedConvBN, fast_forward
from rmc.defense.scope import configure_model
from rmc.models import build_model


def _grads(model, fwd, x, y, scope):
    m = configure_model(model, scope, "block3" if hasattr(model, "block3") else "layer4")
    for p in m.parameters():
        p.grad = None
    F.cross_entropy(fwd(x), y).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,shape", [("small_cnn", (6, 1, 28, 28)), ("resnet18", (2, 3, 16, 16))])
@pytest.mark.parametrize("scope", ["all", "bn", "head"])
def test_fast_forward_same_outputs_and_gradients(arch, shape, scope):
    torch.manual_seed(0)
    model = build_model(arch, 10, shape[1])
    with torch.no_grad():                       # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    x, y = torch.rand(*shape), torch.randint(0, 10, (shape[0],))
    fast = fast_forward(model, x)
    assert fast is not model and any(isinstance(m, FoldedConvBN) for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    want = _grads(model, model, x, y, scope)
    got = _grads(model, fast, x, y, scope)
    assert want.keys() == got.keys() and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=2e-3, atol=1e-5, msg=n)


def test_fast_forward_shares_parameters_and_falls_back():
    model = build_model("small_cnn", 10, 1).eval()
    fast = fast_forward(model, torch.rand(2, 1, 28, 28))
    with torch.no_grad():
        model.fc.bias.add_(1.0)                 # a change of the model shows in the fast path at once
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:                     # data-dependent control flow: torch.fx cannot trace it
                return self.fc(x)
            return -self.fc(x)
    m = Untraceable()
    with pytest.warns(UserWarning, match="fast path unavailable"):
        assert fast_forward(m, torch.rand(2, 4)) is m
