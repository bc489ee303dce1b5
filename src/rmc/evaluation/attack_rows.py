"""The attack rows of the report: transfer PGD, transfer AutoAttack, FPA, GMSA-AVG, GMSA-MIN, and the worst
case per input, for one base model (standard or adversarially trained), static and with RMC.

- Transfer rows are crafted against the static model and fed to RMC (the original paper's setting).
- Defense-aware rows attack RMC as it runs (rmc.attacks.defense_aware): per input, rounds of PGD against the models
  the attacker's RMC adapts into. The attack writes one record per input as it goes (`attack.jsonl`: the attack's
  own verdict; + the attacker's online state and the chosen images so far), so an interrupted run resumes from the
  last finished input. The chosen sequence is then scored by a separate RMC pass from the static weights
  (rmc.evaluation.driver.evaluate_set, keys = the row's name and the input's position), and that is what the table
  shows, beside the attack's own verdict and their agreement per input. `chen2022`'s attacker never drew those
  keys (its own RMC copy, its own keys: the pass is an independent re-score, as Chen et al.'s); `strong`'s attacker
  is that very stream (its exact state and keys), so there the pass replays the attack: they agree except where the
  last bits of an input's features (computed alone in the attack, in one batch in the pass) break a near-tie among
  its neighbours the other way.

Layout under the results directory:
    <base>/attack-sets/            the crafted inputs (evaluation-set format: reusable by `rmc evaluate`)
    <base>/<row set name>/         per-example records of each row (baselines.json, rmc.jsonl; defense-aware:
                                   attack.jsonl, agreement.json)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import torch
from tqdm import tqdm

from rmc.artifacts.evalsets import EvalSet, list_eval_sets, load_eval_sets, save_eval_sets
from rmc.artifacts.features import evalset_source
from rmc.attacks.batch_aware import BatchRowsConfig, batch_lane
from rmc.attacks.defense_aware import LABELS, AttackRowsConfig, initial_candidates
from rmc.attacks.kinds import ATTACK_KINDS
from rmc.defense import build_rmc
from rmc.defense.config import Mode, RMCConfig
from rmc.defense.dprime import DPrime
from rmc.defense.registry import DEFENSES, RMC, STATIC, selectable
from rmc.errors import RMCError
from rmc.evaluation import batch_defense
from rmc.evaluation.aware_stream import AwareStream
from rmc.evaluation.common import BaseModel, NeighbourSearch, digest
from rmc.evaluation.driver import evaluate_set, results_folder
from rmc.evaluation.records import read_records
from rmc.evaluation.report import Cell, Table, cell_from_records, row_label
from rmc.evaluation.stats import Rate
from rmc.io import load_tensors, save_tensors, write_json

TRANSFER, AWARE, WORST = "transfer", "defense-aware", "worst case"
AGREEMENT_FILE = "agreement.json"   # a defense-aware row's folder: the attack's verdict and the score, per input
EOT = "EOT through RMC, adaptation held fixed"   # AutoAttack rand: gradients of the adapted net (BPDA-like)
THROUGH = "through the defense, adaptation held fixed"   # a runner kind: gradients of the adapted net (BPDA-like)


@dataclass
class AttackRow:
    name: str                                   # evaluation-set name (its folder under results/<base>/)
    label: str                                  # row label in the table (same for every base model)
    kind: str                                   # "transfer", "defense-aware" or "worst case"
    records: dict[str, list[dict]]              # defense ("undefended", "rmc", ...) -> per-example records
    info: dict = field(default_factory=dict)    # settings, the attack's verdicts, their agreement with the score


def _num(x: float) -> str:
    return f"{x:.6g}"


def _pgd_text(acfg: AttackRowsConfig) -> str:
    step = "" if acfg.step_size is None else f", step {_num(acfg.step_size)}"
    return f"PGD-{acfg.steps}, eps {_num(acfg.eps)}{step}"


ATTACKER_TEXT = {   # Lane.attacker_rmc -> what the row label says about the RMC the attacker ran
    "own-copy": "attacker's own RMC copy and keys; scored by an independent RMC pass",
    "scored-stream": "attacker knows the scored RMC's exact state and keys"}


def _lane_text(acfg: AttackRowsConfig, protocol: str, kind: str) -> str:
    lane = acfg.lane(protocol)
    per_round = (f"PGD-{lane.steps}" + (" x models" if ATTACK_KINDS[kind].iterations_per_model else "")
                 + (f" x {lane.restarts} restarts" if lane.restarts > 1 else ""))
    extra = ", + chen2022 fallback" if protocol == "strong" and acfg.strong_fallback else ""
    return (f"{per_round}, {lane.loss}, step {_num(lane.step_size)}, best-loss iterate, "
            f"{ATTACKER_TEXT[lane.attacker_rmc]}{extra}")


def aware_key(kind: str, protocol: str) -> str:
    return f"{kind}/{protocol}"


def set_names(acfg: AttackRowsConfig) -> dict[str, str]:
    """Row key -> evaluation-set name. Names carry the settings, so other settings never reuse old results."""
    suffix = f"pgd{acfg.steps}-eps{_num(acfg.eps)}" + ("" if acfg.step_size is None else f"-step{_num(acfg.step_size)}")
    names = {"transfer-pgd": f"transfer-{suffix}"}
    if acfg.autoattack:
        names["transfer-autoattack"] = f"transfer-autoattack-eps{_num(acfg.eps)}"
    if acfg.rand_n:
        names["rand-autoattack"] = f"rand-autoattack-eps{_num(acfg.eps)}-eot{acfg.rand_eot}-steps{acfg.rand_steps}"
    for kind in acfg.attacks:
        for protocol in acfg.protocols:
            strong = (f"-x{acfg.strong_steps_factor}-rs{acfg.strong_restarts}" + ("-fb" if acfg.strong_fallback else "")
                      if protocol == "strong" else "")
            names[aware_key(kind, protocol)] = f"{kind}-{protocol}-r{acfg.rounds}-{suffix}{strong}"
    return names


def row_labels(acfg: AttackRowsConfig, n: int) -> dict[str, str]:
    labels = {"transfer-pgd": f"transfer {_pgd_text(acfg)}, best-loss iterate",
              "transfer-autoattack": f"transfer AutoAttack (standard, eps {_num(acfg.eps)})",
              "rand-autoattack": f"AutoAttack rand (APGD-CE + APGD-DLR, {acfg.rand_steps} steps, EOT {acfg.rand_eot}, "
                                 f"eps {_num(acfg.eps)}) against episodic stateless RMC, N={min(acfg.rand_n, n)}"}
    for kind in acfg.attacks:
        for protocol in acfg.protocols:
            labels[aware_key(kind, protocol)] = (f"{LABELS[kind]} [{protocol}] ({acfg.rounds} rounds of "
                                                 f"{_lane_text(acfg, protocol, kind)}, N={n})")
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


def evaluate_attacks(base: BaseModel, dprime: DPrime, sets: Sequence[EvalSet], cfg: RMCConfig, acfg: AttackRowsConfig,
                     out_dir: str | Path, num_classes: int, clean_records: dict[str, list[dict]] | None = None,
                     progress: bool = True, log: Callable[[str], None] = print, defenses: Sequence[str] = (RMC,),
                     settings: dict[str, Any] | None = None, brows: BatchRowsConfig | None = None) -> list[AttackRow]:
    """The attack rows for one base model, in table order, ending with the worst case per input.

    `sets` must include the clean set (the attacks start from its inputs; the first `acfg.n` of them).
    `clean_records` ({"undefended": ..., "rmc": ...} from the clean set's evaluation), if given, joins the worst
    case: an unperturbed input lies in every eps-ball, so a clean mistake is a successful attack.
    `defenses`: the columns beside the static model (rmc.defense.registry); `settings[name]`: each batch
    defense's settings (RMC's are `cfg`); `brows`: how the batch defenses' defense-aware rows run."""
    out_dir = Path(out_dir)
    clean = clean_set(sets)
    n = len(clean) if acfg.n is None else min(acfg.n, len(clean))   # the row labels state N
    if clean_records is not None and any(len(r) < n for r in clean_records.values()):
        raise RMCError(f"the clean results cover fewer than the {n} inputs of the attack rows; "
                       "set attack_rows.n to at most the number of evaluated inputs")
    x, y = clean.images[:n], clean.labels[:n]
    search = NeighbourSearch.of(base, dprime)
    names, labels = set_names(acfg), row_labels(acfg, n)
    sets_dir = results_folder(out_dir, base.name, "attack-sets")
    base.model.eval()
    rows: list[AttackRow] = []

    batch = batch_defense.batch_defenses(defenses)
    settings, brows = settings or {}, brows or BatchRowsConfig()

    def score(s: EvalSet) -> dict[str, list[dict]]:
        res = evaluate_set(base, dprime, search, s, cfg, out_dir, num_classes, with_rmc=RMC in defenses,
                           progress=progress)   # a fresh RMC run
        out = {d: res[d] for d in (STATIC, RMC) if d in res}
        for name in batch:
            out[name] = batch_defense.evaluate_set(name, settings[name], base, s, out_dir)
        return out

    def ensure(name: str, meta: dict, make: Callable[[], torch.Tensor]) -> EvalSet:
        s = _cached_set(sets_dir, name, base, meta)
        if s is None:
            adv = make()
            s = EvalSet(name, adv.contiguous(), y.clone(), None, clean.indices[:n].clone(), meta)
            save_eval_sets(sets_dir, [s])
        return s

    step = acfg.resolved_step_size
    pgd_meta = _attack_meta(clean, base, n, kind="transfer-pgd", eps=acfg.eps, steps=acfg.steps, step_size=step,
                            random_start=True, iterate="best-loss", attack_seed=acfg.seed)
    t0 = time.perf_counter()
    if acfg.transfer_pgd:
        pgd_set = ensure(names["transfer-pgd"], pgd_meta, lambda: initial_candidates(base.model, x, y, acfg))
        log(f"  {base.name}: {labels['transfer-pgd']} -> {', '.join(DEFENSES.label(d) for d in defenses)}")
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
    if acfg.rand_n and RMC in defenses:
        rows.append(_rand_row(base, dprime, search, clean, cfg, acfg, n, num_classes, names["rand-autoattack"],
                              labels["rand-autoattack"], sets_dir, score, log))
    rounds_kinds = [k for k in acfg.attacks if ATTACK_KINDS[k].runner is None]
    if RMC in defenses and len(rounds_kinds) < len(acfg.attacks):
        log(f"  {base.name}: {', '.join(k for k in acfg.attacks if k not in rounds_kinds)}: batch defenses only "
            "(RMC's AutoAttack through the defense is the rand row: attack_rows.rand_n)")
    aware = [(kind, protocol) for kind in rounds_kinds for protocol in acfg.protocols] if RMC in defenses else []
    metas = {a: _aware_meta(*a, clean, base, cfg, acfg, n) for a in aware}
    pending = {a: AwareStream(*a, names[aware_key(*a)], base, dprime, search, x, y, cfg, acfg,
                              results_folder(out_dir, base.name, names[aware_key(*a)]), evalset_source(clean))
               for a in aware if _cached_set(sets_dir, names[aware_key(*a)], base, metas[a]) is None}
    if pending:
        _attack_in_turn(pending, n, labels, base.name, cfg, progress, log)
    for a in aware:
        name = names[aware_key(*a)]
        stream = pending.get(a)
        # only called when the set is not cached, that is when it was attacked above
        made = ensure(name, metas[a], lambda: cast(AwareStream, stream).adv)   # noqa: B023 (called at once)
        rows.append(_aware_row(*a, made, labels[aware_key(*a)], results_folder(out_dir, base.name, name), n, acfg,
                               score))
    for name in batch:
        rows += _batch_aware_rows(name, settings[name], base, clean, x, y, acfg, brows, n, num_classes, out_dir,
                                  sets_dir, progress, log)
    rows.append(worst_case(rows, clean_records, n))
    _figure(rows, acfg, out_dir / base.name / "rounds.png", base.name, log)
    return rows


