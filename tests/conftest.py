import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from rmc.data import load_dataset
from rmc.defense.dprime import DPrime
from rmc.models import build_model, extract_features

# Property-based tests (hypothesis) run a fixed, derandomized set of examples: the same cases on every machine and in
# CI, bounded so that tests/test_untrusted_files.py stays under two minutes. HYPOTHESIS_PROFILE=dev explores more.
settings.register_profile("ci", derandomize=True, database=None, max_examples=25, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One thread: the tests' tiny convolutions are dominated by threading overhead, and several test processes
# may share the two cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _cli_keeps_one_thread():
    """The CLI under test keeps the suite's one thread: pick_threads follows the machine's load, and a thread count
    it sets would outlive the test and change the numerics (the compute path) of the tests after it. Session-wide,
    so that module-scoped fixtures that run the CLI (made before any function-scoped patch) keep it too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("rmc.cli.pick_threads", torch.get_num_threads)
        yield


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="session")
def tiny_trained(digits):
    """A small CNN trained for a few hundred steps on sklearn's 8x8 digits (about 1 s)."""
    train, _ = digits
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = train.float_images(), train.labels
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dprime(digits, tiny_trained):
    """D' for the digits: clean copy plus a noisy copy, with its block3 features."""
    train, _ = digits
    gen = torch.Generator().manual_seed(1)
    noisy = (train.images.float() + torch.randint(-20, 21, train.images.shape, generator=gen)).clamp(0, 255).byte()
    images = torch.cat([train.images, noisy])
    dprime = DPrime(images, torch.cat([train.labels, train.labels]),
                torch.cat([torch.zeros(len(train)), torch.ones(len(train))]).long(), ["clean", "noisy"])
    feats = extract_features(tiny_trained, "block3", images).numpy()
    return dprime, feats
