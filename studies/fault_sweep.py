"""Issue 15's case sweep: bad inputs and faults thrown at `rmc` as a new user would, each classified.

    PYTHONPATH=src python studies/fault_sweep.py [--root /tmp/f15-sweep] [--only SUBSTRING] [--groups G ...]
        [--json out.json]

A tiny digits workspace (model, evaluation sets, D', features) is made once with the CLI; each case copies what it
needs into its own folder, damages or misuses it, runs `python -m rmc ...` in a subprocess (or calls the Python API),
and is classified:

    clear      refused with one line `error: ...` naming the expected problem (exit 2, no traceback)
    handled    expected to work (or to repair) and the result is right
    misleading refused in one line, but the line does not name the problem
    traceback  a Python traceback
    wrong      exit 0 where a refusal was due, or a result that is not right (silently wrong)
    lost       a finished file the case must not touch changed, or something half-written was left
    outside    something was written outside the case's output (its --out, `<out>.partial` and the lock beside it):
               anywhere else in the case's folder or beside it

Disk-full and read-only cases mount small tmpfs file systems (needs root; skipped otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SRC = Path(__file__).resolve().parents[1] / "src"
AUG = ["--steps", "2", "--eps", "0.1", "--step-size", "0.03", "--chunk-size", "64", "--batch-size", "64",
       "--train-subset", "200", "--quiet"]


@dataclass
class Result:
    rc: int
    out: str
    err: str


@dataclass
class Case:
    name: str
    group: str
    argv: list[str] | None = None                    # rmc arguments, with {M} {S} {E} {F} {O} {D} placeholders
    expect: str = "refuse"                           # refuse | ok
    keyword: str = ""                                # the refusal must contain this
    setup: Callable[[Path], None] | None = None      # damage the case's copy of the workspace
    check: Callable[[Path, Result], bool] | None = None   # for "ok": is the result right?
    protect: list[str] = field(default_factory=list)  # files (relative to the case folder) that must not change
    api: Callable[[Path], object] | None = None       # a Python-API case instead of a command
    custom: Callable[[Path], Result] | None = None    # a case that runs its own commands
    root_only: bool = False
    writes: list[str] = field(default_factory=list)   # outputs of a case besides its --out (folder-relative)


class Sweep:
    def __init__(self, root: Path):
        self.root = root
        self.ws = root / "ws"
        self.env = {**os.environ, "PYTHONPATH": str(SRC), "RMC_CACHE_DIR": str(root / "cache")}

    # -- running rmc -------------------------------------------------------------------------------------------
    def rmc(self, argv: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> Result:
        p = subprocess.run(["nice", "-n", "5", sys.executable, "-m", "rmc", "--threads", "1", *argv], cwd=cwd,
                           env=env or self.env, capture_output=True, text=True, timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr)

    def start(self, argv: list[str], cwd: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "rmc", "--threads", "1", *argv], cwd=cwd, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # -- the workspace -----------------------------------------------------------------------------------------
    def build_workspace(self) -> None:
        ws = self.ws
        if (ws / "ready").exists():
            return
        shutil.rmtree(ws, ignore_errors=True)
        ws.mkdir(parents=True)
        steps = [["train", "--dataset", "digits", "--epochs", "3", "--batch-size", "64", "--quiet", "--out",
                  "m.safetensors"],
                 ["train", "--dataset", "digits", "--epochs", "3", "--batch-size", "64", "--seed", "1", "--quiet",
                  "--out", "other.safetensors"],
                 ["attack", "--model", "m.safetensors", "--n", "12", "--eps", "--pgd", "3:0.1", "--untargeted",
                  "--out", "sets"],
                 ["augment", "--model", "m.safetensors", "--out", "dprime", *AUG],
                 ["augment", "--model", "other.safetensors", "--out", "dprime-other", *AUG],
                 ["features", "--model", "m.safetensors", "--store", "dprime", "--out", "feats", "--quiet"],
                 ["evaluate", "--model", "m.safetensors", "--store", "dprime", "--evalsets", "sets", "--features",
                  "feats/dprime.npy", "--sets", "clean", "--n", "6", "--no-attack-rows", "--set", "rmc.k=32",
                  "--set", "rmc.max_epochs=1", "--out", "reference"]]
        for argv in steps:
            r = self.rmc(argv, ws)
            if r.rc != 0:
                raise SystemExit(f"workspace step failed: {argv}\n{r.err}")
        (ws / "ready").write_text("ok")

    def reference_table(self) -> dict:
        return json.loads((self.ws / "reference" / "results.json").read_text())["table"]

    # -- one case ----------------------------------------------------------------------------------------------
    def prepare(self, case: Case) -> Path:
        d = self.root / "cases" / case.name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for name in ("m.safetensors", "m.json", "other.safetensors", "other.json", "sets", "dprime", "dprime-other",
                     "feats"):
            src = self.ws / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, d / name)
        if case.setup:
            case.setup(d)
        return d

    def run_case(self, case: Case) -> tuple[str, str]:
        d = self.prepare(case)
        before = {p: _hash(d / p) for p in case.protect}
        allowed = _outputs(case)
        around = _listing(self.root / "cases", d, allowed)
        try:
            if case.api is not None:
                return self._api(case, d)
            if case.custom is not None:
                res = case.custom(d)
            else:
                argv = [a.format(M="m.safetensors", S="dprime", E="sets", F="feats/dprime.npy", O="out", D=str(d))
                        for a in case.argv]
                res = self.rmc(argv, d)
        except subprocess.TimeoutExpired:
            return "wrong", "timed out"
        after = _listing(self.root / "cases", d, allowed)
        outside = sorted(k for k in set(around) | set(after) if around.get(k) != after.get(k))
        if outside:
            return "outside", f"written outside the output: {outside[:4]}"
        lost = [p for p in case.protect if _hash(d / p) != before[p]]
        half = [str(p.relative_to(d)) for p in d.rglob("*.tmp")]
        return _classify(case, d, res, lost, half)

    def _api(self, case: Case, d: Path) -> tuple[str, str]:
        code = ("import sys, json\nsys.path.insert(0, %r)\nfrom fault_sweep import API\n"
                "from rmc.errors import RMCError\n"
                "try:\n    ok = API[%r](%r)\n    print(json.dumps({'ok': bool(ok)}))\n"
                "except RMCError as e:\n    print('error: ' + str(e), file=sys.stderr); sys.exit(2)\n"
                % (str(Path(__file__).parent), case.name, str(d)))
        p = subprocess.run([sys.executable, "-c", code], cwd=d, env=self.env, capture_output=True, text=True,
                           timeout=600)
        res = Result(p.returncode, p.stdout, p.stderr)
        return _classify(case, d, res, [], [])


def _hash(p: Path) -> str:
    if p.is_dir():
        return hashlib.sha256("".join(_hash(f) + f.name for f in sorted(p.iterdir())).encode()).hexdigest()
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "absent"


def _outputs(case: Case) -> set[str]:
    """What a case may write in its folder: its --out (and `<out>.partial`, the lock beside it), the tmpfs of the
    disk cases, and what a case's own commands write (`writes`)."""
    outs = {"out", "small", *case.writes}
    argv = case.argv or []
    outs |= {argv[i + 1].format(O="out", S="dprime") for i, a in enumerate(argv[:-1]) if a == "--out"}
    outs |= {o.removesuffix(".safetensors") + ".json" for o in outs if o.endswith(".safetensors")}   # sidecars
    top = {Path(o).parts[0] for o in outs if o and not Path(o).is_absolute()}
    return top | {f"{o}.partial" for o in top} | {f".{o}.rmc-lock" for o in top}