def _aware_meta(kind, protocol, clean, base, cfg, acfg, n) -> dict:
    lane = acfg.lane(protocol)
    return _attack_meta(clean, base, n, kind=kind, protocol=protocol, eps=acfg.eps, steps=lane.steps,
                        step_size=lane.step_size, restarts=lane.restarts, loss=lane.loss, attacker=lane.attacker_rmc,
                        rounds=acfg.rounds, attack_seed=acfg.seed,
                        fallback=protocol == "strong" and acfg.strong_fallback,
                        rmc=asdict(cfg) | {"mode": cfg.mode.value, "scope": cfg.scope.value})


def _attack_in_turn(pending: dict, n: int, labels: dict, base_name: str, cfg: RMCConfig, progress: bool,
                    log) -> None:
    """Step every unfinished defense-aware row input by input, in turn: a run stopped early has the same first
    inputs in every row (each resumes from its own records)."""
    for kind, protocol in pending:
        log(f"  {base_name}: {labels[aware_key(kind, protocol)]} against RMC ({cfg.mode.value})")
    start = min(s.done for s in pending.values())
    bar = tqdm(total=n, initial=start, desc=f"defense-aware rows {base_name}", unit="input", disable=not progress,
               dynamic_ncols=True)
    for i in range(start, n):
        for stream in pending.values():
            if stream.done == i:
                stream.step()
        accs = [sum(r["pred"] == r["label"] for r in s.records) / max(1, s.done) for s in pending.values()]
        bar.update(1)
        bar.set_postfix(acc="/".join(f"{a:.2f}" for a in accs))
    bar.close()


