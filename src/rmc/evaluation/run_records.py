"""Read a run directory's records for `rmc report`, streaming, and say what is missing.

What it reads (the layout of rmc.cli.pipeline): config.yaml, results.json, evalsets/<base>/index.json and
results/<base>/attack-sets/index.json (each set's attack settings), results/<base>/<set>/baselines.json and the RMC
record streams (rmc.jsonl, or rmc.stream<s>of<S>.jsonl), attack.jsonl of the defense-aware rows, and single images
of the evaluation sets (read by index from their safetensors files, never the whole file). It never opens model
weights or online states. Whatever is absent or unreadable is named in `missing` instead of failing, so a
partial run still gets a report; a directory that is not a run at all raises a one-line RMCError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import cast

import torch
import yaml

from rmc.artifacts.evalsets import INDEX_SCHEMA
from rmc.attacks.kinds import ATTACK_KINDS
from rmc.data import class_names
from rmc.defense.registry import DEFENSES, RMC, STATIC, baselines, selectable
from rmc.errors import RMCError
from rmc.evaluation.records import RECORD, check_record
from rmc.io import read_json
from rmc.paths import inside
from rmc.schema import Bool, Int, Lazy, ListOf, MapOf, Name, Obj, Spec, Str, check

CLEAN, TRANSFER, AWARE = "clean", "transfer", "defense-aware"
AWARE_KINDS = ATTACK_KINDS.names()                      # defense-aware attacks (rmc.attacks.kinds)
STAGE_KEY = re.compile(r"[0-9a-f]{8}")                  # a stage folder's key (rmc.cli.pipeline.stage_key)


@dataclass
class SetInfo:
    """One evaluation set of one base model, as the report sees it."""
    base: str
    name: str
    attack: dict                  # the set's attack settings from its index (empty if the index is missing)
    folder: Path                  # results/<base>/<name>/
    images: Path | None           # the set's safetensors file

    @property
    def kind(self) -> str:
        k = self.attack.get("kind", "clean" if self.name == "clean" else "")
        return CLEAN if k == "clean" else AWARE if k in AWARE_KINDS else TRANSFER

    @property
    def defense(self) -> str:
        """The defense a defense-aware set was crafted against (sets made before others existed: RMC)."""
        return str(self.attack.get("defense", RMC))

    @property
    def eps(self) -> float | None:
        return 0.0 if self.kind == CLEAN else self.attack.get("eps")

    @property
    def targeted(self) -> bool:
        return bool(self.attack.get("targeted"))

    @property
    def n(self) -> int | None:
        return self.attack.get("n")

    @property
    def attack_row(self) -> bool:
        """One of the attack rows (rmc.evaluation.attack_rows), not of the main table."""
        k = self.attack.get("kind", "")
        return k.startswith("transfer-") or k in AWARE_KINDS

    @property
    def family(self) -> str:
        """The attack without its eps: the points of one curve (e.g. "PGD-10", "PGD-10 targeted", "GMSA-MIN r5")."""
        a, k = self.attack, self.attack.get("kind", "")
        if k in ("pgd", "transfer-pgd"):
            text = f"PGD-{a.get('steps')}"
        elif k == "fgsm":
            text = "FGSM"
        elif k == "transfer-autoattack":
            text = "AutoAttack"
        elif k in AWARE_KINDS:
            text = ATTACK_KINDS[k].label + (f" r{a['rounds']}" if a.get("rounds") else "")   # a runner has none
        else:
            text = k or self.name
        if self.attack_row:
            text += f" (attack rows, N={a.get('n')})"
        return text + (" targeted" if self.targeted else "")


def _read_json(path: Path, missing: list[str]):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        missing.append(f"{path.name} ({path.parent})")
    except (ValueError, RecursionError, OSError) as e:
        missing.append(f"{path} is unreadable ({type(e).__name__})")
    return None


FIX = "the run directory is damaged or was not written by rmc: re-run `rmc run` into it, or delete the file"


class _Rate(Spec):
    """A rate of the table: hits and n, 0 <= hits <= n."""

    def __call__(self, value, at):
        Obj({"hits": Int(0), "n": Int(0)})(value, at)
        if value["hits"] > value["n"]:
            at.child("hits").fail(f"at most n ({value['n']})", value["hits"])
        return value


_RATE = _Rate()
TABLE: Spec = Obj({}, {"title": Str(), "columns": ListOf(Str()), "column_notes": MapOf(Str(), Str()), "corner": Str(),
                 "notes": ListOf(Str()),
                 "rows": MapOf(Str(), MapOf(Str(), Obj({"accuracy": _RATE}, {"attack_success": _RATE}))),
                 "appendix": ListOf(Lazy(lambda: TABLE), 0, 64)})
# What `rmc report` reads of results.json: the table, and where each base model's stages are.
RESULTS = Obj({}, {"table": TABLE, "stage_dirs": MapOf(Name(), MapOf(Str(("model", "dprime", "features", "evalsets",
                                                                          "results")), Str(empty=False)))})
# What it reads of config.yaml (the rest is shown as it is).
CONFIG = Obj({}, {"data": Obj({}, {"dataset": Str(max_len=200)}), "rmc": Obj({}, {"mode": Str(max_len=200)}),
                  "model": Obj({}, {"bases": ListOf(Name()), "adversarial_base": Bool()})})
BASELINE_RECORDS = Obj({}, {"fingerprint": Str(max_len=200), **{d: ListOf(RECORD) for d in baselines()}})
BATCH_RECORDS = Obj({"records": ListOf(RECORD)}, {"fingerprint": Str(max_len=200)})   # <defense>.json


def read_results(path: Path) -> dict:
    """A run's results.json, the fields `rmc report` uses checked."""
    return check(read_json(path, "run results"), RESULTS, path, FIX)


