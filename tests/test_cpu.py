"""Machine-dependent choices: torch threads for a busy or quiet machine, bf16 only where it is native."""

import os
import subprocess
import sys
import time

import pytest

from rmc import cpu
from rmc.cpu import busy_cores, pick_threads
from rmc.defense import RMC, RMCConfig
from rmc.defense.knn import NeighbourIndex
from rmc.errors import RMCError


@pytest.mark.parametrize("cores,load,want", [(2, 0.1, 2), (2, 0.6, 1), (2, 1.7, 1), (2, 9.0, 1), (16, 3.2, 13),
                                             (1, 0.0, 1)])
def test_threads_are_the_cores_not_busy(cores, load, want):
    assert pick_threads(cores, load) == want


def test_a_spinning_process_counts_as_a_busy_core():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert busy_cores(window=0.5) >= 0.7
    finally:
        spin.kill()
        spin.wait()


def test_busy_cores_is_none_where_proc_stat_is_missing_or_unreadable(tmp_path):
    assert busy_cores(0.01, str(tmp_path / "missing")) is None
    (tmp_path / "stat").write_text("intr 1 2 3\n")
    assert busy_cores(0.01, str(tmp_path / "stat")) is None


@pytest.mark.parametrize("average,now,want", [(1.0, 0.1, 2), (1.0, None, 1), (1.0, 1.2, 1), (0.2, 1.9, 2)])
def test_a_job_that_just_ended_does_not_cost_a_thread(monkeypatch, average, now, want):
    """The 1-minute load average still counts a job that ended seconds ago; the cores busy now (when fewer) decide.
    Below half a core the average alone decides (no sampling, no quarter-second wait)."""
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (average, average, average))
    monkeypatch.setattr(cpu, "busy_cores", lambda: now)
    assert pick_threads(cores=2) == want


def test_bf16_is_refused_where_it_would_be_emulated():
    """Under the AVX2 emulation oneDNN has no bf16: the check refuses with one line (a fresh process, since the
    ISA limit is read when oneDNN starts)."""
    code = ("from rmc.defense.optim import check_precision, native_bf16\n"
            "print(native_bf16('cpu'))\n"
            "check_precision('fp32', 'cpu')\n"
            "check_precision('bf16', 'cpu')\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False"
    assert "RMCError: rmc.precision=bf16 needs native bfloat16 arithmetic" in out.stderr


def test_rmc_refuses_bf16_before_adapting_anything(monkeypatch, tiny_trained, tiny_dprime):
    monkeypatch.setattr("rmc.defense.optim.native_bf16", lambda device: False)
    dprime, feats = tiny_dprime
    with pytest.raises(RMCError, match="native bfloat16"):
        RMC(tiny_trained, dprime, NeighbourIndex(feats), RMCConfig(k=16, precision="bf16"), "block3")
    RMC(tiny_trained, dprime, NeighbourIndex(feats), RMCConfig(k=16, precision="fp32"), "block3")   # fp32 is fine