def _aware_row(kind, protocol, made: EvalSet, label: str, folder: Path, n: int, acfg: AttackRowsConfig,
               score) -> AttackRow:
    """One defense-aware row: its chosen sequence scored by a separate RMC pass, beside the attack's own verdicts
    (`attack.jsonl`) and their agreement input by input."""
    t0 = time.perf_counter()
    records = score(made)
    stream_path = folder / "attack.jsonl"
    attack_records = read_records(stream_path)[:n] if stream_path.exists() else []
    scored = {r["index"]: r["pred"] for r in records[RMC]}
    agree = [a["index"] for a in attack_records if scored.get(a["index"]) == a["pred"]]
    attack_s = sum(a.get("seconds", 0) for a in attack_records)
    info = {"seconds": round(attack_s + time.perf_counter() - t0, 1), "attack_seconds": round(attack_s, 1),
            "verdict_correct": sum(a["pred"] == a["label"] for a in attack_records), "agree": len(agree), "n": n,
            "kind": kind, "protocol": protocol, "attacker": acfg.lane(protocol).attacker_rmc, "rounds": acfg.rounds,
            "attack_records": attack_records, "rounds_run": sum(a.get("rounds", 0) for a in attack_records),
            "defense": RMC}
    _write_agreement(folder, info, attack_records, records[RMC])
    # The static model's accuracy on a sequence crafted against RMC is no attack on it: RMC column only.
    return AttackRow(made.name, label, AWARE, {RMC: records[RMC]}, info)