# The stage folders of one base model in a run directory (rmc.cli.pipeline names them by their inputs' key).
STAGE_GLOBS = {"model": "models/{base}-*.safetensors", "dprime": "dprime/{base}-*", "features": "features/{base}-*.npy",
               "evalsets": "evalsets/{base}-*", "results": "results/*/{base}"}


def stage_folder(root: Path, results: dict | None, base: str, kind: str) -> Path | None:
    """`base`'s folder (or file) of stage `kind` (a STAGE_GLOBS key): the one results.json names (`stage_dirs`,
    re-rooted here: the run may have moved or been made with a relative --out), else the newest of its kind (a run
    still going), else None. Never a path that leads out of `root` (a link included)."""
    where = ((results or {}).get("stage_dirs") or {}).get(base, {}).get(kind)
    source = root / "results.json"
    if where:
        # Only the names rmc run gives its stage folders are followed, re-rooted: results/<key>/<base>, else
        # <kind folder>/<base>-<key>[.ext] (STAGE_GLOBS).
        parts = Path(where).parts
        pattern = re.escape(STAGE_GLOBS[kind].split("/")[-1].format(base=base)).replace(r"\*", "[0-9a-f]{8}")
        if kind == "results":
            ok = len(parts) >= 2 and STAGE_KEY.fullmatch(parts[-2]) is not None and parts[-1] == base
            rel = f"results/{parts[-2]}/{base}" if ok else ""
        else:
            ok = bool(parts) and re.fullmatch(pattern, parts[-1]) is not None
            rel = f"{STAGE_GLOBS[kind].split('/')[0]}/{parts[-1]}" if ok else ""
        if not ok:
            raise RMCError(f"{source}: stage_dirs.{base}.{kind} is {where[:60]!r}, not a stage folder of `rmc run` "
                           f"({STAGE_GLOBS[kind].format(base=base).replace('*', '<key>')}); {FIX}")
        return inside(root, rel, f"stage_dirs.{base}.{kind}", source)
    found = sorted(root.glob(STAGE_GLOBS[kind].format(base=base)), key=lambda p: p.stat().st_mtime)
    return inside(root, str(found[-1].relative_to(root)), f"the {kind} folder of {base}") if found else None


def stage_folders(run: str | Path, base: str = "standard") -> dict[str, Path]:
    """Every stage folder of `base` in a run directory, by kind (model, dprime, features, evalsets, results): those
    of the latest finished run, else, for a run still going, the newest of each kind."""
    run = Path(run)
    if not run.is_dir():
        raise RMCError(f"run directory {run} not found; run `rmc run --out {run}` first")
    results = None
    if (run / "results.json").exists():
        results = read_results(run / "results.json")
    folders = {kind: stage_folder(run, results, base, kind) for kind in STAGE_GLOBS}
    found = {k: v for k, v in folders.items() if v is not None}
    if not found:
        raise RMCError(f"{run} holds no stage of base model {base!r}; is it a run directory of `rmc run`?")
    return found


