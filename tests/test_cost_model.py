"""benchmarks/cost_model.py: the seed's experiment priced from counted FLOPs; its protocol arithmetic by hand."""

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import cost_model  # noqa: E402
import model_cost  # noqa: E402

from rmc.models import build_model  # noqa: E402


def test_rmc_cost_per_input_follows_the_protocol_by_hand():
    s = cost_model.Seed(train_images=10, pgd_copies=(2, 3), eval_inputs=5, eval_sets=2, eval_pgd_steps=(2,), k=40,
                        adapt_epochs=3, calib_epochs=2)
    f = {"forward": 1.0, "train_step": 3.0, "input_gradient": 2.0, "parameters": 7}
    c = cost_model.cost(f, s)
    closest = int(0.2 * 40)                 # 8
    val = math.ceil(0.25 * closest)         # 2 validate; the other 38 of the 40 neighbours train
    calib_val = math.ceil(0.125 * 40)       # 5
    per_input = 3 * (38 * 3 + val * 1) + 2 * (35 * 3 + calib_val * 1) + 1
    assert c["RMC, every input of every set"]["flops"] == 5 * 2 * per_input
    assert c["D' (PGD copies + predictions)"]["flops"] == 10 * ((2 + 3) * 2 + 2 * 1)
    assert c["D' (PGD copies + predictions)"]["bytes"] == 10 * 3 * 3 * 224 ** 2
    assert c["RMC, every input of every set"]["bytes"] == 2 * 3 * 4 * 7


def test_counted_flops_of_a_pgd_step_lie_between_forward_and_training_step():
    model = build_model("small_cnn", 10, 3).eval()
    fwd = model_cost.flops(model, 32, backward=False)
    step = model_cost.flops(model, 32, backward=True)
    grad = model_cost.flops(model, 32, backward=False, to_input=True)
    assert fwd < grad < step
    assert all(p.requires_grad for p in model.parameters())   # the count leaves the model as it found it
    assert step == pytest.approx(3 * fwd, rel=0.1)
