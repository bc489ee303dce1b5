"""`rmc run`: train each base model (or take its imported weights, model.weights), attack, augment, extract features,
evaluate, tabulate; one call per stage.

Every stage's output lives in a folder named after the base model and a short hash of the stage's own inputs, so
re-running resumes, and a changed setting re-runs only the stages that depend on it (changing `rmc.k` reuses the
models, D' and features; changing `attack.n` also reuses D'), each result beside the others. A base model whose
records are all on disk (e.g. restored on another machine by studies/carry_run.py) is tabulated from them without
rebuilding its D' and features, which only the streams still running need. Layout:

    config.yaml, results.json/.md    the latest run's configuration and table (results.json names its stage folders)
    models/<base>-<key>.safetensors  base models; key: data + training settings (imported ones stay where they are)
    dprime/<base>-<key>/             each base model's augmented dataset D', crafted against it; key: model + augment
    features/<base>-<key>.npy        D' features at the base model's feature layer; key: D' + layer
    evalsets/<base>-<key>/           evaluation sets made against each base model (transfer); key: model + attack
    results/<key>/<base>/<set>/      per-example records (resumable); key: model, D', layer, attack, rmc, attack rows
    neighbours.png                   test inputs beside their nearest neighbours in D'
    report.html, figures/            `rmc report`: the tables and figures in one page (rmc.evaluation.html_report)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from rmc.artifacts.dprime import build_dprime_store
from rmc.artifacts.evalsets import (
    AttackSpec,
    load_eval_sets,
    make_eval_sets,
    save_eval_sets,
)
from rmc.artifacts.features import ensure_features
from rmc.artifacts.provenance import check_model_data
from rmc.cli.config import BaseKind, RunConfig, documented_yaml, to_dict, validate_before_work
from rmc.data import DATASETS, load_dataset
from rmc.defense.registry import RMC
from rmc.errors import RMCError
from rmc.evaluation import batch_defense
from rmc.evaluation.attack_rows import attack_table, evaluate_attacks, wants_attack_rows
from rmc.evaluation.common import BaseModel, digest
from rmc.evaluation.driver import (
    check_work_split,
    compute_paths,
    evaluate,
    finished_results,
    online_streams,
    results_folder,
)
from rmc.evaluation.report import Table
from rmc.evaluation.visualize import neighbour_grid
from rmc.io import write_json, write_text
from rmc.models import default_layer, load_checkpoint, save_checkpoint
from rmc.models.checkpoint import meta_path, read_metadata
from rmc.scaleout.executors import hold
from rmc.training import TrainConfig, train_model


class StageTimer:
    """Logs what each stage did and how long it took (kept in results.json)."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.stages: list[dict] = []

    def __call__(self, name: str, fn: Callable, *args, **kwargs):
        self.log(f"[{name}] ...")
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        self.stages.append({"stage": name, "seconds": round(seconds, 1)})
        self.log(f"[{name}] done in {seconds:.0f} s")
        return out


def training_settings(cfg: TrainConfig | dict) -> dict:
    """What a trained model is named and matched by: its training settings, the device written as 'cpu' (a model
    trained on a GPU serves a run resumed on the CPU and the other way round; 'cpu' keeps the keys of runs made
    before the device could change)."""
    tree = to_dict(cfg) if not isinstance(cfg, dict) else dict(cfg)
    return {**tree, "device": "cpu"} if "device" in tree else tree


def ensure_model(path: Path, train, test, cfg, log):
    """Load the base model at `path` if it was trained with `cfg`; else train and save it."""
    want = to_dict(cfg)
    if path.exists() and meta_path(path).exists():
        meta = read_metadata(path)
        if settled(training_settings(meta.get("config") or {})) != settled(training_settings(want)):
            raise RMCError(f"{path} was trained with other settings; use a new --out or delete {path.parent}")
        model, info = load_checkpoint(path, cfg.device, trust_arch=cfg.arch)   # the run's own config names it
        log(f"  reusing {path} (test accuracy {info.test_accuracy:.4f})")
        return model, info
    model, info = train_model(train, test, cfg)
    info.config = want
    info = save_checkpoint(model, info, path)
    log(f"  {path}: clean test accuracy {info.test_accuracy:.4f}")
    return model, info