class RunRecords:
    """The records of one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()   # what it holds is followed only inside it, links resolved
        if not self.root.is_dir():
            raise RMCError(f"run directory {self.root} not found; pass the --out of an `rmc run`")
        if not (self.root / "results").is_dir() and not (self.root / "results.json").exists():
            raise RMCError(f"{self.root} holds no results (no results/ folder, no results.json): not an `rmc run` "
                           "directory, or its evaluation has not started")
        self.missing: list[str] = []
        self.config = self._config()
        self.results = None
        if (self.root / "results.json").exists():
            self.results = _read_json(self.root / "results.json", self.missing)
            if self.results is not None:
                self.results = check(self.results, RESULTS, self.root / "results.json", FIX)
        else:
            self.missing.append("results.json (the run has not finished: tables are rebuilt from the records)")
        self.sets = self._sets()

    def _config(self) -> dict:
        path = self.root / "config.yaml"
        if not path.exists():
            self.missing.append("config.yaml (settings unknown)")
            return {}
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, ValueError, RecursionError):
            self.missing.append("config.yaml is unreadable (settings unknown)")
            return {}
        return check(loaded, CONFIG, path, FIX)

    @property
    def dataset(self) -> str:
        return (self.config.get("data") or {}).get("dataset") or "unknown"

    @property
    def mode(self) -> str:
        return (self.config.get("rmc") or {}).get("mode") or "unknown"

    @cached_property
    def class_names(self) -> list[str]:
        return class_names(self.dataset)

    def class_name(self, c: int) -> str:
        return self.class_names[c] if 0 <= c < len(self.class_names) else str(c)

    @property
    def bases(self) -> list[str]:
        return list(dict.fromkeys(s.base for s in self.sets))

    @property
    def config_bases(self) -> list[str]:
        """Base models in the configuration's order (model.bases; older runs: standard, adversarial)."""
        model = self.config.get("model") or {}
        return list(model.get("bases") or ["standard"] + (["adversarial"] if model.get("adversarial_base") else []))

    def _index(self, folder: Path) -> dict[str, dict]:
        """{set name: index entry} of an evaluation-set folder; {} (and a note) if missing or unreadable."""
        if not folder.is_dir():
            self.missing.append(f"{folder.relative_to(self.root)}/ (attack settings unknown: no eps on the curve)")
            return {}
        index = _read_json(folder / "index.json", self.missing)
        if index is None:
            return {}
        check(index, INDEX_SCHEMA, folder / "index.json", FIX)
        return {e["name"]: e for e in index["sets"]}

    def _folders(self) -> list[tuple[str, Path, Path]]:
        """(base, its results folder, its evaluation-set folder). Layouts: results/<key>/<base>/ with
        evalsets/<base>-<key>/ (the stage-keyed runs: results.json names the latest, else the newest), and the
        older results/<base>/ with evalsets/<base>/."""
        results = self.root / "results"
        keyed = {p.name for p in results.glob("*/*") if p.is_dir() and STAGE_KEY.fullmatch(p.parent.name)}
        def order(b: str) -> tuple[int, str]:
            return (self.config_bases.index(b) if b in self.config_bases else len(self.config_bases), b)

        out = []
        if keyed:
            for base in sorted(keyed, key=order):
                # keyed bases have a results/<key>/<base> folder, so one is found
                res = cast(Path, stage_folder(self.root, self.results, base, "results"))
                sets = stage_folder(self.root, self.results, base, "evalsets") or self.root / "evalsets" / base
                others = [p for p in results.glob(f"*/{base}") if p != res]
                if others:
                    self.missing.append(f"results of {len(others)} other configuration(s) of base {base} under "
                                        f"results/ are not shown (this page shows {res.relative_to(self.root)})")
                out.append((base, res, sets))
            return out
        bases = sorted((p.name for p in results.iterdir() if p.is_dir()) if results.is_dir() else [], key=order)
        return [(b, results / b, self.root / "evalsets" / b) for b in bases]

    def _sets(self) -> list[SetInfo]:
        folders = self._folders()
        if not folders:
            self.missing.append("results/ (no per-input records)")
        out = []
        for base, res, sets_dir in folders:
            known = set()
            for folder, entries in ((sets_dir, self._index(sets_dir)),
                                    (res / "attack-sets", self._index(res / "attack-sets")
                                     if (res / "attack-sets").exists() else {})):
                for name, e in entries.items():
                    known.add(name)
                    info = SetInfo(base, name, e["attack"], inside(res, name, "a set's records", folder),
                                   inside(folder, e["file"], f"the file of set {name!r}", folder / "index.json"))
                    if not info.folder.is_dir():
                        self.missing.append(f"{info.folder.relative_to(self.root)}/ (set not evaluated yet)")
                    out.append(info)
            for p in sorted(res.iterdir()) if res.is_dir() else []:
                if p.is_dir() and p.name != "attack-sets" and p.name not in known:
                    out.append(SetInfo(base, p.name, {}, inside(res, p.name, "a set's records"), None))
        return out

    # -- records -----------------------------------------------------------------------------------------
    def baselines(self, s: SetInfo) -> dict[str, list[dict]]:
        """{"undefended"|"deepnn"|"webnn": records} of a set ({} and a note if missing). A set crafted against a
        batch defense has none: only that defense scores it (rmc.evaluation.batch_defense)."""
        if self.batch_scored(s):
            return {}
        path = s.folder / "baselines.json"
        data = _read_json(path, self.missing) if s.folder.is_dir() else None
        if data is None:
            return {}
        check(data, BASELINE_RECORDS, path, FIX)
        return {k: data[k] for k in baselines() if k in data}

    def rmc_streams(self, s: SetInfo) -> list[Path]:
        one = s.folder / "rmc.jsonl"
        return [one] if one.exists() else sorted(s.folder.glob("rmc.stream*of*.jsonl"))

    def iter_jsonl(self, path: Path) -> Iterator[dict]:
        """Records of one stream, one line at a time; a torn or corrupt line ends the stream (and is noted)."""
        with open(path) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    self.missing.append(f"{path.relative_to(self.root)}: line {i + 1} is corrupt; records after it "
                                        "are left out")
                    return
                yield check_record(rec, path, i + 1)

    def rmc(self, s: SetInfo) -> Iterator[dict]:
        """RMC's records of a set, stream by stream (each in input order)."""
        for path in self.rmc_streams(s):
            yield from self.iter_jsonl(path)

    def attack(self, s: SetInfo) -> Iterator[dict]:
        path = s.folder / "attack.jsonl"
        if path.exists():
            yield from self.iter_jsonl(path)

    def records(self, s: SetInfo) -> dict[str, list[dict]]:
        """Every defense's records of a set (RMC sorted by index), for the tables and the curve: baselines, then
        RMC. Only the fields the tables need are kept, so even large runs stay small in memory."""
        keep = ("index", "label", "pred", "target")
        def slim(r: dict) -> dict:
            return {k: r[k] for k in keep if k in r}

        out = {k: [slim(r) for r in v] for k, v in self.baselines(s).items()}
        rmc = sorted((slim(r) for r in self.rmc(s)), key=lambda r: r["index"])
        if rmc:
            out[RMC] = rmc
        for name in selectable():
            batch = sorted((slim(r) for r in self.batch_defense(s, name)), key=lambda r: r["index"])
            if batch:
                out[name] = batch
        return out

    def batch_defense(self, s: SetInfo, name: str) -> list[dict]:
        """The records of a defense evaluated a batch at a time (`<name>.json`, rmc.evaluation.batch_defense);
        [] if it did not run on this set (and a note if its file is unreadable)."""
        path = s.folder / f"{name}.json"
        if name == RMC or not path.exists():
            return []
        data = _read_json(path, self.missing)
        return [] if data is None else check(data, BATCH_RECORDS, path, FIX)["records"]

    def incomplete(self) -> list[str]:
        """Sets whose RMC records cover fewer inputs than the set has (a run still under way or stopped)."""
        out = []
        for s in self.sets:
            if not s.folder.is_dir():
                continue
            n = s.n or len(self.baselines(s).get(STATIC, []))
            who = s.defense if self.batch_scored(s) else RMC
            done = len(self.batch_defense(s, who)) if self.batch_scored(s) else sum(1 for _ in self.rmc(s))
            if n and done < n:
                out.append(f"{s.folder.relative_to(self.root)}/: {DEFENSES.label(who)} has {done} of {n} inputs")
        return out

    @staticmethod
    def batch_scored(s: SetInfo) -> bool:
        """A defense-aware set crafted against another defense than RMC: scored by that defense alone."""
        return s.kind == AWARE and s.defense != RMC

    # -- images ------------------------------------------------------------------------------------------
    def images(self, s: SetInfo, indices: list[int]) -> torch.Tensor | None:
        """The set's images at `indices` (read one by one from the safetensors file), or None if unavailable."""
        if s.images is None or not s.images.is_file():
            return None
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(s.images), "pt") as f:
                sl = f.get_slice("images")
                return torch.stack([sl[i:i + 1][0] for i in indices]) if indices else None
        except (SafetensorError, OSError, ValueError, IndexError):
            self.missing.append(f"{s.images.relative_to(self.root)} is unreadable (inputs not shown)")
            return None


__all__ = ["AWARE", "CLEAN", "TRANSFER", "RunRecords", "SetInfo"]
