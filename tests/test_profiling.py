"""The phase timer (rmc.defense.profiling) accounts for RMC's per-input time through the hook."""

from rmc.defense import build_rmc
from rmc.defense.config import RMCConfig
from rmc.defense.knn import NeighbourIndex
from rmc.defense.profiling import PhaseTimer
from rmc.models import extract_features


def test_timer_sees_every_phase_of_every_input(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:3]
    q = extract_features(tiny_trained, "block3", x).numpy()
    r = build_rmc(tiny_trained, dprime, NeighbourIndex(feats), RMCConfig(k=64, lr=1e-3, max_epochs=2, patience=1,
                                                                        batch_size=32, calib_k=32), "block3")
    r.profile = timer = PhaseTimer()
    for i in range(len(x)):
        r.step(x[i:i + 1], q[i:i + 1])
    assert timer.steps == len(x) and 0 < timer.passes() < timer.total()
    assert set(timer.seconds) >= {"search", "gather", "data", "forward", "backward", "optimizer", "validation",
                                  "predict", "other"}
    assert list(timer.summary().values()) == sorted(timer.seconds.values(), reverse=True)
