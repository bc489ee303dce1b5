"""`rmc run`: train -> augment -> features -> attack -> evaluate -> visualize, into one run directory.

Every stage reuses what an earlier (possibly interrupted) run with the same settings left behind, and refuses
artifacts made with other settings, so re-running the same command resumes. Layout of a run directory:

    config.yaml                      the resolved configuration
    models/<base>.safetensors/.json  base models ("standard", and "adversarial" if enabled)
    dprime/<base>/                   each base model's augmented dataset D', crafted against it (.npy + manifest.json)
    features/<base>-dprime.npy/.json D' features from each base model's feature layer
    evalsets/<base>/                 evaluation sets made against each base model (transfer attacks)
    results/<base>/<set>/            per-example results (resumable)
    results.json, results.md         the table and its metadata
    neighbours.png                   test inputs beside their nearest neighbours in D'
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import yaml

from rmc.artifacts.dprime import build_dprime_store
from rmc.artifacts.evalsets import AttackSpec, load_eval_sets, make_eval_sets, save_eval_sets
from rmc.artifacts.features import ensure_features
from rmc.cli.config import RunConfig, documented_yaml, to_dict, validate_before_work
from rmc.data import load_dataset
from rmc.errors import RMCError
from rmc.evaluation.common import BaseModel
from rmc.evaluation.driver import check_work_split, evaluate, online_streams
from rmc.evaluation.report import Table
from rmc.io import read_json, write_json, write_text
from rmc.models import default_layer, load_checkpoint, save_checkpoint
from rmc.models.checkpoint import meta_path
from rmc.scaleout.executors import hold
from rmc.training import train_model


class StageTimer:
    """Logs what each stage did and how long it took (kept in results.json)."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.stages = log, []

    def __call__(self, name: str, fn: Callable, *args, **kwargs):
        self.log(f"[{name}] ...")
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        self.stages.append({"stage": name, "seconds": round(seconds, 1)})
        self.log(f"[{name}] done in {seconds:.0f} s")
        return out


def ensure_model(path: Path, train, test, cfg, log):
    """Load the base model at `path` if it was trained with `cfg`; else train and save it."""
    want = to_dict(cfg)
    if path.exists() and meta_path(path).exists():
        meta = read_json(meta_path(path), "model metadata")
        if meta.get("config") != want:
            raise RMCError(f"{path} was trained with other settings; use a new --out or delete {path.parent}")
        model, info = load_checkpoint(path, cfg.device, trust_arch=cfg.arch)   # the run's own config names it
        log(f"  reusing {path} (test accuracy {info.test_accuracy:.4f})")
        return model, info
    model, info = train_model(train, test, cfg)
    info.config = want
    info = save_checkpoint(model, info, path)
    log(f"  {path}: clean test accuracy {info.test_accuracy:.4f}")
    return model, info


def attack_specs(cfg) -> list[AttackSpec]:
    if cfg.pgd and not (cfg.untargeted or cfg.targeted):
        raise RMCError("attack.untargeted and attack.targeted are both false, so attack.pgd makes no set; "
                       "set one of them to true or attack.pgd to []")
    specs = [AttackSpec("clean")] + [AttackSpec("fgsm", eps=float(e)) for e in cfg.fgsm_eps]
    for pair in cfg.pgd:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RMCError(f"attack.pgd entries are [steps, eps] pairs, got {pair!r}")
        steps, eps = int(pair[0]), float(pair[1])
        for targeted in [t for t, on in ((False, cfg.untargeted), (True, cfg.targeted)) if on]:
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
                 shards: int = 1, batch: int = 1, block: int | None = None) -> Table:
    """`ray` ("local" or a cluster address): augmentation chunks and RMC's per-input work run as Ray tasks (one Ray
    session for the whole run); `shards`: independent online streams per test stream, `batch`: episodic inputs
    adapted at once (see rmc.evaluation.driver)."""
    check_work_split(batch, cfg.rmc, ray, shards, block)      # before hours of work, not after
    validate_before_work(cfg)                                 # and before config.yaml is written
    t0 = time.perf_counter()
    with hold(ray, workers) as slots:
        if ray is not None:
            log(f"[ray] {slots} workers ready in {time.perf_counter() - t0:.1f} s ({ray})")
        return _run(cfg, Path(out), log, with_rmc, ray, workers, shards, batch, block)