def _write_agreement(folder: Path, info: dict, attack_records: list[dict], scored_records: list[dict]) -> None:
    """Per input, the attack's verdict beside the score (the table's agreement column, input by input)."""
    scored = {r["index"]: r["pred"] for r in scored_records}
    agreement = {
        "attacker": info.get("attacker"), "n": info["n"], "attack_verdict_correct": info["verdict_correct"],
        "score_correct": sum(r["pred"] == r["label"] for r in scored_records), "agree": info["agree"],
        "inputs": [{"index": a["index"], "label": a["label"], "attack_pred": a["pred"],
                    "score_pred": scored.get(a["index"])} for a in attack_records]}
    # A re-run that changes nothing leaves the file as it is, as it leaves the records.
    path = folder / AGREEMENT_FILE
    try:
        same = json.loads(path.read_text()) == json.loads(json.dumps(agreement))
    except (OSError, ValueError, RecursionError):   # absent or damaged: (re)written from the records
        same = False
    if not same:
        write_json(path, agreement)


def _rand_row(base, dprime, search, clean, cfg, acfg, n, num_classes, name, label, sets_dir, score, log) -> AttackRow:
    """AutoAttack's rand version against RMCClassifier (episodic, stateless, a new RMC key per call: EOT averages
    the gradient over RMC's randomness) on the first rand_n inputs; fed to RMC like the other rows."""
    from rmc.attacks.autoattack import autoattack_rand
    from rmc.defense.classifier import RMCClassifier
    t0 = time.perf_counter()
    m = min(acfg.rand_n, n)
    log(f"  {base.name}: {label}")
    meta = _attack_meta(clean, base, m, kind="rand-autoattack", eps=acfg.eps, version="rand", norm="Linf",
                        eot_iter=acfg.rand_eot, steps=acfg.rand_steps, attack_seed=acfg.seed,
                        rmc=asdict(cfg) | {"mode": "episodic", "scope": cfg.scope.value})
    sets_dir = sets_dir.parent / f"{sets_dir.name}-rand"    # a folder's sets share N; this row has its own
    s = _cached_set(sets_dir, name, base, meta)
    if s is None:
        episodic = build_rmc(base.model, dprime, search.all, replace(cfg, mode=Mode.EPISODIC), base.layer)
        clf = RMCClassifier(episodic, base.model, base.layer, stateful=False)
        adv = autoattack_rand(clf, clean.images[:m], clean.labels[:m], acfg.eps, acfg.rand_eot, acfg.rand_steps,
                              seed=acfg.seed)
        s = EvalSet(name, adv.contiguous(), clean.labels[:m].clone(), None, clean.indices[:m].clone(), meta)
        save_eval_sets(sets_dir, [s])
    # Crafted against RMC: the static model's column would be no attack on it; RMC column only.
    return AttackRow(s.name, label, EOT, {RMC: score(s)[RMC]}, {"seconds": round(time.perf_counter() - t0, 1)})


