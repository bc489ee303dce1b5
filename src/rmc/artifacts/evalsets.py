"""Evaluation sets: clean test inputs and attacks on them crafted against the STATIC model.

These are the original paper's transfer setting (attacks made against the undefended network, then fed to
RMC). A directory holds one safetensors file per set plus `index.json`, which names the files, their hashes
and the source model, so a set made against one model is never silently scored against another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from rmc.attacks.gradient import check_attack_settings, fgsm, pgd, random_targets
from rmc.attacks.protocols import KINDS as AWARE_KINDS
from rmc.checks import check_images, check_labels, check_positive
from rmc.data.base import ImageDataset
from rmc.errors import RMCError
from rmc.io import check_free_space, load_tensors, read_json, save_tensors, sha256_file, write_json
from rmc.models import ModelInfo
from rmc.paths import inside
from rmc.schema import SHA256, Bool, Const, Int, ListOf, Name, Num, Obj, Opt, Str, check

INDEX = "index.json"
FORMAT = "rmc-evalsets/1"
KINDS = ("clean", "fgsm", "pgd")
# Every kind an index may name: these, and the sets the attack rows save in the same format
# (rmc.evaluation.attack_rows): transfer PGD and AutoAttack, AutoAttack rand, the defense-aware attacks.
INDEX_KINDS = KINDS + ("transfer-pgd", "transfer-autoattack", "rand-autoattack") + AWARE_KINDS
MAX_SETS = 10_000                   # sets in one index at most
MAX_INPUTS = 10 ** 9                # inputs in one set at most
# The fields rmc reads back from an index; the attack rows record further settings of their own (kept as they are).
_ATTACK = Obj({"kind": Str(INDEX_KINDS)},
              {"eps": Num(0, 1), "step_size": Opt(Num(0, 1)), "steps": Int(0, 10 ** 6), "targeted": Bool(),
               "random_start": Bool(), "seed": Int(0, 2 ** 64), "source_model_sha256": Str(max_len=128),
               "dataset": Str(max_len=200), "n": Int(0, MAX_INPUTS), "rounds": Int(0, 10 ** 6),
               "protocol": Str(max_len=200)})
_ENTRY = Obj({"name": Name(), "file": Name(), "sha256": SHA256, "attack": _ATTACK}, {"n": Int(0, MAX_INPUTS)})
INDEX_SCHEMA = Obj({"format": Const(FORMAT), "sets": ListOf(_ENTRY, 0, MAX_SETS)})


def _num(x: float) -> str:
    return f"{x:.6g}"


@dataclass(frozen=True)
class AttackSpec:
    """One evaluation set to make. PGD's step size defaults to Madry et al.'s 2.5 * eps / steps."""
    kind: str = "clean"                # "clean", "fgsm" or "pgd"
    eps: float = 0.0                   # L-inf radius in [0, 1] pixel units
    steps: int = 0                     # PGD iterations (FGSM: 1)
    step_size: float | None = None     # PGD step; None: 2.5 * eps / steps
    targeted: bool = False             # towards a random wrong class (shared by all targeted sets)
    random_start: bool = True          # PGD only: uniform start in the eps-ball

    def resolved(self) -> "AttackSpec":
        """Validated copy with FGSM/PGD defaults filled in."""
        if self.kind not in KINDS:
            raise RMCError(f"unknown attack kind {self.kind!r}; use one of {list(KINDS)}")
        if self.kind == "clean":
            return AttackSpec("clean", 0.0, 0, None, False, False)
        if self.kind == "fgsm":
            check_attack_settings(self.eps, self.eps, 1)
            return AttackSpec("fgsm", float(self.eps), 1, float(self.eps), self.targeted, False)
        check_positive(self.steps, "PGD steps", integer=True)
        check_positive(self.eps, "eps")
        step = self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps
        check_attack_settings(self.eps, step, self.steps)
        return AttackSpec("pgd", float(self.eps), self.steps, float(step), self.targeted, self.random_start)

    @property
    def name(self) -> str:
        s = self.resolved()
        if s.kind == "clean":
            return "clean"
        if s.kind == "fgsm":
            base = f"fgsm-eps{_num(s.eps)}"
        else:
            base = f"pgd{s.steps}-eps{_num(s.eps)}"
            step = cast(float, s.step_size)   # resolved: PGD's step is filled in
            if abs(step - 2.5 * s.eps / s.steps) > 1e-12:
                base += f"-step{_num(step)}"
            if not s.random_start:
                base += "-norand"
        return base + ("-targeted" if s.targeted else "")

    @classmethod
    def parse_pgd(cls, text: str, targeted: bool = False, random_start: bool = True) -> "AttackSpec":
        """`steps:eps` or `steps:eps:step_size`; eps and step may be fractions such as 8/255."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise RMCError(f"PGD setting {text!r} is not steps:eps or steps:eps:step (e.g. 10:0.1 or 40:8/255:1/255)")
        try:
            steps = int(parts[0])
        except ValueError:
            raise RMCError(f"PGD setting {text!r}: steps {parts[0]!r} is not an integer (e.g. 10:0.1)") from None
        eps = parse_number(parts[1], "eps")
        step = parse_number(parts[2], "step size") if len(parts) == 3 else None
        return cls("pgd", eps, steps, step, targeted, random_start).resolved()