def imported_model(path: Path, test, cfg: TrainConfig, log):
    """A base model given as an rmc checkpoint (`rmc import-model`, or any rmc checkpoint) instead of trained; a
    factory architecture is built only when train.arch names it (the run's own config)."""
    model, info = load_checkpoint(path, cfg.device, trust_arch=cfg.arch)
    check_model_data(info, test, "the test set")
    source = info.imported.get("source_name") or "a model trained by rmc"
    log(f"  using {path} ({info.arch}, from {source}; sha256 {info.sha256[:12]}): not trained here")
    return model, info


def attack_specs(cfg) -> list[AttackSpec]:
    specs = [AttackSpec("clean")] + [AttackSpec("fgsm", eps=float(e)) for e in cfg.fgsm_eps]
    for pair in cfg.pgd:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RMCError(f"attack.pgd entries are [steps, eps] pairs, got {pair!r}")
        steps, eps = int(pair[0]), float(pair[1])
        for targeted in [t for t, on in ((False, cfg.untargeted_for(pair)), (True, cfg.targeted)) if on]:
            specs.append(AttackSpec("pgd", eps=eps, steps=steps, step_size=cfg.pgd_step_size, targeted=targeted))
    return specs


def ensure_eval_sets(model, info, test, cfg, folder: Path):
    specs = attack_specs(cfg)
    names = [s.resolved().name for s in specs]
    if (folder / "index.json").exists():
        sets = load_eval_sets(folder, model_sha256=info.sha256)
        if [s.name for s in sets] == names and all(s.attack.get("n") == cfg.n and s.attack.get("seed") == cfg.seed
                                                   for s in sets):
            return sets
        raise RMCError(f"{folder} holds other evaluation sets than this config asks for; use a new --out or delete it")
    sets = make_eval_sets(model, info, test, cfg.n, specs, seed=cfg.seed)
    save_eval_sets(folder, sets)
    return sets


def run_pipeline(cfg: RunConfig, out: str | Path, log: Callable[[str], None] = print,
                 with_rmc: bool = True, ray: str | None = None, workers: int | None = None,
                 shards: int = 1, batch: int = 1, block: int | None = None, dprime_via: str | None = None,
                 ray_timeout: float | None = None) -> Table:
    """`ray` ("local" or a cluster address): augmentation chunks and RMC's per-input work run as Ray tasks (one Ray
    session for the whole run; joining a cluster gives up after `ray_timeout` seconds); `shards`: independent online
    streams per test stream, `batch`: episodic inputs adapted at once, `dprime_via`: how Ray's workers get D' (see
    rmc.evaluation.driver)."""
    check_work_split(batch, cfg.rmc, ray, shards, block)      # before hours of work, not after
    validate_before_work(cfg)                                 # and before config.yaml is written
    t0 = time.perf_counter()
    with hold(ray, workers, ray_timeout) as slots:
        if ray is not None:
            log(f"[ray] {slots} workers ready in {time.perf_counter() - t0:.1f} s ({ray})")
        return _run(cfg, Path(out), log, with_rmc, ray, workers, shards, batch, block, dprime_via)


def settled(tree):
    """A config tree without its unset (None) entries: a key added later with None as its default (off) leaves
    the hashes of stages made before it unchanged."""
    if isinstance(tree, dict):
        return {k: settled(v) for k, v in tree.items() if v is not None}
    return [settled(v) for v in tree] if isinstance(tree, list) else tree


def stage_key(*inputs) -> str:
    """8 hex digits naming a stage's output by everything it depends on."""
    return digest(*[settled(x) for x in inputs])[:8]


def base_train_config(kind: str, cfg: RunConfig) -> TrainConfig:
    """The training settings of one base model (the run's `train` section, with the base's kind)."""
    kind = BaseKind(kind)
    return dataclasses.replace(cfg.train, adversarial=kind is not BaseKind.STANDARD,
                               denoise=cfg.model.denoise_op if kind is BaseKind.DENOISING else None)


def attack_settings(cfg) -> dict:
    """What the evaluation sets and rows depend on: all of `attack` but rmc_n, so RMC's N grows in the same folders."""
    return {k: v for k, v in to_dict(cfg).items() if k != "rmc_n"}