def _figure(rows, acfg, path: Path, base_name: str, log) -> None:
    curves = {_short(r): (r.info["attack_records"], r.records[r.info.get("defense", RMC)]) for r in rows
              if r.kind == AWARE and "attack_records" in r.info}
    if curves:
        from rmc.evaluation.rounds_figure import save_rounds_figure
        save_rounds_figure({base_name: curves}, acfg.rounds, path)
        log(f"  {base_name}: per-round accuracy figure {path}")


def _columns(rows: Sequence[AttackRow]) -> list[str]:
    """The defenses with a column in these rows: the static model and the selectable defenses, in registry order."""
    present = {d for r in rows for d in r.records}
    return [d for d in (STATIC, *selectable()) if d in present]


def _short(r: AttackRow) -> str:
    """A row's label without its settings (a row against another defense than RMC names it)."""
    return r.label.split(" (")[0]


def _batch_label(kind: str, protocol: str, defense: str, batch_size: int, acfg: AttackRowsConfig,
                 brows: BatchRowsConfig, n: int, num_classes: int) -> str:
    lane = batch_lane(brows, acfg, protocol)
    runs = lane.restarts + (num_classes - 1 if lane.targeted else 0)
    per_run = f"PGD-{lane.steps}" + (" x models" if ATTACK_KINDS[kind].iterations_per_model else "")
    pick = ("per-input pick + chen2022 fallback" if lane.fallback else "per-input pick" if lane.compose
            else "lowest batch accuracy")
    return (f"{LABELS[kind]} [{protocol}] against {defense} ({brows.rounds} rounds per batch of {batch_size}, "
            f"{runs} {per_run} run{'s' if runs > 1 else ''} each, margin, step {_num(acfg.resolved_step_size)}, {pick}"
            + (", reordered" if brows.reorder else "") + f", N={n})")


def _batch_aware_rows(name: str, settings: Any, base: BaseModel, clean: EvalSet, x: torch.Tensor, y: torch.Tensor,
                      acfg: AttackRowsConfig, brows: BatchRowsConfig, n: int, num_classes: int, out_dir: Path,
                      sets_dir: Path, progress: bool, log: Callable[[str], None]) -> list[AttackRow]:
    """The defense-aware rows against the batch defense `name` (rmc.attacks.batch_aware), each re-scored by a fresh
    pass over the same batches."""
    rows = []
    label_name = DEFENSES.label(name)
    for kind in acfg.attacks:
        if ATTACK_KINDS[kind].runner is not None:
            rows.append(_through_row(kind, name, settings, base, clean, y, acfg, n, num_classes, out_dir, sets_dir,
                                     log))
            continue
        for protocol in acfg.protocols:
            lane = batch_lane(brows, acfg, protocol)
            meta = _attack_meta(clean, base, n, kind=kind, protocol=protocol, defense=name, eps=acfg.eps,
                                steps=lane.steps, step_size=acfg.resolved_step_size, restarts=lane.restarts,
                                targeted_runs=lane.targeted, rounds=brows.rounds, reorder=brows.reorder,
                                fallback=lane.fallback, attack_seed=acfg.seed, **{name: asdict(settings)})
            set_name = (f"{name}-{kind}-{protocol}-r{brows.rounds}-pgd{lane.steps}-eps{_num(acfg.eps)}-"
                        f"{digest(meta)[:6]}")
            folder = results_folder(out_dir, base.name, set_name)
            made = _cached_set(sets_dir, set_name, base, meta)
            stream = batch_defense.BatchAwareStream(name, settings, kind, protocol, base, x, y, acfg, brows, folder,
                                                    evalset_source(clean), num_classes)
            label = _batch_label(kind, protocol, label_name, settings.batch_size, acfg, brows, n, num_classes)
            if made is None:
                log(f"  {base.name}: {label}")
                stream.run(progress, f"{label_name} {kind} [{protocol}] {base.name}")
                made = EvalSet(set_name, stream.adv.contiguous(), y.clone(), None, clean.indices[:n].clone(), meta)
                save_eval_sets(sets_dir, [made])
            attack_records = stream.records
            t0 = time.perf_counter()   # the attack's own time is in its records
            records = batch_defense.evaluate_set(name, settings, base, made, out_dir, reorder=brows.reorder)
            scored = {r["index"]: r["pred"] for r in records}
            attack_s = sum(a.get("seconds", 0) for a in attack_records)
            info = {"seconds": round(attack_s + time.perf_counter() - t0, 1), "attack_seconds": round(attack_s, 1),
                    "verdict_correct": sum(a["pred"] == a["label"] for a in attack_records),
                    "agree": sum(scored.get(a["index"]) == a["pred"] for a in attack_records), "n": n, "kind": kind,
                    "protocol": protocol, "rounds": brows.rounds, "attack_records": attack_records, "defense": name,
                    "rounds_run": sum(a.get("rounds", 0) for a in attack_records)}
            _write_agreement(folder, info, attack_records, records)
            rows.append(AttackRow(set_name, label, AWARE, {name: records}, info))
    return rows


