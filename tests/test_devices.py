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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", [
    ["train", "--dataset", "digits", "--out", "{tmp}/m.safetensors"],
    ["attack", "--model", "{tmp}/m.safetensors", "--out", "{tmp}/sets"],
    ["augment", "--model", "{tmp}/m.safetensors", "--out", "{tmp}/dprime"],
    ["features", "--model", "{tmp}/m.safetensors", "--store", "{tmp}/dprime", "--out", "{tmp}/f"],
    ["evaluate", "--model", "{tmp}/m.safetensors", "--store", "{tmp}/dprime", "--evalsets", "{tmp}/sets",
     "--out", "{tmp}/results"],
    ["visualize", "--model", "{tmp}/m.safetensors", "--store", "{tmp}/dprime", "--features", "{tmp}/f.npy",
     "--evalsets", "{tmp}/sets"],
    ["run", "--out", "{tmp}/run"],
])
def test_every_computing_command_takes_the_device_and_refuses_a_missing_gpu_first(command, tmp_path, capsys):
    """--device on each command, checked before any file is read or written (none of the files above exist)."""
    from rmc.cli import main as cli
    assert cli([a.format(tmp=tmp_path) for a in command] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not available here" in err
    assert not list(tmp_path.iterdir())


def test_ray_with_a_gpu_device_is_refused():
    from rmc.cli.commands import check_ray_device
    from rmc.errors import RMCError
    with pytest.raises(RMCError, match="--ray runs RMC on CPU workers"):
        check_ray_device("local", "cuda:0")
    check_ray_device(None, "cuda")
    check_ray_device("local", "cpu")


def test_a_model_trained_on_one_device_serves_a_run_on_another():
    """The model stage is named by its training settings with the device left out, so `rmc run --device cuda`
    reuses models a CPU run trained (and keeps the names of runs made before)."""
    from rmc.cli.pipeline import stage_key, training_settings
    from rmc.training import TrainConfig
    on_cpu, on_gpu = TrainConfig(), TrainConfig(device="cuda")
    assert stage_key(training_settings(on_cpu)) == stage_key(training_settings(on_gpu))
    assert stage_key(training_settings(on_cpu)) != stage_key(training_settings(TrainConfig(epochs=on_cpu.epochs + 1)))