def _listing(cases: Path, d: Path, allowed: set[str]) -> dict[str, str]:
    """Every path under the sweep's case folders (the case's own files with their content) but the case's outputs:
    a write outside them (an escape above the case folder included) changes it."""
    out = {}
    for p in cases.rglob("*"):
        rel = p.relative_to(cases)
        if rel.parts[0] == d.name and (len(rel.parts) == 1 or rel.parts[1] in allowed):
            continue
        mine = rel.parts[0] == d.name and p.is_file() and not p.is_symlink()
        out[str(rel)] = _hash(p) if mine else ("link" if p.is_symlink() else "dir" if p.is_dir() else "file")
    return out


def _classify(case: Case, d: Path, res: Result, lost: list[str], half: list[str]) -> tuple[str, str]:
    errors = [ln for ln in res.err.strip().splitlines() if ln.startswith("error:")]
    first = errors[0] if errors else (res.err.strip().splitlines() or [""])[-1]
    if lost:
        return "lost", f"changed: {lost}"
    if half:
        return "lost", f"half-written: {half}"
    if "Traceback" in res.err:
        return "traceback", res.err.strip().splitlines()[-1]
    if case.expect == "refuse":
        if res.rc == 0:
            return "wrong", "exit 0 where a refusal was due"
        if len(errors) != 1:
            return "traceback", f"rc {res.rc}: {first}"
        return ("clear" if case.keyword.lower() in first.lower() else "misleading"), first
    if res.rc != 0:
        return "wrong", f"rc {res.rc}: {first}"
    ok = case.check(d, res) if case.check else True
    if case.api is not None:
        ok = ok and json.loads(res.out.strip().splitlines()[-1]).get("ok", False)
    return ("handled" if ok else "wrong"), (res.err.strip().splitlines() or ["ok"])[-1][:160]


# ---------------------------------------------------------------- helpers for the cases

EVAL = ["evaluate", "--model", "{M}", "--store", "{S}", "--evalsets", "{E}", "--features", "{F}", "--sets", "clean",
        "--n", "6", "--no-attack-rows", "--set", "rmc.k=32", "--set", "rmc.max_epochs=1", "--out", "{O}"]


def ev(**replace) -> list[str]:
    """EVAL with some flags' values replaced (None drops the flag) and extra flags appended (`extra`)."""
    argv = list(EVAL)
    extra = replace.pop("extra", [])
    for flag, value in replace.items():
        flag = "--" + flag.replace("_", "-")
        i = argv.index(flag)
        if value is None:
            del argv[i:i + 2]
        else:
            argv[i + 1] = value
    return argv + extra


def aug(*extra: str) -> list[str]:
    """`rmc augment` of the sweep's model into the case's output folder, with `extra` flags."""
    return ["augment", "--model", "{M}", "--out", "{O}", *extra]


def table_is_reference(sweep: "Sweep"):
    def check(d: Path, res: Result) -> bool:
        return json.loads((d / "out" / "results.json").read_text())["table"] == sweep.reference_table()
    return check


def edit_json(path: str, **changes):
    def setup(d: Path) -> None:
        meta = json.loads((d / path).read_text())
        meta.update(changes)
        (d / path).write_text(json.dumps(meta))
    return setup


def npy_edit(path: str, fn):
    def setup(d: Path) -> None:
        import numpy as np
        arr = np.load(d / path)
        np.save(d / path, fn(arr))
    return setup


def write(path: str, text: str | bytes):
    def setup(d: Path) -> None:
        p = d / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def flip_bytes(path: str, count: int = 8):
    """Invert `count` bytes in the middle of the file (a change whatever the bytes were)."""
    def setup(d: Path) -> None:
        data = bytearray((d / path).read_bytes())
        mid = len(data) // 2
        data[mid:mid + count] = bytes(b ^ 0xFF for b in data[mid:mid + count])
        (d / path).write_bytes(bytes(data))
    return setup


def chain(*fns):
    def setup(d: Path) -> None:
        for f in fns:
            f(d)
    return setup


def truncate(path: str, keep: int):
    def setup(d: Path) -> None:
        os.truncate(d / path, keep)
    return setup


def imagefolder(empty_class: bool = False, corrupt: bool = False, no_train: bool = False):
    def setup(d: Path) -> None:
        from PIL import Image
        root = d / "imgs"
        for split in (["test"] if no_train else ["train", "test"]):
            for c in ("cat", "dog"):
                (root / split / c).mkdir(parents=True)
                if empty_class and split == "train" and c == "dog":
                    continue
                for i in range(3):
                    Image.new("RGB", (12, 12), (i * 40, 10, 10)).save(root / split / c / f"{i}.png")
        if corrupt:
            (root / "train" / "cat" / "bad.png").write_bytes(b"not a png")
    return setup


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", str(path)], capture_output=True)


# ---------------------------------------------------------------- API cases (run in a child process)

def _api_setup(d: str):
    import torch

    from rmc.artifacts.dprime import open_dprime_store
    from rmc.artifacts.features import load_features
    from rmc.defense import RMC, RMCConfig
    from rmc.defense.knn import NeighbourIndex
    from rmc.models import extract_features, load_checkpoint
    d = Path(d)
    torch.set_num_threads(1)
    model, info = load_checkpoint(d / "m.safetensors")
    store = open_dprime_store(d / "dprime")
    feats, prov = load_features(d / "feats" / "dprime.npy")
    layer = prov["layer"]   # the layer `rmc features` used (the model's default)
    rmc = RMC(model, store.dprime(), NeighbourIndex(feats.numpy()), RMCConfig(k=32, max_epochs=1, lr=1e-3,
                                                                               calib_k=32), layer)
    from rmc.artifacts.evalsets import load_eval_sets
    x = load_eval_sets(d / "sets", ["clean"])[0].images[:1]
    return rmc, model, x, extract_features(model, layer, x).numpy()


