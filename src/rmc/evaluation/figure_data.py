"""What each figure of `rmc report` plots, computed from a run's records (rmc.evaluation.run_records) alone.

Kept apart from the drawing (rmc.evaluation.figures) so that tests can check the data against the records and
the tables without looking at pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from rmc.defense.registry import DEFENSES, STATIC, selectable
from rmc.evaluation.report import cell_from_records, row_label
from rmc.evaluation.run_records import AWARE, CLEAN, RunRecords, SetInfo
from rmc.evaluation.stats import Rate

CURVE_DEFENSES = DEFENSES.names()   # the robustness curve's defenses, in legend order
PURITY_BINS = 5             # equal-width bins of neighbour purity in [0, 1]
ANATOMY_PER_KIND = 2        # inputs shown per (set, RMC right / wrong) in the per-input anatomy
ATTACK_ROW_DEFENSES = (STATIC, *selectable())   # the attack rows' columns (rmc.evaluation.attack_rows.attack_table)
ANATOMY_SETS = 2            # sets shown there: clean and the first attacked set with records


# ---------------------------------------------------------------- robustness curve

@dataclass
class CurvePoint:
    eps: float
    rate: Rate
    set_name: str


@dataclass
class CurveSeries:
    base: str
    defense: str
    family: str                  # attack without eps, e.g. "PGD-10" (rmc.evaluation.run_records.SetInfo.family)
    threat: str                  # "transfer" or "defense-aware": solid or dashed
    targeted: bool
    points: list[CurvePoint] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{row_label(self.base, self.defense)}, {self.family}"


def curve_data(run: RunRecords) -> list[CurveSeries]:
    """Accuracy against eps: one series per (base, attack family, defense); eps 0 is the clean set restricted to
    the family's inputs (attack rows use the first N of them). Sets without a known eps are left out."""
    series: dict[tuple, CurveSeries] = {}
    clean_by_base: dict[str, dict[str, list[dict]]] = {}
    by_set: list[tuple[SetInfo, dict[str, list[dict]]]] = []
    for s in run.sets:
        if not s.folder.is_dir():
            continue
        recs = run.records(s)
        if s.kind == CLEAN:
            clean_by_base[s.base] = recs
        elif s.eps is not None:
            by_set.append((s, recs))
    for s, recs in by_set:
        clean = clean_by_base.get(s.base, {})
        for defense in CURVE_DEFENSES:
            records = recs.get(defense)
            if not records:
                continue
            if s.kind == AWARE and defense != s.defense:
                continue   # another defense on a sequence crafted against this one is no attack on it (as the table)
            if s.attack_row and defense not in ATTACK_ROW_DEFENSES:
                continue   # the attack rows' table shows the static model and the adaptive defenses only
            key = (s.base, s.family, defense)
            cs = series.get(key)
            if cs is None:
                cs = series[key] = CurveSeries(s.base, defense, s.family, AWARE if s.kind == AWARE else "transfer",
                                               s.targeted)
                c = clean.get(defense)
                if c:
                    n = len(records)
                    cs.points.append(CurvePoint(0.0, cell_from_records(c[:n]).accuracy, "clean"))
            cs.points.append(CurvePoint(float(cast(float, s.eps)), cell_from_records(records).accuracy, s.name))
    for cs in series.values():
        cs.points.sort(key=lambda p: p.eps)
    return list(series.values())


# ---------------------------------------------------------------- online drift

@dataclass
class DriftSeries:
    base: str
    set_name: str
    stream: int | None           # the stream's number when the run cut each set into several (--shards)
    indices: list[int]
    correct: list[bool]          # RMC right on each input, in stream order
    drift: list[float | None]    # L2 distance of the weights from the static ones after each input (None: not recorded)

    @property
    def running_accuracy(self) -> list[float]:
        out, hits = [], 0
        for i, c in enumerate(self.correct, 1):
            hits += c
            out.append(hits / i)
        return out

    @property
    def has_drift(self) -> bool:
        return any(d is not None for d in self.drift)


