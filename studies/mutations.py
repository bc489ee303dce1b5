"""Mutation runs: does a test fail when one of the protocol's choices changes?

Each mutation below is a one-line change to the source (a file, its exact old text, the new text) that makes rmc
depart from the original RMC or from Chen et al.'s attack. For each one this script copies the source tree (src/,
tests/, the studies' scripts, pyproject.toml) into a temporary folder, applies the change there, runs the mutation's
fast tests against the copy (PYTHONPATH = the copy's src/) and records which tests fail. The working tree is never
touched, and the copy is removed afterwards, also on Ctrl-C. A mutation no test catches is a choice the suite does
not pin down.

    python studies/mutations.py                       # every mutation; table on stdout, studies/mutations.json
    python studies/mutations.py --only eps8-to-eps4   # some of them (names from --list)
    python studies/mutations.py --suite               # the whole fast suite per mutation (slow), not its tests
    python studies/mutations.py --table               # the table of the results on disk, without running

With --only, the named mutations' results replace theirs in the JSON file and the others' stay.

The unmutated copy runs the same tests first (`--no-baseline` skips it): a test failing there says nothing about a
mutation, so the script stops.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rmc.io import read_json, write_json

ROOT = Path(__file__).resolve().parents[1]

DEFENSE_TESTS = ["tests/test_fidelity.py", "tests/test_core.py"]
PRESET_TESTS = ["tests/test_fidelity.py", "tests/test_original_quirks.py"]
LAYER_TESTS = ["tests/test_original_quirks.py", "tests/test_features.py"]
ATTACK_TESTS = ["tests/test_defense_aware.py"]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str            # the departure, in words
    file: str            # relative to the repository root
    old: str             # exact text, found once in the file
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    # -- RMC as the original runs it
    Mutation("restore-best", "keep the best-validation weights instead of the last", "src/rmc/defense/config.py",
             "restore_best: bool = False ", "restore_best: bool = True  ", tuple(DEFENSE_TESTS)),
    Mutation("calib-no-replacement", "calibration draws D' rows without replacement", "src/rmc/defense/core.py",
             "rows = torch.randint(len(self.dprime), (k,), generator=gen).numpy()",
             "rows = torch.randperm(len(self.dprime), generator=gen)[:k].numpy()", tuple(DEFENSE_TESTS)),
    Mutation("calib-fresh-adam", "calibration uses a fresh Adam, not the stream's", "src/rmc/defense/core.py",
             "augment, hook=self.profile, optimizer=self.optimizer)", "augment, hook=self.profile, optimizer=None)",
             tuple(DEFENSE_TESTS)),
    Mutation("calib-holdout-floor", "calibration holds out floor(12.5%), not ceil", "src/rmc/defense/core.py",
             "n_val = max(1, math.ceil(k * self.cfg.calib_holdout))", "n_val = max(1, int(k * self.cfg.calib_holdout))",
             tuple(DEFENSE_TESTS)),
    Mutation("split-holdout-round", "the neighbours' validation part rounded, not ceil", "src/rmc/defense/core.py",
             "n_val = max(1, math.ceil(n_close * val_fraction))", "n_val = max(1, round(n_close * val_fraction))",
             tuple(DEFENSE_TESTS)),
    Mutation("early-stop-le", "early stopping counts an equal validation loss as improvement",
             "src/rmc/defense/core.py", "if val_loss < best:", "if val_loss <= best:", tuple(DEFENSE_TESTS)),
    # -- the paper preset (the original's values are the dataclasses' defaults, or the preset's entries)
    Mutation("paper-lr", "paper preset lr 2.5e-5 (the CIFAR-10 port's) instead of 1e-5", "src/rmc/defense/config.py",
             "lr: float = 1e-5 ", "lr: float = 2.5e-5 ", tuple(PRESET_TESTS)),
    Mutation("paper-k", "paper preset K 1024 instead of 2048", "src/rmc/defense/config.py",
             "k: int = 2048 ", "k: int = 1024 ", tuple(PRESET_TESTS)),
    Mutation("paper-batch", "paper preset batch 64 instead of 128", "src/rmc/defense/config.py",
             "batch_size: int = 128 ", "batch_size: int = 64  ", tuple(PRESET_TESTS)),
    Mutation("paper-patience", "paper preset patience 3 instead of 5", "src/rmc/defense/config.py",
             "patience: int = 5 ", "patience: int = 3 ", tuple(PRESET_TESTS)),
    Mutation("paper-dprime-label", "D' attacks the true label instead of the static model's prediction",
             "src/rmc/artifacts/dprime.py", 'label: str = "predicted" ', 'label: str = "true"      ',
             tuple(PRESET_TESTS)),
    Mutation("paper-eval-step", "paper preset evaluation PGD step eps/8 instead of the original's eps/16",
             "src/rmc/cli/config.py", '"attack.pgd_step_size": 0.00625,', '"attack.pgd_step_size": 0.0125,',
             tuple(PRESET_TESTS)),
    Mutation("paper-dprime-loss", "paper preset D' PGD on logits instead of the softmax output",
             "src/rmc/cli/config.py", '"augment.loss": "softmax_output",', '"augment.loss": "logits",',
             tuple(PRESET_TESTS)),
    Mutation("paper-adam-eps", "paper preset Adam epsilon 1e-8 (torch's) instead of Keras' 1e-7",
             "src/rmc/cli/config.py", '"rmc.adam_eps": 1e-7,', '"rmc.adam_eps": 1e-8,', tuple(PRESET_TESTS)),
    Mutation("layer-small-cnn", "small CNN's feature layer: the last block's output, not the last stage's input",
             "src/rmc/models/small_cnn.py", 'default_feature_layer = "block2"', 'default_feature_layer = "block3"',
             tuple(LAYER_TESTS)),
    Mutation("layer-resnet18", "ResNet-18's feature layer: the last stage's output, not its input",
             "src/rmc/models/resnet.py", 'default_feature_layer = "layer3"', 'default_feature_layer = "layer4"',
             tuple(LAYER_TESTS)),
    # -- chen2022 as Chen et al. run it
    Mutation("chen-loss-margin", "chen2022 ascends the logit margin instead of the cross-entropy",
             "src/rmc/attacks/protocols.py", 'return Lane("chen2022", "ce",', 'return Lane("chen2022", "margin",',
             tuple(ATTACK_TESTS)),
    Mutation("chen-keys-known", "chen2022's attacker runs the scored RMC (its state and keys)",
             "src/rmc/attacks/protocols.py", "1, keys_known=False, keep_clean=True)",
             "1, keys_known=True, keep_clean=True)", tuple(ATTACK_TESTS)),
    Mutation("chen-verdict-scored-key", "chen2022's verdict on the chosen input drawn with the scored RMC's key",
             "src/rmc/attacks/defense_aware.py", 'verdict_key = attacker_key(lane, key, "verdict")',
             "verdict_key = key", tuple(ATTACK_TESTS)),
    Mutation("eps8-to-eps4", "PGD step eps/4 instead of Chen et al.'s eps/8 (1/255 at 8/255)",
             "src/rmc/attacks/protocols.py", "if self.step_size is not None else self.eps / 8",
             "if self.step_size is not None else self.eps / 4", tuple(ATTACK_TESTS)),
    Mutation("no-random-start", "PGD starts at the clean input", "src/rmc/attacks/defense_aware.py",
             "adv = (x + (2 * torch.rand(x.shape, generator=gen).to(x.device) - 1) * eps).clamp(0, 1)",
             "adv = x.clone()", tuple(ATTACK_TESTS)),
    Mutation("last-iterate", "PGD returns its last iterate, not the best-loss one", "src/rmc/attacks/defense_aware.py",
             "better = loss.detach() > best_loss", "better = torch.ones_like(best_loss, dtype=torch.bool)",
             tuple(ATTACK_TESTS)),
    Mutation("iterations-x-models", "FPA and GMSA-AVG also run steps x models attacked iterations (only GMSA-MIN does)",
             "src/rmc/attacks/defense_aware.py",
             'iterations = lane.steps * (len(targets) if kind == "gmsa-min" else 1)',
             "iterations = lane.steps * len(targets)", tuple(ATTACK_TESTS)),
    Mutation("iterations-x-set", "every attack runs steps x (models in the set so far) iterations, FPA included",
             "src/rmc/attacks/defense_aware.py",
             'iterations = lane.steps * (len(targets) if kind == "gmsa-min" else 1)',
             "iterations = lane.steps * len(models)", tuple(ATTACK_TESTS)),
]


@dataclass
class Outcome:
    name: str
    what: str
    file: str
    tests_run: list[str]
    failed: list[str]        # test node ids that failed under the mutation
    passed: int
    seconds: float
    error: str | None = None   # pytest could not run (collection error, crash): counts as caught, with its reason

    @property
    def caught(self) -> bool:
        return bool(self.failed) or self.error is not None


def copy_tree(dest: Path) -> None:
    """What the tests need of the repository: the package, the tests, the studies' scripts (some tests load
    them), pyproject.toml (pytest's markers); no run folders or carried data."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "src", dest / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    (dest / "studies").mkdir()
    for script in (ROOT / "studies").glob("*.py"):
        shutil.copy2(script, dest / "studies" / script.name)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def apply(tree: Path, m: Mutation) -> None:
    path = tree / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"error: mutation {m.name!r}: {m.file} holds its old text {count} times (expected once); "
                         "the source moved on: update MUTATIONS")
    path.write_text(text.replace(m.old, m.new))


FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
PASSED = re.compile(r"(\d+) passed")


def run_tests(tree: Path, tests: list[str], timeout: float) -> tuple[list[str], int, str | None, float]:
    """(failed node ids, passed count, error or None, seconds) of pytest over `tests` in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "not slow", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [], 0, f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    failed = sorted(set(FAILED.findall(out)))
    passed = int(PASSED.search(out).group(1)) if PASSED.search(out) else 0
    error = None
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not failed):
        tail = out.strip().splitlines()[-1] if out.strip() else ""
        error = f"pytest exit {proc.returncode}: {tail[:200]}"
    return failed, passed, error, seconds


def short(node: str) -> str:
    """tests/test_x.py::test_y[p] -> test_x::test_y[p]"""
    return node.replace("tests/", "").replace(".py::", "::")


def table(outcomes: list[Outcome]) -> str:
    lines = ["| mutation | what changes | caught by (failing tests) | tests run |", "|---|---|---|---|"]
    for o in outcomes:
        caught = ", ".join(f"`{short(f)}`" for f in o.failed) or (o.error or "**not caught**")
        lines.append(f"| `{o.name}` | {o.what} | {caught} | {len(o.failed) + o.passed} in "
                     f"{', '.join(short(t) for t in o.tests_run)} ({o.seconds:.0f} s) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--table", action="store_true", help="print the table of the results in --out and exit")
    ap.add_argument("--suite", action="store_true", help="run the whole fast suite per mutation")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run (default 1800)")
    ap.add_argument("--out", type=Path, default=ROOT / "studies" / "mutations.json", help="JSON results")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:24} {m.file}: {m.what}")
        return 0
    if args.table:
        outcomes = load_outcomes(args.out)
        print(table([outcomes[m.name] for m in MUTATIONS if m.name in outcomes]))
        return 0
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            raise SystemExit(f"error: unknown mutation {unknown[0]!r}; --list names them")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="rmc-mutations-") as tmp:
        clean = Path(tmp) / "clean"
        copy_tree(clean)
        for m in chosen:   # every mutation's old text is there before anything runs
            text = (clean / m.file).read_text()
            if text.count(m.old) != 1:
                raise SystemExit(f"error: mutation {m.name!r}: {m.file} holds its old text {text.count(m.old)} times "
                                 "(expected once); the source moved on: update MUTATIONS")
        if not args.no_baseline:
            tests = ["tests"] if args.suite else sorted({t for m in chosen for t in m.tests})
            print(f"baseline: {' '.join(tests)} on the unmutated copy ...", flush=True)
            failed, passed, error, seconds = run_tests(clean, tests, args.timeout)
            if failed or error:
                raise SystemExit(f"error: the unmutated tests fail ({error or ', '.join(failed)}); fix them first")
            print(f"baseline: {passed} passed in {seconds:.0f} s", flush=True)
        for i, m in enumerate(chosen, 1):
            tree = Path(tmp) / m.name
            shutil.copytree(clean, tree)
            apply(tree, m)
            tests = ["tests"] if args.suite else list(m.tests)
            failed, passed, error, seconds = run_tests(tree, tests, args.timeout)
            shutil.rmtree(tree)
            o = Outcome(m.name, m.what, m.file, tests, failed, passed, round(seconds, 1), error)
            outcomes.append(o)
            verdict = f"caught by {len(failed)} test(s)" if failed else (error or "NOT CAUGHT")
            print(f"[{i}/{len(chosen)}] {m.name}: {verdict} ({seconds:.0f} s)", flush=True)
    print()
    print(table(outcomes))
    # The file keeps every mutation's latest outcome: a run of some (--only) replaces theirs.
    merged = {**load_outcomes(args.out), **{o.name: o for o in outcomes}}
    kept = [merged[m.name] for m in MUTATIONS if m.name in merged]
    missed = [o.name for o in kept if not o.caught]
    write_json(args.out, {"mutations": [asdict(m) for m in MUTATIONS if m.name in merged],
                          "outcomes": [{**asdict(o), "caught": o.caught} for o in kept], "not_caught": missed})
    print(f"\n{sum(o.caught for o in outcomes)} of {len(outcomes)} mutations caught in this run; {args.out} holds "
          f"{len(kept)}, {len(missed)} not caught")
    return 1 if any(not o.caught for o in outcomes) else 0


def load_outcomes(path: Path) -> dict[str, Outcome]:
    """The outcomes saved in `path` by name (none if it does not exist); those of mutations no longer listed are
    dropped."""
    if not path.exists():
        return {}
    names = {m.name for m in MUTATIONS}
    saved = read_json(path, "mutation results").get("outcomes", [])
    what = {m.name: m.what for m in MUTATIONS}   # the wording of the list as it is now
    return {o["name"]: Outcome(**{**{k: v for k, v in o.items() if k != "caught"}, "what": what[o["name"]]})
            for o in saved if o["name"] in names}


if __name__ == "__main__":
    sys.exit(main())
