"""The attack rows of the report: transfer PGD, transfer AutoAttack, FPA, GMSA-AVG, GMSA-MIN, and the worst
case per input, for one base model (standard or adversarially trained), static and with RMC.

- Transfer rows are crafted against the static model and fed to RMC (the original paper's setting).
- Defense-aware rows attack RMC as it runs (rmc.attacks.defense_aware): per input, rounds of PGD against the models
  RMC adapts into. The attack writes one record per input as it goes (`attack.jsonl` + the online state and the
  chosen images so far), so an interrupted run resumes from the last finished input. The chosen sequence is
  then re-scored by a fresh RMC run (rmc.evaluation.driver.evaluate_set), and that is what the table shows.

Layout under the results directory:
    <base>/attack-sets/            the crafted inputs (evaluation-set format: reusable by `rmc evaluate`)
    <base>/<row set name>/         per-example records of each row (baselines.json, rmc.jsonl, attack.jsonl)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from rmc.artifacts.evalsets import EvalSet, list_eval_sets, load_eval_sets, save_eval_sets
from rmc.artifacts.features import evalset_source
from rmc.attacks.defense_aware import LABELS, AttackRowsConfig, attack_input, initial_candidates
from rmc.defense import build_rmc
from rmc.defense.config import Mode, RMCConfig
from rmc.defense.dprime import DPrime
from rmc.errors import RMCError
from rmc.evaluation.common import BaseModel, NeighbourSearch, digest
from rmc.evaluation.driver import evaluate_set
from rmc.evaluation.records import RecordStream
from rmc.evaluation.report import Table, cell_from_records, row_label

TRANSFER, AWARE, WORST = "transfer", "defense-aware", "worst case"


@dataclass
class AttackRow:
    name: str                                   # evaluation-set name (its folder under results/<base>/)
    label: str                                  # row label in the table (same for every base model)
    kind: str                                   # "transfer", "defense-aware" or "worst case"
    records: dict[str, list[dict]]              # "undefended" / "rmc" -> per-example records
    info: dict = field(default_factory=dict)    # settings, agreement of the re-score with the attack, seconds


def _num(x: float) -> str:
    return f"{x:.6g}"


def _pgd_text(acfg: AttackRowsConfig) -> str:
    step = "" if acfg.step_size is None else f", step {_num(acfg.step_size)}"
    return f"PGD-{acfg.steps}, eps {_num(acfg.eps)}{step}"


def set_names(acfg: AttackRowsConfig) -> dict[str, str]:
    """Row key -> evaluation-set name. Names carry the settings, so other settings never reuse old results."""
    suffix = f"pgd{acfg.steps}-eps{_num(acfg.eps)}" + ("" if acfg.step_size is None else f"-step{_num(acfg.step_size)}")
    names = {"transfer-pgd": f"transfer-{suffix}"}
    if acfg.autoattack:
        names["transfer-autoattack"] = f"transfer-autoattack-eps{_num(acfg.eps)}"
    for kind in acfg.attacks:
        names[kind] = f"{kind}-r{acfg.rounds}-{acfg.loss}-{suffix}" + ("" if acfg.seed_known else "-hiddenseed")
    return names


def row_labels(acfg: AttackRowsConfig, n: int) -> dict[str, str]:
    labels = {"transfer-pgd": f"transfer {_pgd_text(acfg)}",
              "transfer-autoattack": f"transfer AutoAttack (standard, eps {_num(acfg.eps)})"}
    for kind in acfg.attacks:
        hidden = "" if acfg.seed_known else ", RMC's seed hidden"
        labels[kind] = f"{LABELS[kind]} ({acfg.rounds} rounds of {_pgd_text(acfg)}, {acfg.loss} loss{hidden}, N={n})"
    return labels


def clean_set(sets: Sequence[EvalSet]) -> EvalSet:
    """The clean evaluation set among `sets` (the attack rows start from its inputs)."""
    for s in sets:
        if s.attack.get("kind") == "clean":
            return s
    raise RMCError("the attack rows start from the clean test inputs, but no clean evaluation set was given; "
                   "include the 'clean' set (in --sets), or skip the attack rows with --no-attack-rows")


def _attack_meta(clean: EvalSet, base: BaseModel, n: int, **attack) -> dict:
    origin = {k: clean.attack.get(k) for k in ("dataset", "seed")}
    return {**attack, **origin, "targeted": False, "source_model_sha256": base.sha256, "n": n}


def _cached_set(folder: Path, name: str, base: BaseModel, meta: dict) -> EvalSet | None:
    """The saved set `name` if it was made with exactly `meta` against this model."""
    if not (folder / "index.json").exists() or name not in list_eval_sets(folder):
        return None
    s = load_eval_sets(folder, [name], model_sha256=base.sha256)[0]
    same = {k: s.attack.get(k) for k in meta} == meta
    if not same:
        raise RMCError(f"{folder} holds a set {name!r} made with other settings; delete it or use a new --out")
    return s


def _run_defense_aware(kind: str, set_name: str, base: BaseModel, dprime: DPrime, search: NeighbourSearch,
                       x: torch.Tensor, y: torch.Tensor, initial: torch.Tensor, cfg: RMCConfig,
                       acfg: AttackRowsConfig, folder: Path, source: str,
                       progress: bool) -> tuple[torch.Tensor, list[dict]]:
    """Attack the stream `x` against a fresh online/episodic RMC, resumably. Returns (chosen images, records)."""
    n = len(x)
    settings = {k: v for k, v in asdict(acfg).items() if k not in ("attacks", "autoattack", "transfer_pgd", "n")}
    fp = digest(base.sha256, base.layer, asdict(cfg), settings, kind, source, n, len(dprime))
    rmc = build_rmc(base.model, dprime, search.all, cfg, base.layer)
    stream = RecordStream(folder, "attack", fp)
    adv = x.clone()
    state = stream.load_state()
    if state is not None:
        done = state.pop("__adv__")
        rmc.steps_done = int(state.pop("__steps_done__").item())
        adv[:len(done)] = done
        if cfg.mode is Mode.ONLINE:
            rmc.load_state_dict(state)
    stream.rewrite()
    wrong = sum(r["pred"] != r["label"] for r in stream.records)
    bar = tqdm(total=n, initial=len(stream), desc=f"{LABELS[kind]} {base.name}", unit="input",
               disable=not progress, dynamic_ncols=True)
    for i in range(len(stream), n):
        res = attack_input(rmc, base.model, base.layer, x[i:i + 1], int(y[i]), kind, acfg, key=(set_name, i),
                           initial=initial[i:i + 1])
        adv[i] = res.x_adv[0]
        rec = {"index": i, "label": int(y[i]), "pred": res.prediction, **res.record()}
        saved = {"__adv__": adv[:i + 1].clone(), "__steps_done__": torch.tensor(rmc.steps_done)}
        if cfg.mode is Mode.ONLINE:
            saved.update(rmc.state_dict())
        stream.append(rec, saved)
        wrong += rec["pred"] != rec["label"]
        bar.update(1)
        bar.set_postfix(acc=f"{1 - wrong / len(stream):.3f}", rounds=len(res.rounds))
    bar.close()
    return adv, stream.records


def evaluate_attacks(base: BaseModel, dprime: DPrime, sets: Sequence[EvalSet], cfg: RMCConfig, acfg: AttackRowsConfig,
                     out_dir: str | Path, num_classes: int, clean_records: dict[str, list[dict]] | None = None,
                     progress: bool = True, log: Callable[[str], None] = print) -> list[AttackRow]:
    """The attack rows for one base model, in table order, ending with the worst case per input.

    `sets` must include the clean set (the attacks start from its inputs; the first `acfg.n` of them).
    `clean_records` ({"undefended": ..., "rmc": ...} from the clean set's evaluation), if given, joins the worst
    case: an unperturbed input lies in every eps-ball, so a clean mistake is a successful attack."""
    out_dir = Path(out_dir)
    clean = clean_set(sets)
    n = len(clean) if acfg.n is None else min(acfg.n, len(clean))   # the row labels state N
    if clean_records is not None and any(len(r) < n for r in clean_records.values()):
        raise RMCError(f"the clean results cover fewer than the {n} inputs of the attack rows; "
                       "set attack_rows.n to at most the number of evaluated inputs")
    x, y = clean.images[:n], clean.labels[:n]
    search = NeighbourSearch(base.features, dprime)
    names, labels = set_names(acfg), row_labels(acfg, n)
    sets_dir = out_dir / base.name / "attack-sets"
    base.model.eval()
    rows: list[AttackRow] = []

    def score(s: EvalSet) -> dict[str, list[dict]]:
        res = evaluate_set(base, dprime, search, s, cfg, out_dir, num_classes, progress=progress)   # a fresh RMC run
        return {"undefended": res["undefended"], "rmc": res["rmc"]}

    def ensure(name: str, meta: dict, make: Callable[[], torch.Tensor]) -> EvalSet:
        s = _cached_set(sets_dir, name, base, meta)
        if s is None:
            adv = make()
            s = EvalSet(name, adv.contiguous(), y.clone(), None, clean.indices[:n].clone(), meta)
            save_eval_sets(sets_dir, [s])
        return s

    step = acfg.resolved_step_size
    pgd_meta = _attack_meta(clean, base, n, kind="transfer-pgd", eps=acfg.eps, steps=acfg.steps, step_size=step,
                            random_start=True, attack_seed=acfg.seed)
    t0 = time.perf_counter()
    pgd_set = ensure(names["transfer-pgd"], pgd_meta, lambda: initial_candidates(base.model, x, y, acfg))
    if acfg.transfer_pgd:
        log(f"  {base.name}: {labels['transfer-pgd']} -> RMC")
        rows.append(AttackRow(pgd_set.name, labels["transfer-pgd"], TRANSFER, score(pgd_set),
                              {"seconds": round(time.perf_counter() - t0, 1)}))
    if acfg.autoattack:
        from rmc.attacks.autoattack import autoattack
        t0 = time.perf_counter()
        log(f"  {base.name}: AutoAttack (standard, L-inf, eps {_num(acfg.eps)}) against the static model")
        meta = _attack_meta(clean, base, n, kind="transfer-autoattack", eps=acfg.eps, version="standard",
                            norm="Linf", attack_seed=acfg.seed)
        aa = ensure(names["transfer-autoattack"], meta,
                    lambda: autoattack(base.model, x, y, acfg.eps, num_classes, seed=acfg.seed))
        rows.append(AttackRow(aa.name, labels["transfer-autoattack"], TRANSFER, score(aa),
                              {"seconds": round(time.perf_counter() - t0, 1)}))
    for kind in acfg.attacks:
        name = names[kind]
        t0 = time.perf_counter()
        log(f"  {base.name}: {labels[kind]} against RMC ({cfg.mode.value})")
        meta = _attack_meta(clean, base, n, kind=kind, eps=acfg.eps, steps=acfg.steps, step_size=step,
                            rounds=acfg.rounds, seed_known=acfg.seed_known, attack_seed=acfg.seed, loss=acfg.loss,
                            rmc=asdict(cfg) | {"mode": cfg.mode.value, "scope": cfg.scope.value})
        attack_records: list[dict] = []

        def make(kind=kind, name=name):
            adv, recs = _run_defense_aware(kind, name, base, dprime, search, x, y, pgd_set.images, cfg, acfg,
                                           out_dir / base.name / name, evalset_source(clean), progress)
            attack_records.extend(recs)
            return adv

        s = ensure(name, meta, make)
        records = score(s)
        if not attack_records:   # the set was made by an earlier run: its attack log is on disk
            stream_path = out_dir / base.name / name / "attack.jsonl"
            if stream_path.exists():
                attack_records = [json.loads(line) for line in stream_path.read_text().splitlines() if line.strip()]
        agree = sum(a["pred"] == r["pred"] for a, r in zip(attack_records, records["rmc"]))
        info = {"seconds": round(time.perf_counter() - t0, 1), "rescore_agrees": agree,
                "n": n, "rounds_run": sum(a.get("rounds", 0) for a in attack_records)}
        # The static model's accuracy on a sequence crafted against RMC is no attack on it: RMC column only.
        rows.append(AttackRow(name, labels[kind], AWARE, {"rmc": records["rmc"]}, info))
    rows.append(worst_case(rows, clean_records, n))
    return rows


def worst_case(rows: Sequence[AttackRow], clean_records: dict[str, list[dict]] | None, n: int) -> AttackRow:
    """Per input: correct only if correct in every row (and clean, if given); else the first wrong prediction."""
    out: dict[str, list[dict]] = {}
    for defense in ("undefended", "rmc"):
        sources = [r.records[defense] for r in rows if defense in r.records]
        if clean_records and defense in clean_records:
            sources.append(clean_records[defense][:n])
        if not sources:
            continue
        recs = []
        for i in range(n):
            label = sources[0][i]["label"]
            wrong = [s[i]["pred"] for s in sources if s[i]["pred"] != label]
            recs.append({"index": i, "label": label, "pred": wrong[0] if wrong else label})
        out[defense] = recs
    label = "worst case per input (every row above" + (" and clean)" if clean_records else ")")
    return AttackRow("worst-case", label, WORST, out)


NOTES = [
    "transfer: crafted against the static model, then fed to RMC (the original paper's setting; overstates "
    "robustness). defense-aware: crafted against the models RMC adapts into (FPA, GMSA; Chen et al., ICLR 2022), "
    "then re-scored by a fresh RMC run. Worst case: an input counts as correct only if every row (and the clean "
    "input) is classified correctly.",
    "AutoAttack's own check flags RMC as a dynamic defense (its forward pass fine-tunes the network), and "
    "RobustBench does not list defenses with an optimisation loop in the forward pass: AutoAttack is run only "
    "against the static model (a transfer row); it is not an AutoAttack evaluation of RMC.",
    "Defense-aware rows use the defense's own random keys (seed_known) unless labelled otherwise; a row with "
    "fewer rounds or inputs than the defaults (10 rounds, every input) is a weaker attack: its accuracy is an "
    "upper bound.",
]


def attack_table(rows_by_base: dict[str, list[AttackRow]]) -> Table:
    """Rows = attacks (each labelled transfer / defense-aware / worst case), columns = static and + RMC per base."""
    columns: list[str] = []
    rows: dict = {}
    checks = []
    for base, attack_rows in rows_by_base.items():
        for defense in ("undefended", "rmc"):
            columns.append(row_label(base, defense))
        for r in attack_rows:
            label = f"{r.label} [{r.kind}]"
            for defense, records in r.records.items():
                rows.setdefault(label, {})[row_label(base, defense)] = cell_from_records(records)
            if "rescore_agrees" in r.info:
                checks.append(f"{row_label(base, 'rmc')} / {r.label.split(' (')[0]}: {r.info['rescore_agrees']} of "
                              f"{r.info['n']}, {r.info['rounds_run']} rounds")
    notes = list(NOTES)
    if checks:
        notes.append("Fresh re-score agrees with the attack's own verdict on: " + "; ".join(checks) + ".")
    return Table(columns, {}, rows, corner="attack", notes=notes,
                 title="Attack rows (transfer vs defense-aware), worst case per input")


def wants_attack_rows(acfg: AttackRowsConfig) -> bool:
    return bool(acfg.attacks or acfg.transfer_pgd or acfg.autoattack)