def _state(rmc):
    return {k: v.clone() for k, v in rmc.state_dict().items()}, rmc.steps_done


def _same(a, b) -> bool:
    import torch
    return a[1] == b[1] and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _step_refuses(bad):
    def run(d):
        rmc, _, x, f = _api_setup(d)
        rmc.step(x, f)
        before = _state(rmc)
        try:
            rmc.step(*bad(x, f))
        finally:
            if not _same(before, _state(rmc)):
                raise SystemExit("STATE CHANGED")   # a traceback: the sweep counts it
        return True
    return run


def _classifier(bad):
    def run(d):
        from rmc.defense.classifier import RMCClassifier
        rmc, model, x, _ = _api_setup(d)
        clf = RMCClassifier(rmc, model, rmc.feature_layer, stateful=True)
        out = clf(bad(x))
        return tuple(out.shape) == (0, 10)
    return run


def _midstep_failure(d):
    rmc, _, x, f = _api_setup(d)
    rmc.step(x, f)
    before = _state(rmc)

    def boom(gen):
        raise MemoryError("simulated")
    rmc.calibrate = boom
    try:
        rmc.step(x, f)
    except MemoryError:
        pass
    return _same(before, _state(rmc))


def _k_too_large(d):
    from rmc.defense import RMC, RMCConfig
    rmc, model, _, _ = _api_setup(d)
    RMC(model, rmc.dprime, rmc.index, RMCConfig(k=10 ** 6), rmc.feature_layer)


def _factory_from_sidecar(d):
    from rmc.models import load_checkpoint
    meta = json.loads((Path(d) / "m.json").read_text())
    meta["arch"] = "evil_mod:factory"
    (Path(d) / "m.json").write_text(json.dumps(meta))
    sys.path.insert(0, d)
    try:
        load_checkpoint(Path(d) / "m.safetensors")
    finally:
        if (Path(d) / "IMPORTED").exists():
            raise SystemExit("the sidecar's module was imported")


API = {
    "api-step-nan": _step_refuses(lambda x, f: (x * float("nan"), f)),
    "api-step-uint8": _step_refuses(lambda x, f: ((x * 255).byte(), f)),
    "api-step-0-255-floats": _step_refuses(lambda x, f: (x * 255, f)),
    "api-step-negative": _step_refuses(lambda x, f: (x - 1, f)),
    "api-step-batch-of-2": _step_refuses(lambda x, f: (x.repeat(2, 1, 1, 1), f)),
    "api-step-empty": _step_refuses(lambda x, f: (x[:0], f)),
    "api-step-3-channels": _step_refuses(lambda x, f: (x.repeat(1, 3, 1, 1), f)),
    "api-step-3d": _step_refuses(lambda x, f: (x[0], f)),
    "api-step-features-wrong-dim": _step_refuses(lambda x, f: (x, f[:, :5])),
    "api-step-features-inf": _step_refuses(lambda x, f: (x, f * float("inf"))),
    "api-step-rows-out-of-range": _step_refuses(lambda x, f: (x, None, None, list(range(10 ** 6, 10 ** 6 + 32)))),
    "api-step-fails-midway": _midstep_failure,
    "api-classifier-empty-batch": _classifier(lambda x: x[:0]),
    "api-classifier-nan": _classifier(lambda x: x * float("nan")),
    "api-classifier-uint8": _classifier(lambda x: (x * 255).byte()),
    "api-rmc-k-exceeds-dprime": _k_too_large,
    "api-sidecar-factory": _factory_from_sidecar,
}


# ---------------------------------------------------------------- untrusted files (names, paths, links, schemas)

def edit_index(change):
    """Edit the case's evaluation-set index (`change(index)`), keeping every file as it is."""
    def setup(d: Path) -> None:
        index = json.loads((d / "sets" / "index.json").read_text())
        change(index)
        (d / "sets" / "index.json").write_text(json.dumps(index))
    return setup


def set_entry(**changes):
    return edit_index(lambda ix: ix["sets"][0].update(changes))


def set_attack(**changes):
    return edit_index(lambda ix: ix["sets"][0]["attack"].update(changes))


def link(path: str, target: str):
    """`path` (case-relative) becomes a symbolic link to `target`, where what was at `path` is moved (an empty
    folder if nothing was)."""
    def setup(d: Path) -> None:
        src, dst = d / path, d / target
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.exists():
            shutil.move(src, dst)
        elif not dst.exists():
            dst.mkdir()
        src.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(dst, src)
    return setup


KEY = "abcd1234"


def run_dir(sweep: "Sweep", damage=None):
    """A run directory as `rmc run` lays it out (the reference evaluation's records, the sets, results.json naming
    its stage folders, config.yaml) at `run/`, then `damage(results_json_dict, run_path)`."""
    def setup(d: Path) -> None:
        run = d / "run"
        shutil.copytree(sweep.ws / "reference" / "results" / "standard", run / "results" / KEY / "standard")
        shutil.copytree(sweep.ws / "sets", run / "evalsets" / f"standard-{KEY}")
        results = json.loads((sweep.ws / "reference" / "results.json").read_text())
        results["stage_dirs"] = {"standard": {"evalsets": f"run/evalsets/standard-{KEY}",
                                              "results": f"run/results/{KEY}/standard"}}
        (run / "config.yaml").write_text("data:\n  dataset: digits\nrmc:\n  mode: online\n")
        if damage is not None:
            damage(results, run)
        (run / "results.json").write_text(json.dumps(results))
    return setup


def _records_then(sweep: "Sweep", d: Path, damage) -> Result:
    """The reference evaluation into out/, `damage(d)`, then the same command again (a resume)."""
    argv = _fmt(ev())
    r = sweep.rmc(argv, d)
    if r.rc != 0:
        return r
    damage(d)
    return sweep.rmc(argv, d)


def _unreachable(sweep: "Sweep", d: Path, listening: bool, bound: float = 5) -> Result:
    """evaluate --ray at a port where nothing listens, or where something that is no Ray answers; refused within
    the bound (plus starting Python and Ray's import)."""
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    if listening:
        srv.listen(8)
    else:
        srv.close()
    t0 = time.perf_counter()
    try:
        r = sweep.rmc(_fmt(ev(extra=["--ray", f"127.0.0.1:{port}", "--ray-timeout", str(bound)])), d)
    finally:
        srv.close()
    took = time.perf_counter() - t0
    if took > bound + 25:
        return Result(0, "", f"took {took:.0f} s, past the {bound:g} s bound")
    return r


