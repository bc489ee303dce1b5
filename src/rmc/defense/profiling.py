"""Where RMC's per-input time goes: a phase timer that `RMC` and `fine_tune` call as their optional hook.

    rmc.profile = timer = PhaseTimer()
    rmc.step(...); timer.summary()   # {"forward": s, "backward": s, ...}

The hook is called with a phase name at the end of each piece of work: the time since the previous call is that
phase's. `None` (at the start of each input) restarts the clock and counts one input. Phases: search, gather (D'
rows to tensors), state (reset / weight copies), data (batch indexing, augmentation; with scope 'head' also the
frozen backbone), forward, backward, optimizer, validation, predict, other. `forward`, `backward`, `validation`
and `predict` are the network's passes; everything else is overhead.
"""

from __future__ import annotations

import time
from collections import defaultdict


class PhaseTimer:
    """Wall-clock seconds per phase, accumulated over inputs."""
    PASSES = ("forward", "backward", "validation", "predict")

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._last = time.perf_counter()

    def __call__(self, phase: str | None) -> None:
        now = time.perf_counter()
        if phase is None:
            self.steps += 1
        else:
            self.seconds[phase] += now - self._last
        self._last = now

    def passes(self) -> float:
        return sum(self.seconds.get(p, 0.0) for p in self.PASSES)

    def total(self) -> float:
        return sum(self.seconds.values())

    def summary(self) -> dict[str, float]:
        return dict(sorted(self.seconds.items(), key=lambda kv: -kv[1]))
