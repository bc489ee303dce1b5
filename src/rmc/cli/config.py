"""The configuration of `rmc run`: one YAML file, every hyperparameter defined once (in the dataclasses below
and in those of training, store and core), each with a comment saying what it does.

`rmc run --print-config` writes the defaults as YAML with those comments, read from the source itself.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import inspect
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rmc.artifacts.dprime import AugmentConfig, select_subset
from rmc.artifacts.features import FeatureConfig
from rmc.attacks.batch_aware import BatchRowsConfig
from rmc.attacks.defense_aware import AttackRowsConfig
from rmc.checks import check_positive
from rmc.data import DATASETS, DEFAULT_DATASET
from rmc.defense.core import RMCConfig
from rmc.defense.dent import DentConfig
from rmc.defense.knn import IndexConfig
from rmc.defense.registry import DEFAULT_DEFENSES, DEFENSES, check_defenses
from rmc.errors import RMCError
from rmc.models.denoising import DenoiseOp
from rmc.training import TrainConfig


@dataclass
class DataConfig:
    dataset: str = DEFAULT_DATASET   # fashion-mnist (embedded default) | mnist | cifar10 | imagefolder | digits
                                     # (rmc.data.DATASETS)
    data_dir: str | None = None      # directory holding the data set; None: fashion-mnist's Debian package path
    image_size: int | None = None    # imagefolder only: centre-crop to this size (None: 224, the original's)
    resize: int | None = None        # imagefolder only: shorter side before the crop (None: image_size * 256 / 224)
    lazy: bool | None = None         # imagefolder only: decode on demand, never whole (None: above 2 GiB decoded)

    def validate(self) -> "DataConfig":
        if not isinstance(self.dataset, str) or not self.dataset:
            raise RMCError(f"data.dataset must name a data set, got {self.dataset!r}")
        DATASETS[self.dataset]
        if self.image_size is not None:
            check_positive(self.image_size, "data.image_size", integer=True)
        if self.resize is not None:
            check_positive(self.resize, "data.resize", integer=True)
        if self.lazy is not None and not isinstance(self.lazy, bool):
            raise RMCError(f"data.lazy must be true, false or null, got {self.lazy!r}")
        return self


class BaseKind(str, enum.Enum):
    STANDARD = "standard"            # trained on clean images (train.*)
    ADVERSARIAL = "adversarial"      # Madry et al.'s PGD adversarial training (train.adv_*)
    DENOISING = "denoising"          # Xie et al.'s feature-denoising blocks, adversarially trained as above


@dataclass
class ModelConfig:
    layer: str | None = None         # hidden layer for the neighbour search; None: the architecture's default
    bases: list[str] = field(default_factory=lambda: ["standard"])   # base models (standard | adversarial | denoising):
                                                                     # each gets its own D', features and evaluation
                                                                     # sets, and a row alone and one + RMC
    denoise_op: str = "nonlocal"     # the denoising base's operation: nonlocal (Xie et al.'s best) | mean | median
    weights: dict[str, str] = field(default_factory=dict)   # imported weights per base, e.g. {standard:
                                                            # m.safetensors}: an rmc checkpoint (`rmc import-model`)
                                                            # used as that base model instead of training it

    def validate(self) -> "ModelConfig":
        kinds = [k.value for k in BaseKind]
        if not self.bases or any(b not in kinds for b in self.bases) or len(set(self.bases)) != len(self.bases):
            raise RMCError(f"model.bases must list distinct base models among {kinds}, got {self.bases!r}")
        if self.denoise_op not in [o.value for o in DenoiseOp]:
            raise RMCError(f"model.denoise_op must be one of {[o.value for o in DenoiseOp]}, got {self.denoise_op!r}")
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise RMCError(f"model.layer must be a layer name (`rmc layers` lists them) or null, got {self.layer!r}")
        if not isinstance(self.weights, dict):
            raise RMCError(f"model.weights maps base models to checkpoints, e.g. {{standard: m.safetensors}}; got "
                           f"{self.weights!r}")
        for base, path in self.weights.items():
            if base not in self.bases:
                raise RMCError(f"model.weights names base {base!r}, which is not in model.bases {self.bases}; add it "
                               "to model.bases (--bases) or drop its weights")
            if not isinstance(path, str) or not path:
                raise RMCError(f"model.weights.{base} must be the path of an rmc checkpoint (.safetensors), got "
                               f"{path!r}")
        return self


@dataclass
class AttackConfig:
    n: int = 100                     # test inputs per evaluation set (the same inputs in every column)
    rmc_n: int | None = None         # RMC on the first rmc_n of them (None: all n); the static and kNN rows use all n.
                                     # RMC costs minutes per input at the paper's settings: raise it later and
                                     # the same streams continue (not part of the results' folder key)
    fgsm_eps: list[float] = field(default_factory=list)   # FGSM sets, one per eps
    pgd: list[list[float]] = field(default_factory=lambda: [[10, 0.1], [10, 0.2]])   # PGD sets: [steps, eps] pairs
    pgd_step_size: float | None = None   # PGD step size; None: 2.5 * eps / steps (Madry et al.)
    untargeted: bool | list = True   # an untargeted set (moves away from the true label) per PGD setting; or a list of
                                     # [steps, eps] pairs of attack.pgd that get one
    targeted: bool = True            # a targeted set per PGD setting (random wrong class, fixed by the seed)
    seed: int = 0                    # picks the test inputs, random starts and targets

    def validate(self) -> "AttackConfig":
        check_positive(self.n, "attack.n", integer=True)
        if self.rmc_n is not None:
            check_positive(self.rmc_n, "attack.rmc_n", integer=True)
            if self.rmc_n > self.n:
                raise RMCError(f"attack.rmc_n = {self.rmc_n} exceeds attack.n = {self.n} (the inputs of each set); "
                               "lower attack.rmc_n or raise attack.n")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RMCError(f"attack.seed must be an integer >= 0, got {self.seed!r}")
        for e in self.fgsm_eps:
            if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 < e <= 1:
                raise RMCError(f"attack.fgsm_eps entries must be numbers in (0, 1], got {e!r}")
        for pair in self.pgd:
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or isinstance(pair[0], bool)
                    or not isinstance(pair[0], (int, float)) or pair[0] < 1 or not float(pair[0]).is_integer()
                    or isinstance(pair[1], bool)
                    or not isinstance(pair[1], (int, float)) or not 0 < pair[1] <= 1):
                raise RMCError(f"attack.pgd entries are [steps, eps] pairs (steps >= 1, 0 < eps <= 1), got {pair!r}")
        if self.pgd_step_size is not None:
            check_positive(self.pgd_step_size, "attack.pgd_step_size")
        if isinstance(self.untargeted, list):
            pgd = [_pair(q) for q in self.pgd]
            missing = [p for p in self.untargeted if not isinstance(p, (list, tuple)) or _pair(p) not in pgd]
            if missing:
                raise RMCError(f"attack.untargeted lists {missing[0]!r}, which is not a [steps, eps] pair of "
                               f"attack.pgd ({self.pgd}); list pairs of attack.pgd, or use true / false")
        if self.pgd and not (self.untargeted or self.targeted):
            raise RMCError("attack.untargeted and attack.targeted are both false, so attack.pgd makes no set; "
                           "set one of them to true or attack.pgd to []")
        return self

    def untargeted_for(self, pair) -> bool:
        """Whether the PGD setting `pair` ([steps, eps] of attack.pgd) gets an untargeted set."""
        if isinstance(self.untargeted, bool):
            return self.untargeted
        return _pair(pair) in [_pair(p) for p in self.untargeted]


def _pair(pair) -> tuple[float, ...]:
    """[steps, eps] as numbers to compare: YAML may give 10 or 10.0."""
    return tuple(float(v) for v in pair)


@dataclass
class VisualizeConfig:
    inputs: int = 6                  # test inputs shown per evaluation set
    neighbours: int = 8              # nearest D' examples shown beside each input

    def validate(self) -> "VisualizeConfig":
        check_positive(self.inputs, "visualize.inputs", integer=True)
        check_positive(self.neighbours, "visualize.neighbours", integer=True)
        return self


@dataclass
class RunConfig:
    defenses: list[str] = field(default_factory=lambda: list(DEFAULT_DEFENSES))   # the defenses evaluated beside
                                                                                  # the static model and the kNN
                                                                                  # votes (rmc.defense.registry;
                                                                                  # `rmc run --help` lists them),
                                                                                  # each a column of every table
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)   # how D''s features are computed and stored
    knn: IndexConfig = field(default_factory=IndexConfig)   # the neighbour search over D' (exact flat, or IVF for
                                                            # a large D')
    attack: AttackConfig = field(default_factory=AttackConfig)
    rmc: RMCConfig = field(default_factory=RMCConfig)
    dent: DentConfig = field(default_factory=DentConfig)   # DENT's settings (rmc.defense.dent), when `defenses`
                                                           # names it
    attack_rows: AttackRowsConfig = field(default_factory=AttackRowsConfig)   # the attack rows (transfer /
                                                                              # defense-aware)
    batch_rows: BatchRowsConfig = field(default_factory=BatchRowsConfig)   # defense-aware rows against batch
                                                                           # defenses (DENT)
    visualize: VisualizeConfig = field(default_factory=VisualizeConfig)

    def validate(self) -> "RunConfig":
        self.defenses = check_defenses(self.defenses)
        return self

    def settings(self, defense: str):
        """A defense's section of the configuration (None for one without settings)."""
        section = DEFENSES[defense].settings
        return None if section is None else getattr(self, section)


