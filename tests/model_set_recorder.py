"""A stand-in for ModelSet that the defense-aware attack tests patch in: it records every model set attacked and
counts its forward calls (the protocols' rounds and iterations are checked by behaviour through it)."""

from rmc.attacks.defense_aware import ModelSet


class Recorder:
    def __init__(self):
        self.sets = []
        recorder = self

        class Recording(ModelSet):
            def __init__(self, module, models):
                super().__init__(module, models)
                self.calls = 0
                recorder.sets.append(self)

            def forward(self, x):
                self.calls += 1
                return super().forward(x)
        self.cls = Recording