def parse_number(text: str, what: str = "value") -> float:
    """A float or a fraction `a/b` (attack budgets are often written as 8/255)."""
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise RMCError(f"{what} {text!r} is not a number (write e.g. 0.1 or 8/255)") from None


@dataclass
class EvalSet:
    name: str
    images: torch.Tensor               # float32 N x C x H x W in [0, 1]
    labels: torch.Tensor               # int64 (N,): true classes
    targets: torch.Tensor | None       # int64 (N,): attacker's classes, targeted sets only
    indices: torch.Tensor              # int64 (N,): positions in the test split
    attack: dict[str, Any] = field(default_factory=dict)   # kind, eps, step_size, steps, targeted, ...

    def __len__(self) -> int:
        return len(self.labels)


def select_test_inputs(test: ImageDataset, n: int, seed: int) -> torch.Tensor:
    """Indices of the first `n` of a seeded permutation of the test split."""
    check_positive(n, "n (number of test inputs)", integer=True)
    if n > len(test):
        raise RMCError(f"asked for {n} test inputs but the test split has {len(test)}; lower --n (rmc run: attack.n)")
    return torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]


def _stream_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "big")


def make_eval_sets(model: nn.Module, model_info: ModelInfo, test: ImageDataset, n: int,
                   attacks: list[AttackSpec], seed: int = 0, batch_size: int = 500,
                   progress=None) -> list[EvalSet]:
    """Craft each attack in `attacks` against `model` on the same `n` seeded test inputs.

    `progress(name)` is called before each set is made. The model is put in eval mode.
    """
    if not isinstance(seed, int) or seed < 0:
        raise RMCError(f"seed must be an integer >= 0, got {seed!r}")
    specs = [a.resolved() for a in attacks]
    names = [s.name for s in specs]
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise RMCError(f"attack list repeats {dupes}; give each setting once")
    if tuple(test.input_shape) != tuple(model_info.input_shape):
        raise RMCError(f"test images are {tuple(test.input_shape)} (C x H x W) but the model was trained on "
                       f"{tuple(model_info.input_shape)}; use the data set the model was trained on")
    idx = select_test_inputs(test, n, seed)
    x = check_images(test.images[idx], "test images", shape=model_info.input_shape)
    y = check_labels(test.labels[idx], len(x), model_info.num_classes, "test labels")
    # One seeded target per input, shared by every targeted set so their rows are comparable.
    targets = random_targets(y, model_info.num_classes, torch.Generator().manual_seed(seed + 1))
    device = next(model.parameters()).device
    model.eval()
    out = []
    for spec in specs:
        name = spec.name
        if progress is not None:
            progress(name)
        tgt = targets if spec.targeted else None
        if spec.kind == "clean":
            adv = x.clone()
        elif spec.kind == "fgsm":
            adv = fgsm(model, x.to(device), y.to(device), spec.eps,
                       targets=None if tgt is None else tgt.to(device), batch_size=batch_size).cpu()
        else:
            # Each set's noise stream depends only on (seed, name): adding or removing a set changes no other.
            gen = torch.Generator().manual_seed(_stream_seed(seed, name))
            adv = pgd(model, x.to(device), y.to(device), spec.eps, cast(float, spec.step_size), spec.steps,
                      random_start=spec.random_start, targets=None if tgt is None else tgt.to(device),
                      generator=gen, batch_size=batch_size).cpu()
        attack = {"kind": spec.kind, "eps": spec.eps, "step_size": spec.step_size, "steps": spec.steps,
                  "targeted": spec.targeted, "random_start": spec.random_start, "seed": seed,
                  "source_model_sha256": model_info.sha256, "dataset": test.name, "n": len(idx)}
        out.append(EvalSet(name, adv.contiguous(), y.clone(), None if tgt is None else tgt.clone(), idx.clone(),
                           attack))
    return out


def _file_name(name: str) -> str:
    return name + ".safetensors"   # a plain name (checked on save): one file in the folder


def _origin(attack: dict) -> tuple:
    return tuple(attack.get(k) for k in ("source_model_sha256", "dataset", "n", "seed"))