def untrusted_cases(sweep: "Sweep") -> list[Case]:
    """Files rmc did not write: names that would climb out, paths that escape, links, fields of the wrong type or
    range, and a Ray cluster that does not answer. Refused in one line, and nothing written outside --out."""
    C = []

    def add(*a, **kw):
        C.append(Case(*a, **kw))

    protect = ["dprime", "sets", "feats", "m.safetensors", "m.json"]
    evaluate_all = ev(sets=None)
    # names read from files
    for name, value in [("climbs-out", "../../../../x"), ("slash", "a/b"), ("absolute", "/tmp/rmc-x"),
                        ("dot-dot", ".."), ("hidden", ".x"), ("empty", ""), ("newline", "a\nb"), ("long", "x" * 300),
                        ("not-a-string", 5)]:
        add(f"index-set-name-{name}", "names", evaluate_all, keyword="sets[0].name", setup=set_entry(name=value),
            protect=protect)
    add("index-set-name-twice", "names", evaluate_all, keyword="more than once",
        setup=edit_index(lambda ix: ix["sets"].append(dict(ix["sets"][0]))))
    add("manifest-copy-name-climbs-out", "names", ev(), keyword="copy_names",
        setup=edit_json("dprime/manifest.json", copy_names=["clean", "../../x"]))
    add("report-stage-dir-climbs-out", "names", ["report", "run", "--out", "out"], keyword="stage_dirs",
        setup=run_dir(sweep, lambda r, run: r["stage_dirs"]["standard"].update(results="run/results/../../..")))
    add("report-base-name-climbs-out", "names", ["report", "run", "--out", "out"], keyword="stage_dirs",
        setup=run_dir(sweep, lambda r, run: r["stage_dirs"].update({"../../x": {"results": "a/b"}})))
    add("evaluate-name-climbs-out", "names", ev(extra=["--name", "../../x"]), keyword="--name")
    # paths read from files
    for name, value in [("parent", "../m.safetensors"), ("deep", "../../y.safetensors"), ("absolute", "/etc/passwd"),
                        ("subfolder", "a/clean.safetensors")]:
        add(f"index-set-file-{name}", "paths", evaluate_all, keyword="sets[0].file", setup=set_entry(file=value),
            protect=protect)
    # links
    add("index-set-file-links-out", "links", ev(), keyword="leads outside",
        setup=link("sets/clean.safetensors", "elsewhere/clean.safetensors"))
    add("results-folder-links-out", "links", ev(), keyword="leads outside",
        setup=link("out/results/standard/clean", "elsewhere"), protect=["elsewhere"])
    C.append(Case("record-file-links-out", "links", keyword="a record stream", protect=["victim.txt"],
                  setup=write("victim.txt", "mine\n"),
                  custom=lambda d: _records_then(sweep, d, lambda d: (
                      (d / "out/results/standard/clean/rmc.jsonl").unlink(),
                      os.symlink(d / "victim.txt", d / "out/results/standard/clean/rmc.jsonl")))))
    add("report-set-folder-links-out", "links", ["report", "run", "--out", "out"], keyword="leads outside",
        setup=run_dir(sweep, lambda r, run: (shutil.move(run / "results" / KEY / "standard" / "clean",
                                                         run.parent / "clean-elsewhere"),
                                             os.symlink(run.parent / "clean-elsewhere",
                                                        run / "results" / KEY / "standard" / "clean"))))
    add("report-figure-links-out", "links", ["report", "run", "--out", "out"], keyword="the neighbours figure",
        setup=chain(run_dir(sweep), write("secret.png", b"\x89PNG"),
                    lambda d: os.symlink(d / "secret.png", d / "run" / "neighbours.png")))
    # fields of the wrong type, range or value
    for name, setup, kw in [
            ("index-kind-unknown", set_attack(kind="weird"), "attack.kind"),
            ("index-eps-nan", set_attack(eps=float("nan")), "attack.eps"),
            ("index-eps-huge", set_attack(eps=1e300), "attack.eps"),
            ("index-targeted-text", set_attack(targeted="yes"), "attack.targeted"),
            ("index-sets-not-a-list", edit_index(lambda ix: ix.update(sets={"a": 1})), "not an rmc evaluation-set"),
            ("index-entry-lacks-sha", edit_index(lambda ix: ix["sets"][0].pop("sha256")), "sets[0].sha256"),
            ("index-nested-too-deep", write("sets/index.json", "[" * 100000 + "]" * 100000), "nested too deeply"),
            ("index-number-of-5000-digits", write("sets/index.json", '{"format": ' + "9" * 5000 + "}"),
             "not valid JSON"),
            ("manifest-counts-negative", edit_json("dprime/manifest.json", counts={"clean": -5, "pgd2": -5}),
             "counts"),
            ("manifest-total-text", edit_json("dprime/manifest.json", total="lots"), "total"),
            ("manifest-shape-disagrees", edit_json("dprime/manifest.json", shape=[400, 1, 8, 9]), "agree"),
            ("manifest-eps-nan", lambda d: edit_json("dprime/manifest.json", attack={
                **json.loads((d / "dprime/manifest.json").read_text())["attack"], "eps": float("nan")})(d),
             "attack.eps"),
            ("sidecar-extra-key", edit_json("m.json", evil="x"), "evil"),
            ("sidecar-input-shape-strings", edit_json("m.json", input_shape=["1", "8", "8"]), "input_shape"),
            ("sidecar-accuracy-inf", edit_json("m.json", test_accuracy=float("inf")), "test_accuracy"),
            ("sidecar-denoise-unknown", edit_json("m.json", denoise="magic"), "denoise"),
            ("features-count-text", edit_json("feats/dprime.json", count="ten"), "count"),
            ("features-layer-empty", edit_json("feats/dprime.json", layer=""), "layer")]:
        add(name, "schema", evaluate_all, keyword=kw, setup=setup, protect=protect)
    add("config-invalid-value-behind-a-flag", "schema", ev(extra=["--set", "rmc.mode=foo", "--mode", "episodic"]),
        keyword="mode")
    add("config-unknown-base", "schema", ["run", "--out", "{O}", "--set", "model.bases=[nope]", "--print-config"],
        keyword="model.bases")
    C.append(Case("record-pred-text", "schema", keyword="pred",
                  custom=lambda d: _records_then(sweep, d, lambda d: (d / "out/results/standard/clean/rmc.jsonl")
                                                 .write_text(json.dumps({**json.loads((d / "out/results/standard/"
                                                             "clean/rmc.jsonl").read_text().splitlines()[0]),
                                                             "pred": "x"}) + "\n"))))
    C.append(Case("record-state-count-missing", "schema", keyword="__n_done__",
                  custom=lambda d: _records_then(sweep, d, lambda d: _drop_tensor(
                      d / "out/results/standard/clean/rmc.state.safetensors", "__n_done__"))))
    add("report-table-hits-text", "schema", ["report", "run", "--out", "out"], keyword="hits",
        setup=run_dir(sweep, lambda r, run: r["table"]["rows"]["None"]["clean"]["accuracy"].update(hits="x")))
    add("report-baselines-pred-list", "schema", ["report", "run", "--out", "out"], keyword="pred",
        setup=run_dir(sweep, lambda r, run: (run / "results" / KEY / "standard" / "clean" / "baselines.json")
                      .write_text(json.dumps({"undefended": [{"index": 0, "label": 1, "pred": [1]}]}))))
    add("report-clean-run", "schema", ["report", "run", "--out", "out"], expect="ok", setup=run_dir(sweep),
        check=lambda d, r: (d / "out" / "report.html").exists())
    # a Ray cluster that does not answer
    C.append(Case("ray-address-nothing-listens", "cluster", keyword="ray status",
                  custom=lambda d: _unreachable(sweep, d, listening=False)))
    C.append(Case("ray-address-no-ray-there", "cluster", keyword="did not answer",
                  custom=lambda d: _unreachable(sweep, d, listening=True)))
    return C