def _through_row(kind: str, name: str, settings: Any, base: BaseModel, clean: EvalSet, y: torch.Tensor,
                 acfg: AttackRowsConfig, n: int, num_classes: int, out_dir: Path, sets_dir: Path,
                 log: Callable[[str], None]) -> AttackRow:
    """The attack kind's runner (AutoAttack) through the batch defense `name` as a module (BatchClassifier: each
    gradient that of the network the defense adapted to the attack's current batch, the adaptation held fixed), in
    the defense's own batches (Chen et al.'s DENT-AA: `bs=TEST.BATCH_SIZE`); the crafted set is then scored by a
    fresh pass over the same batches. A finished set is reused; a stopped one resumes after its last finished batch."""
    import importlib

    from rmc.defense.batch_classifier import BatchClassifier
    spec = ATTACK_KINDS[kind]
    module, _, function = str(spec.runner).partition(":")
    attack = getattr(importlib.import_module(module), function)
    meta = _attack_meta(clean, base, n, kind=kind, defense=name, eps=acfg.eps, runner=spec.runner,
                        batch_size=settings.batch_size, attack_seed=acfg.seed, **{name: asdict(settings)})
    set_name = f"{name}-{kind}-eps{_num(acfg.eps)}-{digest(meta)[:6]}"
    label = (f"{spec.label} {DEFENSES.label(name)} (standard, L-inf eps {_num(acfg.eps)}; each gradient the "
             f"network {DEFENSES.label(name)} adapted to the attack's batch, adaptation held fixed; batches of "
             f"{settings.batch_size}, N={n})")
    made = _cached_set(sets_dir, set_name, base, meta)
    if made is None:
        log(f"  {base.name}: {label}")
        clf = BatchClassifier(batch_defense.build(name, base, settings))
        x = clean.images[:n]
        # finished batches so far (a stopped row resumes after the last one), keyed by the row's settings
        partial = results_folder(out_dir, base.name, set_name) / "partial.safetensors"
        done, seconds, adaptations = 0, 0.0, 0
        adv = x.clone()
        if partial.exists():
            saved = load_tensors(partial, "the row's finished batches")
            if saved["key"].tolist() == list(digest(meta).encode()):
                done, adv = int(saved["done"]), saved["adv"]
                seconds, adaptations = float(saved["seconds"]), int(saved["adaptations"])
        batches = list(range(0, n, settings.batch_size))
        for i in tqdm(range(done, len(batches)), desc=f"{spec.label} {DEFENSES.label(name)} {base.name}",
                      unit="batch", initial=done, total=len(batches)):
            t_batch, calls = time.perf_counter(), clf.adaptations
            sl = slice(batches[i], batches[i] + settings.batch_size)
            adv[sl] = attack(clf, x[sl], y[sl], acfg.eps, num_classes, seed=acfg.seed + i,
                             batch_size=settings.batch_size)
            seconds += time.perf_counter() - t_batch
            adaptations += clf.adaptations - calls
            save_tensors(partial, {"adv": adv, "done": torch.tensor(i + 1), "seconds": torch.tensor(seconds),
                                   "adaptations": torch.tensor(adaptations),
                                   "key": torch.tensor(list(digest(meta).encode()))})
        seconds = round(seconds, 1)
        log(f"  {base.name}: {adaptations} adaptations of {DEFENSES.label(name)} in {seconds:.0f} s")
        # the attack's cost travels with its set (beside the settings it is matched by), so a rerun reports it
        made = EvalSet(set_name, adv.contiguous(), y.clone(), None, clean.indices[:n].clone(),
                       {**meta, "attack_seconds": seconds, "adaptations": adaptations})
        save_eval_sets(sets_dir, [made])
        partial.unlink(missing_ok=True)
    t1 = time.perf_counter()
    records = batch_defense.evaluate_set(name, settings, base, made, out_dir)
    attack_s = float(made.attack.get("attack_seconds", 0))
    return AttackRow(set_name, label, THROUGH, {name: records},
                     {"seconds": round(attack_s + time.perf_counter() - t1, 1), "attack_seconds": attack_s,
                      "adaptations": made.attack.get("adaptations"), "kind": kind, "defense": name})


