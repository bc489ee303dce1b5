"""Device cleanliness without a GPU: PyTorch's meta device runs the arithmetic without values and refuses any CPU
tensor that reaches a meta model, so a path that forgets to move a tensor fails here as it would on a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rmc.attacks.gradient import fgsm, pgd
from rmc.data.augment import random_shift_flip
from rmc.defense import DPrime
from rmc.models import build_model


def _meta_model():
    return build_model("small_cnn", 10, 1).to("meta").eval()


def test_a_meta_model_refuses_cpu_tensors():   # the premise of the tests below
    try:
        _meta_model()(torch.zeros(1, 1, 28, 28))
    except RuntimeError as e:
        assert "meta" in str(e)
    else:
        raise AssertionError("a CPU tensor reached a meta model without an error")


def test_attacks_keep_everything_on_the_inputs_device():
    model, x = _meta_model(), torch.empty(3, 1, 28, 28, device="meta")
    y = torch.tensor([0, 1, 2])                                   # labels left on the CPU, as callers pass them
    gen = torch.Generator().manual_seed(0)
    assert pgd(model, x, y, 0.1, 0.05, 2, generator=gen).device.type == "meta"
    assert pgd(model, x, y, 0.1, 0.05, 2, targets=(y + 1) % 10, generator=gen).device.type == "meta"
    assert fgsm(model, x, y, 0.1).device.type == "meta"


def test_calibration_augmentation_and_dprime_rows_follow_the_device():
    x = torch.empty(4, 1, 28, 28, device="meta")
    assert random_shift_flip(x, torch.Generator().manual_seed(0)).device.type == "meta"
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    dprime = DPrime(images, torch.arange(10), torch.zeros(10, dtype=torch.long))
    xs, ys = dprime.gather(np.array([3, 1, 2]), "meta")
    assert xs.device.type == ys.device.type == "meta" and xs.dtype == torch.float32
    xs, ys = dprime.gather(np.array([3, 1, 2]))                   # the CPU: values, in the order asked
    assert torch.equal(ys, torch.tensor([3, 1, 2])) and torch.equal(xs[0], images[3].float() / 255)


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_as_a_smoke_test(tmp_path):
    out = tmp_path / "gc.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--dprime", "500", "--inputs", "2", "--batch", "2",
                    "--out", str(out)], check=True, timeout=600, capture_output=True)
    got = json.loads(out.read_text())
    assert got["device"] == "cpu" and "/cpu-" in got["compute"] and "/fp32/" in got["compute"]
    assert got["online_s_per_input"] > 0 and got["batched_agreement"] == 1.0