def _drop_tensor(path: Path, key: str) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path))
    tensors.pop(key)
    save_file(tensors, str(path))


# ---------------------------------------------------------------- the cases

def cases(sweep: Sweep) -> list[Case]:
    ref = table_is_reference(sweep)
    protect_all = ["dprime", "sets", "feats", "m.safetensors", "m.json"]
    C = []

    def add(*a, **kw):
        C.append(Case(*a, **kw))

    # values on the command line
    add("evaluate-n-negative", "values", ev(n="-5"), keyword="--n", protect=protect_all)
    add("evaluate-n-zero", "values", ev(n="0"), keyword="--n")
    add("evaluate-n-larger-than-sets", "values", ev(n="1000", extra=["--no-rmc"]), expect="ok",
        check=lambda d, r: json.loads((d / "out" / "results.json").read_text())["table"]["rows"]["None"]["clean"]
        ["accuracy"]["n"] == 12)
    add("evaluate-k-zero", "values", ev(extra=["--set", "rmc.k=0"]), keyword="rmc.k")
    add("evaluate-k-exceeds-dprime", "values", ev(extra=["--set", "rmc.k=100000"]), keyword="exceeds")
    add("evaluate-lr-negative", "values", ev(extra=["--set", "rmc.lr=-1"]), keyword="rmc.lr")
    add("evaluate-mode-unknown", "values", ev(extra=["--set", "rmc.mode=weird"]), keyword="mode")
    add("evaluate-unknown-key", "values", ev(extra=["--set", "rmc.nope=1"]), keyword="unknown config key")
    add("evaluate-set-without-equals", "values", ev(extra=["--set", "rmc.k"]), keyword="section.key=value")
    add("evaluate-unknown-set-name", "values", ev(sets="nope"), keyword="nope")
    add("evaluate-unknown-layer", "values", ev(extra=["--layer", "nope"]), keyword="nope")
    add("evaluate-batch-zero", "values", ev(extra=["--batch", "0"]), keyword="--batch")
    add("evaluate-shards-zero", "values", ev(extra=["--shards", "0"]), keyword="--shards")
    add("evaluate-workers-without-ray", "values", ev(extra=["--workers", "2"]), keyword="--ray")
    add("evaluate-config-missing", "values", ev(extra=["--config", "nope.yaml"]), keyword="not found")
    add("evaluate-config-not-yaml", "values", ev(extra=["--config", "bad.yaml"]), keyword="not valid YAML",
        setup=write("bad.yaml", "rmc: [unclosed"))
    add("evaluate-config-wrong-type", "values", ev(extra=["--config", "bad.yaml"]), keyword="rmc.lr",
        setup=write("bad.yaml", "rmc:\n  lr: lots\n"))
    add("threads-zero", "values", ["--threads", "0", "layers", "--arch", "small_cnn"], keyword="--threads")
    add("augment-steps-zero", "values", aug("--steps", "0"), keyword="steps")
    add("augment-eps-too-large", "values", aug("--eps", "2"), keyword="larger than")
    add("augment-eps-not-a-number", "values", aug("--eps", "abc"), keyword="--eps")
    add("augment-chunk-zero", "values", aug("--chunk-size", "0"), keyword="chunk size")
    add("augment-subset-zero", "values", aug("--train-subset", "0"), keyword="train subset")
    add("augment-subset-larger-than-data", "values",
        aug("--steps", "1", "--chunk-size", "512", "--train-subset", "99999", "--quiet"), expect="ok",
        check=lambda d, r: json.loads((d / "out" / "manifest.json").read_text())["total"] == 2 * _digits_train())
    add("augment-seed-negative", "values", aug("--seed", "-1"), keyword="seed")
    add("attack-n-negative", "values", ["attack", "--model", "{M}", "--n", "-1", "--out", "{O}"], keyword="n")
    add("attack-n-exceeds-test", "values", ["attack", "--model", "{M}", "--n", "100000", "--out", "{O}"],
        keyword="test")
    add("attack-pgd-eps-too-large", "values", ["attack", "--model", "{M}", "--pgd", "3:5", "--out", "{O}"],
        keyword="larger than")
    add("attack-batch-zero", "values", ["attack", "--model", "{M}", "--batch-size", "0", "--out", "{O}"],
        keyword="--batch-size")
    add("train-epochs-zero", "values", ["train", "--dataset", "digits", "--epochs", "0", "--out", "x.safetensors"],
        keyword="epochs")
    add("train-out-not-safetensors", "values", ["train", "--dataset", "digits", "--out", "x.pt"],
        keyword=".safetensors")
    add("train-unknown-dataset", "values", ["train", "--dataset", "nope", "--out", "x.safetensors"], keyword="nope")
    add("train-unknown-arch", "values", ["train", "--dataset", "digits", "--arch", "nope", "--out", "x.safetensors"],
        keyword="nope")
    add("train-lr-negative", "values", ["train", "--dataset", "digits", "--lr", "-1", "--out", "x.safetensors"],
        keyword="learning rate")
    add("visualize-inputs-zero", "values", ["visualize", "--model", "{M}", "--store", "{S}", "--features", "{F}",
                                            "--evalsets", "{E}", "--inputs", "0", "--out", "n.png"],
        keyword="--inputs")
    add("visualize-out-not-png", "values", ["visualize", "--model", "{M}", "--store", "{S}", "--features", "{F}",
                                            "--evalsets", "{E}", "--out", "n.txt"], keyword=".png")
    add("layers-nothing-named", "values", ["layers"], keyword="--model")
    add("features-batch-zero", "values", ["features", "--model", "{M}", "--store", "{S}", "--batch-size", "0",
                                          "--out", "{O}"], keyword="--batch-size")

    # rmc run: checked before training and before config.yaml
    run = ["run", "--out", "{O}", "--set", "data.dataset=digits", "--set", "augment.train_subset=300",
           "--set", "augment.steps=[3]"]
    no_out = lambda d, r: not (d / "out").exists()   # noqa: E731
    for name, extra, kw in [("run-n-negative", ["--n", "-5"], "attack.n"),
                            ("run-k-exceeds-dprime", ["--set", "rmc.k=5000"], "exceeds |D'|"),
                            ("run-attack-n-zero", ["--set", "attack.n=0"], "attack.n"),
                            ("run-attack-n-exceeds-test", ["--set", "attack.n=99999"], "test set"),
                            ("run-layer-unknown", ["--set", "model.layer=nope"], "no layer"),
                            ("run-mnist-without-data", ["--set", "data.dataset=mnist"], "data_dir"),
                            ("run-eps-not-a-number", ["--set", "augment.eps=abc"], "augment.eps"),
                            ("run-pgd-bad-pair", ["--set", "attack.pgd=[[10]]"], "attack.pgd"),
                            ("run-visualize-zero", ["--set", "visualize.neighbours=0"], "visualize.neighbours"),
                            ("run-no-pgd-set", ["--set", "attack.targeted=false", "--set", "attack.untargeted=false"],
                             "makes no set"),
                            ("run-cuda-missing", ["--set", "train.device=cuda"], "CUDA")]:
        add(name, "values", run + extra, keyword=kw)
        C[-1].check = no_out
    add("run-default-subset-on-small-data", "values",
        ["run", "--out", "{O}", "--set", "data.dataset=digits", "--print-config"], expect="ok",
        check=lambda d, r: "train_subset: 10000" in r.out)

    add("evaluate-model-missing", "values", ev(model="nope.safetensors"), keyword="not found")
    add("evaluate-store-is-a-file", "values", ev(store="m.json"), keyword="m.json")
    add("evaluate-evalsets-is-a-file", "values", ev(extra=["--evalsets", "m.json"]), keyword="m.json")
    add("features-unknown-layer", "values", ["features", "--model", "{M}", "--store", "{S}", "--layer", "nope",
                                             "--out", "{O}"], keyword="nope")
    add("augment-out-is-a-foreign-dir", "values", ["augment", "--model", "{M}", "--out", "mine", *AUG],
        keyword="not an augmented dataset", setup=write("mine/notes.txt", "mine"), protect=["mine/notes.txt"])

    # data sets
    add("imagefolder-empty-class", "data", ["train", "--dataset", "imagefolder", "--data-dir", "imgs", "--out",
                                            "x.safetensors"],
        keyword="has no .png", setup=imagefolder(empty_class=True))
    add("imagefolder-corrupt-image", "data", ["train", "--dataset", "imagefolder", "--data-dir", "imgs", "--out",
                                              "x.safetensors"], keyword="bad.png", setup=imagefolder(corrupt=True))
    add("imagefolder-no-train", "data", ["train", "--dataset", "imagefolder", "--data-dir", "imgs", "--out",
                                         "x.safetensors"], keyword="no train folder", setup=imagefolder(no_train=True))
    add("augment-wrong-dataset-for-model", "data", ["augment", "--model", "{M}", "--dataset", "fashion-mnist",
                                                    "--out", "{O}", *AUG], keyword="trained on")

    # stores
    add("store-labels-shuffled", "store", ev(), keyword="labels.npy",
        setup=npy_edit("dprime/labels.npy", lambda a: a[::-1].copy()))
    add("store-images-zeroed", "store", ev(), keyword="00000.npy",
        setup=npy_edit("dprime/shards/00000.npy", lambda a: a * 0))
    add("store-images-truncated", "store", ev(), keyword="00000.npy",
        setup=truncate("dprime/shards/00000.npy", 1000))
    add("store-copy-edited", "store", ev(), keyword="copy.npy", setup=npy_edit("dprime/copy.npy", lambda a: a * 0))
    add("store-manifest-deleted", "store", ev(), keyword="manifest",
        setup=lambda d: (d / "dprime" / "manifest.json").unlink())
    add("store-manifest-garbage", "store", ev(), keyword="not valid JSON", setup=write("dprime/manifest.json", "{x"))
    add("store-unfinished", "store", ev(), keyword="not finished",
        setup=lambda d: (shutil.move(d / "dprime", d / "dprime.partial"),
                         (d / "dprime.partial" / "manifest.json").write_text(json.dumps(
                             {k: v for k, v in json.loads((d / "dprime.partial" / "manifest.json").read_text()).items()
                              if k != "content"}))))
    add("store-edit-with-mtime-kept-verify", "store", ev(extra=["--verify-store"]), keyword="labels.npy",
        setup=chain(lambda d: shutil.copy2(d / "dprime" / "labels.npy", d / "stamp"),
                    npy_edit("dprime/labels.npy", lambda a: a[::-1].copy()),
                    lambda d: shutil.copystat(d / "stamp", d / "dprime" / "labels.npy")))
    add("store-in-features-command", "store", ["features", "--model", "{M}", "--store", "{S}", "--out", "{O}"],
        keyword="labels.npy", setup=npy_edit("dprime/labels.npy", lambda a: a[::-1].copy()))
    add("store-in-visualize-command", "store", ["visualize", "--model", "{M}", "--store", "{S}", "--features", "{F}",
                                                "--evalsets", "{E}", "--out", "n.png"],
        keyword="labels.npy", setup=npy_edit("dprime/labels.npy", lambda a: a[::-1].copy()))
    add("store-of-another-model", "store", ev(store="dprime-other", features=None, extra=["--no-rmc"]), expect="ok",
        check=lambda d, r: "made against model" in r.err)

    # features, sets, models
    add("features-of-another-model", "artifacts", ev(model="other.safetensors"), keyword="features")
    add("features-sidecar-missing", "artifacts", ev(), keyword="sidecar",
        setup=lambda d: (d / "feats" / "dprime.json").unlink())
    add("features-truncated", "artifacts", ev(), keyword="dprime.npy", setup=truncate("feats/dprime.npy", 200))
    add("evalset-tampered", "artifacts", ev(), keyword="clean",
        setup=flip_bytes("sets/clean.safetensors"))
    add("evalset-index-missing", "artifacts", ev(), keyword="index",
        setup=lambda d: (d / "sets" / "index.json").unlink())
    add("evalsets-of-another-model", "artifacts", ev(model="other.safetensors", store="dprime-other", features=None,
                                                     extra=["--no-rmc"]), expect="ok")
    add("model-weights-edited", "artifacts", ev(), keyword="hash",
        setup=flip_bytes("m.safetensors"))
    add("model-json-garbage", "artifacts", ev(), keyword="not valid JSON", setup=write("m.json", "{"))
    add("model-json-num-classes-text", "artifacts", ev(), keyword="num_classes",
        setup=edit_json("m.json", num_classes="ten"))
    add("model-json-other-dataset", "artifacts", ev(), keyword="trained on 'mnist'",
        setup=edit_json("m.json", dataset="mnist"))
    add("model-json-fewer-classes", "artifacts", ev(), keyword="do not fit", setup=edit_json("m.json", num_classes=5))
    evil = write("evil_mod.py", "open('IMPORTED', 'w').write('x')\ndef factory(**kw):\n    raise SystemExit(9)\n")
    add("model-json-names-a-factory", "artifacts", ev(), keyword="--arch evil_mod:factory",
        setup=chain(evil, edit_json("m.json", arch="evil_mod:factory")), protect=["IMPORTED"])
    add("model-json-names-a-launcher", "artifacts", ev(), keyword="--arch subprocess:Popen",
        setup=edit_json("m.json", arch="subprocess:Popen"))

    # concurrency, interruption, resume
    C.append(Case("two-evaluates-one-out", "resume", expect="ok", custom=lambda d: _two(sweep, d, ev()),
                  check=ref))
    C.append(Case("two-augments-one-out", "resume", expect="ok",
                  custom=lambda d: _two(sweep, d, ["augment", "--model", "{M}", "--out", "out", *AUG]),
                  check=lambda d, r: _same_store(d / "out", sweep.ws / "dprime")))
    add("stale-lock-of-dead-process", "resume", ev(), expect="ok", check=ref,
        setup=write(".out.rmc-lock", json.dumps({"pid": 4194000, "host": os.uname().nodename, "command": "rmc x"})))
    C.append(Case("kill9-evaluate-resume", "resume", expect="ok", check=ref,
                  custom=lambda d: _kill_and_resume(sweep, d, ev(), lambda: (d / "out").rglob("rmc.jsonl"))))
    for damage in ("none", "truncate", "overwrite", "labels", "progress"):
        C.append(Case(f"kill9-augment-{damage}-resume", "resume", expect="ok",
                      custom=lambda d, damage=damage: _kill_augment(sweep, d, damage),
                      check=lambda d, r: _same_store(d / "out", sweep.ws / "dprime")))
    C.append(Case("records-interleaved-resume", "resume", expect="ok", check=ref,
                  custom=lambda d: _damaged_records(sweep, d, "interleave")))
    C.append(Case("records-torn-line-resume", "resume", expect="ok", check=ref,
                  custom=lambda d: _damaged_records(sweep, d, "torn")))
    C.append(Case("records-other-settings", "resume", expect="refuse", keyword="other settings",
                  custom=lambda d: _damaged_records(sweep, d, "settings")))
    add("stray-tmp-files-in-out", "resume", ev(), expect="ok", check=ref,
        setup=chain(write("out/.results.json.x1.tmp", "half"), write("out/results/standard/clean/rmc.jsonl.tmp", "h")))
    add("stray-partial-beside-finished-store", "resume", ["augment", "--model", "{M}", "--out", "{S}", *AUG],
        expect="ok", check=lambda d, r: "left over" in r.err, setup=write("dprime.partial/junk", "x"),
        protect=["dprime"])

    # faults: files and disks
    add("features-out-is-a-file", "faults", ["features", "--model", "{M}", "--store", "{S}", "--out", "f"],
        keyword="is a file", setup=write("f", "mine"), protect=["f"])
    add("evaluate-out-is-a-file", "faults", ev(out="f"), keyword="is a file", setup=write("f", "mine"), protect=["f"])
    add("train-out-is-a-dir", "faults", ["train", "--dataset", "digits", "--out", "dir.safetensors"],
        keyword="is a directory", setup=lambda d: (d / "dir.safetensors").mkdir())
    add("out-under-a-file", "faults", ev(out="f/sub"), keyword="f", setup=write("f", "mine"), protect=["f"])
    add("out-in-proc", "faults", ev(out="/proc/rmc-nope/out"), keyword="writable")
    C.append(Case("disk-full-augment", "faults", keyword="not enough disk space", root_only=True,
                  custom=lambda d: _on_small_disk(sweep, d, "600k", lambda small: [
                      "augment", "--model", "{M}", "--out", str(small / "d"), "--steps", "1", "--train-subset",
                      "1437", "--quiet"], check_clean=True)))
    C.append(Case("disk-full-features", "faults", keyword="disk", root_only=True,
                  custom=lambda d: _on_small_disk(sweep, d, "40k", lambda small: [
                      "features", "--model", "{M}", "--store", "{S}", "--out", str(small / "f"), "--quiet"])))
    C.append(Case("disk-full-evaluate", "faults", keyword="disk", root_only=True,
                  custom=lambda d: _on_small_disk(sweep, d, "24k", lambda small: ev(
                      out=str(small / "r"), features=None, extra=["--no-rmc"]))))
    C.append(Case("disk-full-evaluate-records", "faults", keyword="disk is full", root_only=True,
                  custom=lambda d: _on_small_disk(sweep, d, "12k", lambda small: ev(out=str(small / "r")))))
    C.append(Case("read-only-out", "faults", keyword="writable", root_only=True,
                  custom=lambda d: _on_small_disk(sweep, d, "1M", lambda small: ev(out=str(small / "r")),
                                                  readonly=True)))

    C += untrusted_cases(sweep)

    # Python API
    for name in API:
        expect = "ok" if name in ("api-step-fails-midway", "api-classifier-empty-batch") else "refuse"
        keyword = {"api-step-nan": "NaN", "api-step-uint8": "uint8", "api-step-0-255-floats": "255",
                   "api-step-negative": "[0, 1]", "api-step-batch-of-2": "exactly one", "api-step-empty": "empty",
                   "api-step-3-channels": "C x H x W", "api-step-3d": "1 x C x H x W",
                   "api-step-features-wrong-dim": "features", "api-step-features-inf": "NaN or infinite",
                   "api-step-rows-out-of-range": "rows", "api-classifier-nan": "NaN", "api-classifier-uint8": "uint8",
                   "api-rmc-k-exceeds-dprime": "exceeds", "api-sidecar-factory": "--arch"}.get(name, "")
        C.append(Case(name, "api", expect=expect, keyword=keyword, api=API[name],
                      writes=["m.json"] if name == "api-sidecar-factory" else []))
    return C