def worst_case(rows: Sequence[AttackRow], clean_records: dict[str, list[dict]] | None, n: int) -> AttackRow:
    """Per input: correct only if correct in every row (and clean, if given); else the first wrong prediction."""
    out: dict[str, list[dict]] = {}
    for defense in _columns(rows):
        sources = [r.records[defense] for r in rows if defense in r.records]
        if clean_records and defense in clean_records:
            sources.append(clean_records[defense][:n])
        if not sources:
            continue
        recs = []
        for i in range(n):
            here = [s[i] for s in sources if i < len(s)]   # a row on fewer inputs (AutoAttack rand) counts where it ran
            label = here[0]["label"]
            wrong = [r["pred"] for r in here if r["pred"] != label]
            recs.append({"index": i, "label": label, "pred": wrong[0] if wrong else label})
        out[defense] = recs
    label = "worst case per input (every row above" + (" and clean)" if clean_records else ")")
    return AttackRow("worst-case", label, WORST, out)


NOTES = [
    "transfer: crafted against the static model (PGD: the best-loss iterate, as Chen et al.'s), then fed to RMC (the "
    "original paper's setting; overstates robustness). defense-aware: crafted against the models RMC adapts into "
    "(FPA, GMSA; Chen et al., ICLR 2022), then scored by a separate RMC pass from the static weights: the RMC "
    "column. Worst case: an input counts as correct only if every row (and the clean input) is classified correctly.",
    "[chen2022]: Chen et al.'s protocol as they ran it (cross-entropy, step eps/8, best-loss iterate, GMSA-MIN with "
    "steps x models iterations, the clean input when no round fools the attacker's RMC). The attacker runs its own "
    "copy of online RMC under its own random keys (its trials, verdicts and calibrations), so its online state "
    "drifts apart from the scored RMC's; the scored pass draws keys the attacker never used (an independent "
    "re-score, which is what Chen et al. report). [strong]: the attacker runs the scored RMC itself (its exact "
    "online state and keys; the scored pass replays it), margin loss, more iterations and random restarts, then "
    "chen2022's rounds when its own fail: never weaker than chen2022 from the same state and keys.",
    "\"RMC: attack's verdict\": RMC's accuracy as the attacker's own RMC judged the chosen inputs. \"RMC: verdict = "
    "score\": the % of inputs on which that verdict equals the scored pass's prediction. [strong]: 100 but for a "
    "near-tie among an input's neighbours that the last bits of its features (computed alone in the attack, in one "
    "batch in the scored pass) break the other way; [chen2022]: how far RMC's own randomness and drifting state "
    "decide the outcome.",
    "AutoAttack's own check flags RMC as a dynamic defense (its forward pass fine-tunes the network), and "
    "RobustBench does not list defenses with an optimisation loop in the forward pass. Transfer AutoAttack attacks "
    "only the static model; the AutoAttack rand row (if any) attacks episodic stateless RMC through gradients "
    "that hold the adaptation fixed (BPDA-like), with reduced steps, EOT samples and N: neither is an AutoAttack "
    "evaluation of RMC, and a high accuracy there proves nothing.",
    "Every row is an upper bound on robust accuracy (a fixed attack budget); a row with fewer rounds or inputs "
    "than the paper setting (10 rounds, every input) is weaker still.",
]