def _run(cfg: RunConfig, out: Path, log: Callable[[str], None], with_rmc: bool, ray: str | None,
         workers: int | None, shards: int, batch: int, block: int | None) -> Table:
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.yaml"
    if saved.exists() and yaml.safe_load(saved.read_text()) != to_dict(cfg):
        raise RMCError(f"{out} holds a run with another configuration ({saved}); use a new --out to start a "
                       "new run, or the same settings to resume it")
    write_text(saved, documented_yaml(cfg))
    timer = StageTimer(log)
    t_start = time.perf_counter()
    train = load_dataset(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.image_size)
    test = load_dataset(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.image_size)
    if cfg.data.dataset == "digits":
        cfg.rmc.calib_flip = False   # a flipped digit is another (or no) digit

    base_cfgs = {"standard": dataclasses.replace(cfg.train, adversarial=False)}
    if cfg.model.adversarial_base:
        base_cfgs["adversarial"] = dataclasses.replace(cfg.train, adversarial=True)
    models = {name: timer(f"train {name}", ensure_model, out / "models" / f"{name}.safetensors", train, test, c, log)
              for name, c in base_cfgs.items()}

    results, notes = {}, {}
    attack_rows = {}   # base -> the attack rows (transfer / defense-aware), rmc.evaluation.attack_rows
    stores = {}        # base -> its own D', crafted against it (the original's principle)
    for name, (model, info) in models.items():
        store = stores[name] = timer(f"augment {name}", build_dprime_store, model, info, train, out / "dprime" / name,
                                     cfg.augment, ray=ray, workers=workers)
        log(f"  D' of {name} = {len(store)} images: {', '.join(store.copy_names)}")
        dprime = store.dprime()
        layer = cfg.model.layer or default_layer(model)
        feats = timer(f"features {name}", ensure_features, model, info, layer, store,
                      out / "features" / f"{name}-dprime.npy")
        sets = timer(f"attack {name}", ensure_eval_sets, model, info, test, cfg.attack, out / "evalsets" / name)
        base = BaseModel(name, model, info.sha256, layer, feats)
        res = timer(f"evaluate {name}", evaluate, [base], dprime, sets, cfg.rmc, out / "results",
                    info.num_classes, with_rmc=with_rmc, ray=ray, workers=workers, shards=shards, batch=batch,
                    block=block)
        results.update(res)
        from rmc.evaluation.attack_rows import evaluate_attacks, wants_attack_rows
        if with_rmc and wants_attack_rows(cfg.attack_rows):
            attack_rows[name] = timer(f"attack rows {name}", evaluate_attacks, base, dprime, sets, cfg.rmc, cfg.attack_rows,
                                      out / "results", info.num_classes, res[name].get("clean"), log=log)
        notes.update({s.name: "transfer" if s.attack["kind"] != "clean" else "clean" for s in sets})
        if name == "standard":
            from rmc.evaluation.visualize import neighbour_grid
            timer("visualize", neighbour_grid, base, dprime, sets, out / "neighbours.png", cfg.visualize,
                  class_names=train.classes)

    table = Table.from_results(results, notes)
    if attack_rows:
        from rmc.evaluation.attack_rows import attack_table
        table.appendix.append(attack_table(attack_rows))
    meta = {"config": to_dict(cfg), "models": {n: dataclasses.asdict(i) for n, (_, i) in models.items()},
            "stores": {n: {"path": str(st.path), "fingerprint": st.fingerprint, "size": len(st), "copies": st.copy_names,
                           "model_sha256": st.model_sha256} for n, st in stores.items()}, "stages": timer.stages,
            "seconds_total": round(time.perf_counter() - t_start, 1), "table": table.to_dict(),
            "online_streams": online_streams(cfg.rmc, shards), "ray": ray, "workers": workers, "batch": batch}
    write_json(out / "results.json", meta)
    write_text(out / "results.md", table.markdown())
    return table