def save_eval_sets(directory: str | Path, sets: list[EvalSet]) -> Path:
    """Write one safetensors per set and `index.json` (last, so a complete index means complete files).

    Sets already listed in an existing index and not among `sets` are kept; all must share one origin.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RMCError(f"{directory} exists and is not a directory; choose another --out")
    for s in sets:   # what is written must read back: checked before any file is
        check({"name": s.name, "attack": s.attack}, Obj({"name": Name(), "attack": _ATTACK}),
              f"evaluation set {s.name!r}", f"give it a plain name and an attack kind among {list(INDEX_KINDS)}")
    entries = {}
    if (directory / INDEX).exists():
        entries = {e["name"]: e for e in _read_index(directory)["sets"]}
    # Every set in one directory must come from the same model and the same test inputs; check before writing.
    origins = {_origin(s.attack) for s in sets} | {_origin(e["attack"]) for n, e in entries.items()
                                                   if n not in {s.name for s in sets}}
    if len(origins) > 1:
        raise RMCError(f"{directory} would mix sets made against different models or test inputs "
                       "(model, dataset, n or seed differ); write to a new --out")
    check_free_space(directory, sum(4 * s.images.numel() + 32 * len(s) for s in sets) + (1 << 16),
                     "the evaluation sets")
    directory.mkdir(parents=True, exist_ok=True)
    for s in sets:
        tensors = {"images": check_images(s.images, f"eval set {s.name!r} images").float(),
                   "labels": s.labels.long(), "indices": s.indices.long()}
        if s.targets is not None:
            tensors["targets"] = s.targets.long()
        path = directory / _file_name(s.name)
        save_tensors(path, tensors, metadata={"name": s.name, "attack": json.dumps(s.attack, sort_keys=True)})
        entries[s.name] = {"name": s.name, "file": path.name, "sha256": sha256_file(path), "n": len(s),
                           "attack": s.attack}
    write_json(directory / INDEX, {"format": FORMAT, "sets": list(entries.values())})
    return directory


def _read_index(directory: Path) -> dict:
    """The index of `directory`, every field checked (it names files and, through the set names, output folders)."""
    where = directory / INDEX
    index = read_json(where, "evaluation-set index")
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("sets"), list):
        raise RMCError(f"{where} is not an rmc evaluation-set index; re-create it with `rmc attack`")
    check(index, INDEX_SCHEMA, where, "re-create the sets with `rmc attack`")
    names = [e["name"] for e in index["sets"]]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RMCError(f"{where} lists the set(s) {twice} more than once; re-create the sets with `rmc attack`")
    return index


def list_eval_sets(directory: str | Path) -> list[str]:
    directory = Path(directory)
    if not directory.is_dir():
        raise RMCError(f"evaluation-set directory {directory} not found; write it with `rmc attack --out {directory}`")
    return [e["name"] for e in _read_index(directory)["sets"]]


def load_eval_sets(directory: str | Path, names: list[str] | None = None,
                   model_sha256: str | None = None) -> list[EvalSet]:
    """Load (a subset of) the sets in `directory`, checking hashes, shapes, ranges and that all sets share
    the same test inputs. `model_sha256`, if given, must be the model the sets were made against."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RMCError(f"evaluation-set directory {directory} not found; write it with `rmc attack --out {directory}`")
    index = _read_index(directory)
    entries = {e["name"]: e for e in index["sets"]}
    if names is None:
        names = list(entries)
    missing = [n for n in names if n not in entries]
    if missing:
        raise RMCError(f"{directory} has no evaluation set(s) {missing}; it has {sorted(entries)}")
    out: list[EvalSet] = []
    for name in names:
        e = entries[name]
        path = inside(directory, e["file"], f"the file of set {name!r}", directory / INDEX)
        if not path.exists():
            raise RMCError(f"evaluation set file {path} is missing; re-create the sets with `rmc attack`")
        if sha256_file(path) != e["sha256"]:
            raise RMCError(f"evaluation set file {path} does not match {INDEX} (hash differs): it is corrupt or "
                           "was replaced; re-create the sets with `rmc attack`")
        t = load_tensors(path, "evaluation set file")
        if not {"images", "labels", "indices"} <= set(t):
            raise RMCError(f"{path} lacks images, labels or indices; re-create it with `rmc attack`")
        images = check_images(t["images"], f"eval set {name!r} images")
        labels = check_labels(t["labels"], len(images), name=f"eval set {name!r} labels")
        indices = check_labels(t["indices"], len(images), name=f"eval set {name!r} indices")
        targets = t.get("targets")
        if targets is not None:
            targets = check_labels(targets, len(images), name=f"eval set {name!r} targets")
        if e["attack"].get("targeted") and targets is None:
            raise RMCError(f"{path} is a targeted set without targets; re-create it with `rmc attack`")
        if model_sha256 and e["attack"].get("source_model_sha256") != model_sha256:
            raise RMCError(f"evaluation set {name!r} was made against another model (sha256 differs); "
                           "run `rmc attack` with this model")
        if out:
            ref = out[0]
            if (images.shape != ref.images.shape or not torch.equal(labels, ref.labels)
                    or not torch.equal(indices, ref.indices)):
                raise RMCError(f"evaluation sets {ref.name!r} and {name!r} are not made from the same test "
                               f"inputs; re-create {directory} with one `rmc attack` run")
        out.append(EvalSet(name, images, labels, targets, indices, dict(e["attack"])))
    return out