# The dataclasses' defaults are the original's values. A preset lists only where it departs from them, each with why.
# `default` fits the embedded Fashion-MNIST into <= 15 minutes on 2 CPU cores; `paper` is the original's regime
# (with every defense-aware attack, which the original did not run).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "train.epochs": 4,
        "augment.steps": [10, 30],          # original 10/30/100: PGD-100 over the training set is too slow here
        "augment.train_subset": 10000,       # original: the whole training set (|D'| = 3 x 10k = 30k here)
        "rmc.k": 256,                        # original 2048
        "rmc.max_epochs": 3,                 # original 100 (early stopping with patience 5 rarely ends sooner)
        "rmc.lr": 1e-3,                      # original 1e-5, which moves the weights too little in 3 epochs
        "rmc.calib_k": 128,                  # original: K
        "attack_rows.n": 20,                    # attack rows on the first 20 inputs (GMSA-MIN, each protocol: ~1-10 s
                                                # per input)
        "attack_rows.rounds": 5,                # Chen et al. 10; most inputs fall by round 1-3 (the table states R, N)
        # Batch defenses (DENT): Chen et al.'s 14 PGD-100 runs per round (5 restarts + 9 targeted) cost ~100 model
        # passes per input and round; here one PGD-40 run, the step count of every other row (the label states it).
        "batch_rows.steps": 40,
        "batch_rows.restarts": 1,
        "batch_rows.targeted": False,
    },
    "paper": {
        "attack.n": 1000,                    # the original sampled 10,000 ImageNet validation images
        # The original's columns: targeted PGD-10 at the small eps, PGD-10 and PGD-100 at the large eps (ImageNet:
        # 8/255 and 16/255, D' crafted at the large one). Fashion-MNIST: D' at 0.1, so large 0.1 and small 0.05.
        "attack.pgd": [[10, 0.05], [10, 0.1], [100, 0.1]],
        "attack.untargeted": [[10, 0.1]],   # not in the original's table (targeted only): the usual untargeted
                                             # transfer column, PGD-10 at the large eps, beside the original's
        # The original's evaluation PGD steps 1/255 at both 8/255 and 16/255: eps/16 at the large eps (0.1 here) and
        # the same absolute step at the small one, so PGD-10 at the large eps moves at most 10/16 of eps.
        "attack.pgd_step_size": 0.00625,
        # The original's D' attack: cross-entropy on the softmax output, iterates not clipped, random crops
        # (here shifts of up to 2 pixels of the 28-px images).
        "augment.loss": "softmax_output",
        "augment.clip": False,
        "augment.crop_shift": 2,
        "rmc.adam_eps": 1e-7,                # Keras' Adam epsilon
        "model.bases": ["standard", "adversarial", "denoising"],   # the original's rows: None, Adv. trained, Denoising
        "attack_rows.attacks": ["fpa", "gmsa-avg", "gmsa-min"],   # Chen et al.'s three defense-aware attacks (x both
                                                                  # protocols)
        "attack_rows.autoattack": True,         # and the transfer AutoAttack row
    },
}