def changed(section) -> dict:
    """The keys of a config section that differ from their defaults."""
    default = to_dict(type(section)())
    return {k: v for k, v in to_dict(section).items() if v != default[k]}


def results_key(cfg: RunConfig, model_sha256: str, dprime_key: str, layer: str, shards: int, with_rmc: bool) -> str:
    """One base model's rows depend on it, its D' and layer, the evaluation settings and the online streams, and on
    the neighbour search's settings where they differ from the defaults (the defaults give the same search for the
    same D', and the record streams' fingerprints name the search actually used)."""
    search = {**changed(cfg.knn), **{f"features.{k}": v for k, v in changed(cfg.features).items() if k != "batch_size"}}
    return stage_key(model_sha256, dprime_key, layer, attack_settings(cfg.attack), to_dict(cfg.rmc),
                     online_streams(cfg.rmc, shards),
                     to_dict(cfg.attack_rows) if with_rmc and wants_attack_rows(cfg.attack_rows) else None, with_rmc,
                     *([search] if search else []))


def _batch_column(defense: str, cfg: RunConfig, base: BaseModel, sets, rows_dir: Path, results: dict) -> None:
    """Add the batch defense's records of every set to `results` ({set: {defense: records}})."""
    for s in sets:
        results[s.name][defense] = batch_defense.evaluate_set(defense, cfg.settings(defense), base, s, rows_dir,
                                                              cfg.attack.n)


def _finished_batch(done: dict, batch: list[str], cfg: RunConfig, sha256: str, base: str, sets,
                    rows_dir: Path) -> dict | None:
    """`done` ({set: {defense: records}} of a base read from disk) with each batch defense's finished records
    added, or None if one of them has not run on every set."""
    for defense in batch:
        for s in sets:
            n = len(s.images[:cfg.attack.n])
            path = results_folder(rows_dir, base, s.name) / f"{defense}.json"
            recs = batch_defense.finished(path, batch_defense.fingerprint(sha256, defense, cfg.settings(defense), s, n),
                                          n)
            if recs is None:
                return None
            done[s.name][defense] = recs
    return done