def _digits_train() -> int:
    from rmc.data import load_dataset
    return len(load_dataset("digits", "train"))


def _fmt(argv, **kw):
    return [a.format(M="m.safetensors", S="dprime", E="sets", F="feats/dprime.npy", O="out", **kw) for a in argv]


def _two(sweep: Sweep, d: Path, argv) -> Result:
    """Two processes on one --out: the second (already imported, waiting) starts the moment the first holds the
    output, and must be refused; then a re-run resumes to the reference."""
    argv = _fmt(argv)
    waiter = ("import sys, time, pathlib, rmc.cli\nlock = pathlib.Path('.out.rmc-lock')\n"
              "for _ in range(6000):\n    if lock.exists() and lock.read_text():\n        break\n"
              "    time.sleep(0.005)\nsys.exit(rmc.cli.main(['--threads', '1'] + sys.argv[1:]))\n")
    second_p = subprocess.Popen([sys.executable, "-c", waiter, *argv], cwd=d, env=sweep.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    time.sleep(3)   # the waiter has imported rmc
    first = sweep.start(argv, d)
    s_out, s_err = second_p.communicate(timeout=600)
    second = Result(second_p.returncode, s_out, s_err)
    out, err = first.communicate(timeout=600)
    if second.rc != 2 or "in use by another rmc process" not in second.err:
        return Result(0 if second.rc == 0 else 1, second.out, "second run not refused: " + second.err)
    again = sweep.rmc(argv, d)
    return Result(first.returncode or again.rc, out + again.out, err + again.err)


def _same_store(a: Path, b: Path) -> bool:
    files = ["labels.npy", "copy.npy", "source_index.npy", "manifest.json"]
    files += [f"shards/{p.name}" for p in sorted((b / "shards").iterdir())]
    return all(_hash(a / f) == _hash(b / f) for f in files)


def _kill_and_resume(sweep: Sweep, d: Path, argv, progress) -> Result:
    argv = _fmt(argv)
    p = sweep.start(argv, d)
    for _ in range(1200):
        files = list(progress())
        if files and len(files[0].read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if (d / "out" / "results.json").exists():
        return Result(1, "", "the evaluation finished before the kill")
    return sweep.rmc(argv, d)


def _kill_augment(sweep: Sweep, d: Path, damage: str) -> Result:
    import numpy as np
    argv = _fmt(["augment", "--model", "{M}", "--out", "out", *AUG])
    p = sweep.start(argv, d)
    prog = d / "out.partial" / "progress.json"
    for _ in range(1200):
        try:
            if len(json.loads(prog.read_text())["done"]) >= 4:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    part = d / "out.partial"
    if not part.exists():
        return Result(1, "", "the build finished before the kill; no partial store to damage")
    shard = part / "shards" / "00000.npy"
    if damage == "truncate":
        os.truncate(shard, shard.stat().st_size - 3000)
    elif damage == "overwrite":
        mm = np.load(shard, mmap_mode="r+")
        mm[:50] = 255
        mm.flush()
        del mm
    elif damage == "labels":
        (part / "labels.npy").unlink()
    elif damage == "progress":
        (part / "progress.json").write_text("[1, 2")
    return sweep.rmc(argv, d)


def _damaged_records(sweep: Sweep, d: Path, how: str) -> Result:
    argv = _fmt(ev())
    r = sweep.rmc(argv, d)
    if r.rc != 0:
        return r
    rec = d / "out" / "results" / "standard" / "clean" / "rmc.jsonl"
    lines = rec.read_text().splitlines()
    if how == "interleave":       # a second writer appended its own copies
        rec.write_text("\n".join(lines[:3] + lines[1:3] + lines[3:]) + "\n")
        (d / "out" / "results" / "standard" / "clean" / "rmc.state.safetensors").unlink()
    elif how == "torn":
        rec.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
        (d / "out" / "results" / "standard" / "clean" / "rmc.state.safetensors").unlink()
    else:
        argv = _fmt(ev(extra=["--set", "rmc.lr=0.5"]))
    return sweep.rmc(argv, d)


def _on_small_disk(sweep: Sweep, d: Path, size: str, make_argv, readonly: bool = False,
                   check_clean: bool = False) -> Result:
    small = d / "small"
    with tmpfs(small, size, readonly) as ok:
        if not ok:
            return Result(0, "", "SKIP: cannot mount tmpfs (needs root)")
        r = sweep.rmc(_fmt(make_argv(small)), d)
        left = [str(p.relative_to(small)) for p in small.rglob("*") if p.is_file()]
        if check_clean and left:   # a refused command leaves nothing behind
            (d / "leftover-files.tmp").write_text(json.dumps(left))
        return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/f15-sweep")
    ap.add_argument("--only", help="run only cases whose name contains this")
    ap.add_argument("--groups", nargs="+", help="run only the cases of these groups (e.g. names paths links schema "
                                                "cluster)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--src", help="run the cases against this rmc source tree (e.g. an older commit's src); the "
                                  "workspace is still built with this tree's rmc")
    args = ap.parse_args()
    sweep = Sweep(Path(args.root))
    sweep.build_workspace()
    if args.src:
        sweep.env = {**sweep.env, "PYTHONPATH": str(Path(args.src).resolve())}
    results = []
    counts: dict[str, int] = {}
    for case in cases(sweep):
        if (args.only and args.only not in case.name) or (args.groups and case.group not in args.groups):
            continue
        if case.root_only and os.geteuid() != 0:
            continue
        t0 = time.perf_counter()
        verdict, detail = sweep.run_case(case)
        if "SKIP:" in detail:
            continue
        counts[verdict] = counts.get(verdict, 0) + 1
        results.append({"case": case.name, "group": case.group, "verdict": verdict, "detail": detail,
                        "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{verdict:10s} {case.group:9s} {case.name:40s} {detail[:150]}", flush=True)
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f"  (of {len(results)} cases)")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "cases": results}, indent=1))
    return 0 if not counts.get("wrong") and not counts.get("lost") else 1


if __name__ == "__main__":
    sys.exit(main())
