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
    assert got["device"] == "cpu" and "/cpu-" in got["compute_fp32"] and got["compute_auto"] == got["compute_fp32"]
    assert got["online_fp32_s_per_input"] > 0 and got["batched_agreement"] == 1.0


def test_gpu_check_dry_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "gc.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    subprocess.run([sys.executable, str(script), "--dry", "--out", str(out)], check=True, timeout=600,
                   capture_output=True)
    got = json.loads(out.read_text())
    assert got["device"] == "cpu" and got["features_default"] == "fp32/nchw" and got["features_max_rel_diff"] == 0
    assert got["compute_auto"] == got["compute_fp32"] and "/fp32/" in got["compute_auto"]
    assert got["dprime_pgd10_img_per_s"] > 0 and got["batched_agreement"] == 1.0
    assert got["index"]["recall"] > 0.9 and got["index"]["rows"] == 3000


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


# ---------------------------------------------------------------- GPU-ready options, checked on the CPU

def test_feature_arithmetic_defaults_on_for_cuda_off_on_the_cpu(monkeypatch):
    from rmc.artifacts.features import FeatureConfig, arithmetic
    from rmc.defense import optim
    assert arithmetic(FeatureConfig(), torch.device("cpu")) == {"precision": "fp32", "channels_last": False}
    monkeypatch.setattr(optim, "native_bf16", lambda device="cpu": True)      # a GPU with bfloat16, as CUDA reports
    assert optim.resolve_precision("auto", "cuda") == "bf16" and optim.resolve_channels_last(None, "cuda")
    assert optim.resolve_precision("auto", "cpu") == "fp32"                     # the CPU's numerics stay fp32
    assert optim.resolve_precision("fp32", "cuda") == "fp32" and not optim.resolve_channels_last(False, "cuda")
    monkeypatch.setattr(optim, "native_bf16", lambda device="cpu": False)     # an old GPU: auto falls back to fp32
    assert optim.resolve_precision("auto", "cuda") == "fp32"


def test_bf16_autocast_and_channels_last_features_stay_close(tiny_trained, digits):
    from rmc.artifacts.features import feature_batches
    x = digits[1].images[:64]
    ref = torch.cat([f for _, f in feature_batches(tiny_trained, "block3", x, 32)])
    nhwc = torch.cat([f for _, f in feature_batches(tiny_trained, "block3", x, 32,
                                                    how={"precision": "fp32", "channels_last": True})])
    torch.testing.assert_close(nhwc, ref, rtol=1e-5, atol=1e-5)
    assert tiny_trained.block1[0].weight.is_contiguous()                      # the caller's model left as it was
    bf16 = torch.cat([f for _, f in feature_batches(tiny_trained, "block3", x, 32,
                                                    how={"precision": "bf16", "channels_last": True})])
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, ref)         # autocast was on ...
    rel = (bf16 - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < 0.03                                                   # ... and bf16 is close to fp32
    assert (torch.cdist(bf16, ref).argmin(1) == torch.arange(64)).all()       # each input still nearest itself


def test_rmc_precision_auto_is_fp32_on_the_cpu(tiny_trained, tiny_dprime):
    from rmc.defense import RMCConfig, build_rmc
    from rmc.defense.forwards import compute_path
    from rmc.defense.knn import NeighbourIndex
    dprime, feats = tiny_dprime
    index = NeighbourIndex(feats)
    x, f = dprime.gather(np.array([5]))[0], feats[5:6]
    out = {}
    for precision in ("auto", "fp32"):
        cfg = RMCConfig(k=16, max_epochs=1, batch_size=8, calib_k=16, precision=precision, calib_flip=False)
        assert "/fp32/" in compute_path(cfg, "cpu")
        rmc = build_rmc(tiny_trained, dprime, index, cfg, "block3")
        out[precision] = (rmc.step(x, f, key=0).prediction, rmc.state_dict())
    assert out["auto"][0] == out["fp32"][0]
    assert all(torch.equal(out["auto"][1][k], out["fp32"][1][k]) for k in out["fp32"][1])


class _FakeRay:
    """Just enough of Ray for the executor's resource choices: records each task's options."""

    def __init__(self, resources, gpu_ids=()):
        self.resources, self.gpu_ids, self.submitted = resources, list(gpu_ids), []

    def cluster_resources(self):
        return self.resources

    def get_gpu_ids(self):
        return self.gpu_ids

    def remote(self, **opts):
        ray = self

        class Remote:
            def __init__(self, fn, options):
                self.fn, self.opts = fn, options

            def options(self, **more):
                return Remote(self.fn, {**self.opts, **more})

            def remote(self, *args):
                ray.submitted.append(self.opts)
                return object()
        return lambda fn: Remote(fn, opts)


def test_one_ray_worker_per_gpu_for_a_cuda_model(monkeypatch):
    from rmc.scaleout import executors
    fake = _FakeRay({"CPU": 16, "GPU": 2})
    monkeypatch.setattr(executors, "_ray", lambda: fake)
    monkeypatch.setattr(executors, "_REMOTE", None)
    assert executors.gpu_slots("cuda") == 2 and executors.gpu_slots("cpu") == 0 and executors.gpu_slots(None) == 0
    gpu = executors.RayExecutor(16, None, gpus=2)
    assert gpu.slots == 2 and gpu.capacity == 4 and "one GPU each" in gpu.where
    gpu.submit("a", len, [1])
    cpu = executors.RayExecutor(16, None)
    cpu.submit("b", len, [1])
    assert fake.submitted == [{"num_cpus": 1, "max_retries": executors.MAX_RETRIES, "retry_exceptions": False,
                               "num_gpus": 1},
                              {"num_cpus": 1, "max_retries": executors.MAX_RETRIES, "retry_exceptions": False}]
    monkeypatch.setattr(executors, "_WORKER_READY", True)                    # inside a task ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake.gpu_ids = [0]
    assert executors.worker_device() == torch.device("cuda")                 # ... that holds a GPU
    fake.gpu_ids = []
    assert executors.worker_device() is None
    model = build_model("small_cnn", 10, 1)
    assert executors.worker_model(executors.Local(model)) is model           # in-process: as the caller placed it