def _run(cfg: RunConfig, out: Path, log: Callable[[str], None], with_rmc: bool, ray: str | None,
         workers: int | None, shards: int, batch: int, block: int | None, dprime_via: str | None = None) -> Table:
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer(log)
    t_start = time.perf_counter()
    train = load_dataset(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.image_size, cfg.data.resize,
                         cfg.data.lazy)
    test = load_dataset(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.image_size, cfg.data.resize,
                        cfg.data.lazy)
    run_rmc = with_rmc and RMC in cfg.defenses
    batch_names = batch_defense.batch_defenses(cfg.defenses) if with_rmc else []   # with_rmc False: baselines only
    if not DATASETS[cfg.data.dataset].flips:
        cfg.rmc.calib_flip = False   # e.g. a flipped digit is another (or no) digit
    data = to_dict(cfg.data)

    models, stages = {}, {}   # base -> (model, info); base -> the folders of its stages
    results, notes = {}, {}
    attack_rows = {}   # base -> the attack rows (transfer / defense-aware), rmc.evaluation.attack_rows
    stores = {}        # base -> its own D', crafted against it (the original's principle)
    for name in cfg.model.bases:   # one base after the other: the first one's rows come before the next is trained
        imported = cfg.model.weights.get(name)
        if imported is None:
            tcfg = base_train_config(name, cfg)
            path = out / "models" / f"{name}-{stage_key(data, training_settings(tcfg))}.safetensors"
            model, info = models[name] = timer(f"train {name}", ensure_model, path, train, test, tcfg, log)
        else:
            path = Path(imported)
            model, info = models[name] = timer(f"import {name}", imported_model, path, test, cfg.train, log)
        where = stages[name] = {"model": str(path)}
        # A trained model's hash already names its data; an imported one may be applied to other data, so the data
        # is part of the names of the stages made from it.
        data_tag = [] if imported is None else [data]
        dkey = stage_key(info.sha256, to_dict(cfg.augment), *data_tag)
        layer = cfg.model.layer or default_layer(model)
        sets_dir = out / "evalsets" / f"{name}-{stage_key(info.sha256, attack_settings(cfg.attack), *data_tag)}"
        sets = timer(f"attack {name}", ensure_eval_sets, model, info, test, cfg.attack, sets_dir)
        notes.update({s.name: "transfer" if s.attack["kind"] != "clean" else "clean" for s in sets})
        rows_dir = out / "results" / results_key(cfg, info.sha256, dkey, layer, shards, with_rmc)
        where.update(evalsets=str(sets_dir), results=str(rows_dir / name))
        rows_wanted = with_rmc and wants_attack_rows(cfg.attack_rows)
        done = None if rows_wanted else finished_results(rows_dir / name, sets, cfg.rmc, cfg.attack.n, run_rmc,
                                                         shards, cfg.attack.rmc_n)
        if done is not None:
            done = _finished_batch(done, batch_names, cfg, info.sha256, name, sets, rows_dir)
        if done is not None:   # e.g. a base restored by studies/carry_run.py: its table needs no D'
            log(f"[evaluate {name}] every record is on disk: read, without rebuilding D' and its features")
            results[name] = done
            continue
        store = stores[name] = timer(f"augment {name}", build_dprime_store, model, info, train,
                                     out / "dprime" / f"{name}-{dkey}", cfg.augment, ray=ray, workers=workers)
        log(f"  D' of {name} = {len(store)} images: {', '.join(store.copy_names)}")
        dprime = store.dprime()
        feats_path = out / "features" / f"{name}-{stage_key(store.fingerprint, layer)}.npy"
        feats = timer(f"features {name}", ensure_features, model, info, layer, store, feats_path, cfg.features)
        where.update(dprime=str(store.path), features=str(feats_path))
        base = BaseModel(name, model, info.sha256, layer, feats, feats_path, cfg.knn)
        res = timer(f"evaluate {name}", evaluate, [base], dprime, sets, cfg.rmc, rows_dir,
                    info.num_classes, with_rmc=run_rmc, ray=ray, workers=workers, shards=shards, batch=batch,
                    block=block, rmc_n=cfg.attack.rmc_n, dprime_via=dprime_via)
        for defense in batch_names:   # a batch-transductive defense's column (DENT): one cheap pass per set
            timer(f"{defense} {name}", _batch_column, defense, cfg, base, sets, rows_dir, res[name])
        results.update(res)
        if rows_wanted:
            attack_rows[name] = timer(f"attack rows {name}", evaluate_attacks, base, dprime, sets, cfg.rmc,
                                      cfg.attack_rows, rows_dir, info.num_classes, res[name].get("clean"), log=log,
                                      defenses=cfg.defenses, settings={d: cfg.settings(d) for d in batch_names},
                                      brows=cfg.batch_rows)
        if name == cfg.model.bases[0]:
            timer("visualize", neighbour_grid, base, dprime, sets, out / "neighbours.png", cfg.visualize,
                  class_names=train.classes)

    table = Table.from_results(results, notes)
    if attack_rows:
        table.appendix.append(attack_table(attack_rows))
    meta = {"config": to_dict(cfg), "models": {n: dataclasses.asdict(i) for n, (_, i) in models.items()},
            "stores": {n: {"path": str(st.path), "fingerprint": st.fingerprint, "size": len(st),
                           "copies": st.copy_names, "model_sha256": st.model_sha256} for n, st in stores.items()},
            "stage_dirs": stages, "stages": timer.stages,
            "seconds_total": round(time.perf_counter() - t_start, 1), "table": table.to_dict(),
            "online_streams": online_streams(cfg.rmc, shards), "compute": compute_paths(results),
            "ray": ray, "workers": workers, "batch": batch}
    # The latest run's table (an earlier configuration's is re-made in seconds by re-running its command).
    write_text(out / "config.yaml", documented_yaml(cfg))
    write_json(out / "results.json", meta)
    write_text(out / "results.md", table.markdown())
    from rmc.evaluation.html_report import write_report
    try:   # the results are on disk already: a report that cannot be drawn must not fail the run
        timer("report", write_report, out, log=log)
    except RMCError as e:
        log(f"[report] not written: {e}")
    return table