BATCH_NOTE = ("Against a batch defense (DENT) the defense-aware rows attack each test batch of the defense's own size "
              "(Chen et al.'s DENT/eval_dent_gmsa.py): [chen2022] rounds of PGD on the logit margin (untargeted runs "
              "from random starts, and one targeted run per other class when set), round 1 against the static "
              "model, the candidate batch with the lowest batch accuracy kept (else the clean batch); [strong] more "
              "iterations and runs, per input the lowest-margin candidate of its rounds, and chen2022's rounds as a "
              "fallback: never weaker than chen2022 on a batch; every round runs. The defense is deterministic: the "
              "attacker's verdict is the scored pass's. The label states the budget.")
VERDICT, AGREEMENT = "attack's verdict", "verdict = score"   # the defense-aware rows' extra columns


def attack_table(rows_by_base: dict[str, list[AttackRow]]) -> Table:
    """Rows = attacks (each labelled transfer / defense-aware / worst case), columns = static and + RMC per base;
    a base with defense-aware rows also gets the attack's own verdict and its agreement with the score."""
    columns: list[str] = []
    rows: dict = {}
    rounds_run, times = [], []
    for base, attack_rows in rows_by_base.items():
        defenses = _columns(attack_rows)
        columns += [row_label(base, d) for d in defenses]
        for d in defenses:
            if any("agree" in r.info and r.info.get("defense", RMC) == d for r in attack_rows):
                columns += [f"{row_label(base, d)}: {VERDICT}", f"{row_label(base, d)}: {AGREEMENT}"]
        for r in attack_rows:
            label = f"{r.label} [{r.kind}]"
            for defense, records in r.records.items():
                rows.setdefault(label, {})[row_label(base, defense)] = cell_from_records(records)
            # a transfer row's time covers every column's scored pass: named after RMC's, else the static model's
            defense = r.info.get("defense", RMC if RMC in r.records else STATIC)
            who, short = row_label(base, defense), _short(r).split(" against ")[0]
            if "agree" in r.info:
                n_attacked = len(r.info["attack_records"])
                rows[label][f"{who}: {VERDICT}"] = Cell(Rate(r.info["verdict_correct"], n_attacked))
                rows[label][f"{who}: {AGREEMENT}"] = Cell(Rate(r.info["agree"], len(r.records[defense])))
                rounds_run.append(f"{who} / {short}: {r.info['rounds_run']}")
            if "seconds" in r.info:
                times.append(f"{who} / {short}: {r.info['seconds']:.0f} s")
    notes = list(NOTES)
    if any(r.info.get("defense", RMC) != RMC for rows in rows_by_base.values() for r in rows):
        notes.append(BATCH_NOTE)
    if rounds_run:
        notes.append("Rounds run in all (the attacker stops at the first round that fools its RMC; against a batch "
                     "defense every round runs): " + "; ".join(rounds_run) + ".")
    if times:
        notes.append("Wall time per row (attack + scored pass): " + "; ".join(times) + ".")
    return Table(columns, {}, rows, corner="attack", notes=notes,
                 title="Attack rows (transfer vs defense-aware), worst case per input")


def check_rows_within_rmc(acfg: AttackRowsConfig, n: int, rmc_n: int | None) -> None:
    """The attack rows' worst case takes RMC's clean cell: refuse, before any work, rows on more inputs than RMC's
    (`n` inputs per set, RMC on the first `rmc_n`)."""
    rows = n if acfg.n is None else min(acfg.n, n)
    if rmc_n is not None and rmc_n < rows and wants_attack_rows(acfg):
        raise RMCError(f"the attack rows run on {rows} inputs but RMC only on the first {rmc_n} (attack.rmc_n / "
                       "--rmc-n), and their worst case takes RMC's clean cell; set attack_rows.n (--attack-n) to at "
                       "most that, or --no-attack-rows")


def wants_attack_rows(acfg: AttackRowsConfig) -> bool:
    return bool(acfg.attacks or acfg.transfer_pgd or acfg.autoattack or acfg.rand_n)