# Keys of the configuration that are values, not sections.
TOP_KEYS = ("defenses",)


def _comments(cls) -> dict[str, str]:
    """`name -> comment` from the `name: type = default  # comment` lines of a dataclass's source; a comment
    continues on the comment-only lines below whose `#` is in the same column."""
    out: dict[str, str] = {}
    name, column = None, -1
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^=]+=.*?(#\s*)(.*)$", line)
        if m:
            name, column = m.group(1), m.start(2)
            out[name] = m.group(3)
            continue
        more = re.match(r"(\s*)#\s*(.*)$", line)
        if name is not None and more and len(more.group(1)) == column:
            out[name] += " " + more.group(2)
        else:
            name = None
    return out


def _coerce(value: Any, default: Any, hint: Any, where: str) -> Any:
    """Accept YAML's spellings (1e-5 is a string in YAML 1.1) and reject wrong types with a clear line."""
    if value is None:
        return None
    target = type(default) if default is not None else None
    if target is None:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        target = typing.get_origin(args[0]) or args[0] if args else None
    try:
        if target is bool and isinstance(value, list) and list in typing.get_args(hint):
            return value   # a bool-or-list key (attack.untargeted), given a list
        if target is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if target in (int, float):
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if target is int:
                if not isinstance(number, int) and not float(number).is_integer():
                    raise ValueError
                return int(number)
            return float(number)
        if target in (list, tuple):
            if not isinstance(value, (list, tuple)):
                value = [value]
            return list(value) if target is list else tuple(value)
        if target is str or isinstance(default, str):
            return str(getattr(value, "value", value))
    except (TypeError, ValueError):
        kind = getattr(target, "__name__", str(target))
        raise RMCError(f"{where} = {value!r} is not a valid {kind}") from None
    return value


# Keys of older versions, and what replaced them (so an old config.yaml gets a hint rather than a bare refusal).
RENAMED = {"model.adversarial_base": "model.bases (e.g. [standard, adversarial]; --adversarial-base adds one)"}


def _build(cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}".removeprefix("config.")
        if key in RENAMED:
            raise RMCError(f"config key {key} was replaced by {RENAMED[key]}")
        raise RMCError(f"unknown config key {where}.{unknown[0]}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()   # type: ignore[operator]
        if dataclasses.is_dataclass(default):
            if not isinstance(values[name], dict):
                raise RMCError(f"config {where}.{name} must be a section (mapping), got {values[name]!r}")
            kwargs[name] = _build(type(default), values[name], f"{where}.{name}")
        else:
            kwargs[name] = _coerce(values[name], default, hints[name], f"{where}.{name}")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _set(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RMCError(f"config key {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` (value in YAML syntax) from --set."""
    if "=" not in text:
        raise RMCError(f"--set {text!r}: write section.key=value, e.g. --set rmc.k=256")
    key, _, raw = text.partition("=")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise RMCError(f"--set {text!r}: the value is not valid YAML") from None


def load_config(path: str | Path | None = None, preset: str = "default",
                overrides: list[tuple[str, Any]] | None = None,
                flags: list[tuple[str, Any]] | None = None) -> RunConfig:
    """Defaults, then the preset, then the YAML file, then `overrides` (--set), then `flags` (a command's own flags
    such as --mode; later wins). Without the flags the configuration must be valid too: a value a flag replaces
    is still refused when it is invalid (`--set rmc.mode=foo --mode episodic` is an error, not a silent drop)."""
    if preset not in PRESETS:
        raise RMCError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    tree: dict = {}
    for key, value in PRESETS[preset].items():
        _set(tree, key, value)
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise RMCError(f"config file not found: {path}; `rmc run --print-config > {path.name}` writes one")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise RMCError(f"config {path} is not valid YAML ({first})") from None
        if not isinstance(loaded, dict):
            raise RMCError(f"config {path} must be a mapping of sections (data, train, rmc, ...)")
        for section, values in loaded.items():
            if section in TOP_KEYS:
                _set(tree, section, values)
                continue
            if not isinstance(values, dict):
                raise RMCError(f"config {path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _set(tree, f"{section}.{key}", value)
    for key, value in overrides or []:
        _set(tree, key, value)
    if not flags:
        return _build(RunConfig, tree, "config")
    _build(RunConfig, copy.deepcopy(tree), "config")
    for key, value in flags:
        _set(tree, key, value)
    return _build(RunConfig, tree, "config")


def to_dict(cfg) -> dict:
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return getattr(v, "value", v)   # enums as their strings
    return plain(cfg)


def documented_yaml(cfg: RunConfig) -> str:
    """The config as YAML, every key followed by the comment from its definition."""
    lines = ["# rmc run configuration. Every key, its value and what it does. CLI: --set section.key=value"]
    top = _comments(RunConfig)
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if f.name in TOP_KEYS:
            dumped = yaml.safe_dump(to_dict(section), default_flow_style=True).strip()
            lines.append(f"{f.name}: {dumped}   # {top[f.name]}")
            continue
        notes = _comments(type(section))
        lines.append(f"\n{f.name}:")
        for key, value in to_dict(section).items():
            dumped = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"  {key}: {dumped}" + (f"   # {notes[key]}" if key in notes else ""))
    return "\n".join(lines) + "\n"


def validate_before_work(cfg: RunConfig) -> None:
    """What `rmc run` can only know from the data, checked before anything is trained or written (config.yaml
    included): the data sets load, every class has images, |D'| (from the training set's size and augment.*)
    holds rmc.k neighbours, the test set holds attack.n inputs, the model has model.layer."""
    import torch

    from rmc.artifacts.provenance import check_model_data
    from rmc.data import load_dataset
    from rmc.models import build_model, default_layer
    from rmc.models.checkpoint import check_trusted, read_info
    from rmc.models.features import get_layer
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        raise RMCError(f"train.device = {cfg.train.device!r} but CUDA is not available here; set train.device: cpu")
    train = load_dataset(cfg.data.dataset, "train", cfg.data.data_dir, cfg.data.image_size, cfg.data.resize,
                         cfg.data.lazy)
    test = load_dataset(cfg.data.dataset, "test", cfg.data.data_dir, cfg.data.image_size, cfg.data.resize,
                        cfg.data.lazy)
    n_train = len(train) if cfg.train.train_subset is None else min(cfg.train.train_subset, len(train))
    if n_train < 2:
        raise RMCError(f"training needs at least 2 images, got {n_train}; raise train.train_subset")
    n = len(select_subset(train.labels, cfg.augment))
    size = n * (1 + len(cfg.augment.steps))
    if cfg.rmc.k > size:
        raise RMCError(f"rmc.k = {cfg.rmc.k} exceeds |D'| = {size} ({n:,} training images x "
                       f"{1 + len(cfg.augment.steps)} copies); lower rmc.k or raise augment.train_subset / "
                       "add augment.steps")
    if cfg.attack.n > len(test):
        raise RMCError(f"attack.n = {cfg.attack.n} exceeds the {len(test):,} images of the {test.name} test set; "
                       "lower attack.n (--n)")
    from rmc.evaluation.attack_rows import check_rows_within_rmc
    check_rows_within_rmc(cfg.attack_rows, cfg.attack.n, cfg.attack.rmc_n)
    layer = cfg.model.layer
    if layer is not None and set(cfg.model.bases) - set(cfg.model.weights):
        model = build_model(cfg.train.arch, len(train.classes) or int(train.labels.max()) + 1, train.input_shape[0])
        get_layer(model, layer or default_layer(model))
    for base, path in cfg.model.weights.items():   # imported base models: they fit the data and have the layer
        info = read_info(path)
        check_trusted(info, path, cfg.train.arch)
        check_model_data(info, test, f"the test set (model.weights.{base})")
        with torch.device("meta"):
            model = build_model(info.arch, info.num_classes, info.input_shape[0], info.mean, info.std, info.denoise)
        get_layer(model, layer or default_layer(model))