def drift_data(run: RunRecords) -> list[DriftSeries]:
    """One series per RMC record stream (in the order it ran), every set and base model."""
    out = []
    for s in run.sets:
        if not s.folder.is_dir():
            continue
        per_stream: dict[int | None, DriftSeries] = {}
        for r in run.rmc(s):   # streaming: only the three fields kept
            st = r.get("stream")
            ds = per_stream.setdefault(st, DriftSeries(s.base, s.name, st, [], [], []))
            ds.indices.append(r["index"])
            ds.correct.append(r["pred"] == r["label"])
            ds.drift.append(r.get("drift"))
        out += list(per_stream.values())
    return out


# ---------------------------------------------------------------- per-input anatomy

@dataclass
class Anatomy:
    base: str
    set_name: str
    index: int
    label: int
    rmc_pred: int
    rmc_conf: float | None
    static_pred: int | None
    static_conf: float | None
    neighbours: dict             # {"k": K, "clean": {class: count}, "adv": {class: count}}
    adapt_loss: list[float]
    correct: bool


def _pick_sets(run: RunRecords, base: str) -> list[SetInfo]:
    sets = [s for s in run.sets if s.base == base and s.folder.is_dir()]
    clean = [s for s in sets if s.kind == CLEAN]
    attacked = [s for s in sets if s.kind != CLEAN]
    return (clean[:1] + attacked)[:ANATOMY_SETS] if clean else attacked[:ANATOMY_SETS]


def anatomy_data(run: RunRecords, base: str | None = None) -> list[Anatomy]:
    """A few inputs RMC gets right and a few it gets wrong, per shown set, with what the records say about them.
    Only records carrying the report fields (rmc.evaluation.anatomy) qualify; older runs give []."""
    base = base or (run.bases[0] if run.bases else None)
    out: list[Anatomy] = []
    if base is None:
        return out
    for s in _pick_sets(run, base):
        static = {r["index"]: r for r in run.baselines(s).get(STATIC, [])}
        want = {True: ANATOMY_PER_KIND, False: ANATOMY_PER_KIND}
        for r in run.rmc(s):
            ok = r["pred"] == r["label"]
            if "neighbours" not in r or not want[ok]:
                continue
            want[ok] -= 1
            st = static.get(r["index"], {})
            out.append(Anatomy(s.base, s.name, r["index"], r["label"], r["pred"], r.get("conf"), st.get("pred"),
                               st.get("conf"), r["neighbours"], list(r.get("adapt_loss", [])), ok))
            if not any(want.values()):
                break
    return out


# ---------------------------------------------------------------- neighbour purity vs correctness

def purity(record: dict) -> float | None:
    """Share of the input's K neighbours whose label is its true class (None if not recorded)."""
    nb = record.get("neighbours")
    if not nb or not nb.get("k"):
        return None
    y = str(record["label"])
    return (nb.get("clean", {}).get(y, 0) + nb.get("adv", {}).get(y, 0)) / nb["k"]


@dataclass
class PurityGroup:
    base: str
    group: str                   # "clean", "transfer" or "defense-aware" (attacked sets pooled)
    rates: list[Rate]            # RMC's accuracy per bin (PURITY_BINS bins over [0, 1])

    @staticmethod
    def edges() -> list[float]:
        return [i / PURITY_BINS for i in range(PURITY_BINS + 1)]


def purity_bin(p: float) -> int:
    return min(int(p * PURITY_BINS), PURITY_BINS - 1)   # purity 1.0 falls in the last bin


def purity_data(run: RunRecords) -> list[PurityGroup]:
    groups: dict[tuple[str, str], PurityGroup] = {}
    for s in run.sets:
        if not s.folder.is_dir():
            continue
        for r in run.rmc(s):
            p = purity(r)
            if p is None:
                continue
            g = groups.setdefault((s.base, s.kind),
                                  PurityGroup(s.base, s.kind, [Rate(0, 0) for _ in range(PURITY_BINS)]))
            rate = g.rates[purity_bin(p)]
            rate.n += 1
            rate.hits += r["pred"] == r["label"]
    return list(groups.values())


__all__ = [
    "ANATOMY_PER_KIND",
    "PURITY_BINS",
    "Anatomy",
    "CurvePoint",
    "CurveSeries",
    "DriftSeries",
    "PurityGroup",
    "anatomy_data",
    "curve_data",
    "drift_data",
    "purity",
    "purity_bin",
    "purity_data",
]
