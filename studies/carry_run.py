"""Carry a long run's results across machines: copy what cannot be rebuilt into a folder that is committed.

A paper-scale run lasts many sessions, and a new session may start on a fresh machine without the run folder.
Everything the run rebuilds deterministically from its seed (D', its features) stays out: it is data, and large.
What is carried: the trained models (the first stage; training is not bit-reproducible across machines, so the
rest is rebuilt against the carried model), the evaluation sets, every record stream (`*.jsonl`), the online states
(`*.state.safetensors`: weights and Adam moments after the last recorded input), baselines and results JSON, and
each D' manifest (its content hashes, for the record: the record streams key on them, so a D' rebuilt with other
bytes is refused instead of resumed).

    python studies/carry_run.py save /work/runs/paper2 studies/reproduction/paper2 [--finished 100]  # at a stop
    python studies/carry_run.py restore studies/reproduction/paper2 /work/runs/paper2  # at the start of the next

`restore` only adds missing files (a run folder that survived keeps its newer records). `save` replaces DEST as a
whole through a temporary folder, states before records, so a run that keeps writing meanwhile is carried in a
state it can resume from (records past a state's count are dropped and recomputed on resume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

SKIP_DIRS = {"dprime", "features"}     # rebuilt from the seed by `rmc run` (data, hundreds of MB)
MAX_BYTES = 8 << 20                    # larger files are reported and left out (nothing carried is near this)
INDEX = "carried.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _records(jsonl: Path) -> int:
    return sum(1 for line in jsonl.read_text().splitlines() if line.strip()) if jsonl.exists() else 0


def carried_files(run: Path, finished: int | None = None) -> list[Path]:
    """Files of `run` to carry, relative to it: states first, so each record stream is copied after its state.
    `finished`: the online state of an evaluation stream (`rmc*.state.safetensors`) that holds this many records is
    left out: a finished stream is read from its records alone (the defense-aware rows' states also hold their
    chosen inputs, so they always travel)."""
    out = []
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if not p.is_file() or rel.parts[0] in SKIP_DIRS or any(part.endswith(".partial") for part in rel.parts):
            continue
        if (finished is not None and p.name.startswith("rmc") and p.name.endswith(".state.safetensors")
                and _records(p.with_name(p.name.removesuffix(".state.safetensors") + ".jsonl")) >= finished):
            continue
        if p.stat().st_size > MAX_BYTES:
            print(f"left out (over {MAX_BYTES >> 20} MB): {rel}", file=sys.stderr)
            continue
        out.append(rel)
    return sorted(out, key=lambda r: (not r.name.endswith(".state.safetensors"), str(r)))


def save(run: Path, dest: Path, finished: int | None = None) -> dict:
    if not run.is_dir():
        sys.exit(f"error: run folder {run} does not exist; give the folder `rmc run --out` wrote")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    files = {}
    for rel in carried_files(run, finished):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / rel, tmp / rel)
        files[str(rel)] = {"bytes": (tmp / rel).stat().st_size, "sha256": _sha256(tmp / rel)}
    manifests = {}
    for m in sorted((run / "dprime").glob("*/manifest.json")) if (run / "dprime").is_dir() else []:
        if not m.parent.name.endswith(".partial"):
            manifests[m.parent.name] = json.loads(m.read_text())
    index = {"run": str(run), "saved": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "files": files,
             "dprime_manifests": manifests}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    print(f"carried {len(files)} files ({sum(f['bytes'] for f in files.values()) / 1e6:.1f} MB) from {run} to {dest}")
    return index


def restore(src: Path, run: Path) -> list[str]:
    index_path = src / INDEX
    if not index_path.is_file():
        sys.exit(f"error: {src} holds no {INDEX}; give a folder written by `carry_run.py save`")
    from rmc.errors import RMCError
    from rmc.io import read_json
    from rmc.paths import inside
    from rmc.schema import SHA256, MapOf, Obj, Str, check
    added, kept = [], []
    try:   # the folder comes from git: its index names files to write into RUN, so none may lead out of it
        index = check(read_json(index_path, "carry index"), Obj({"files": MapOf(Str(empty=False), Obj(
            {"sha256": SHA256}))}), index_path, "check the carried folder out again from git")
        pairs = [(rel, meta, inside(src, rel, "a carried file", index_path), inside(run, rel, "a carried file",
                                                                                       index_path))
                 for rel, meta in index["files"].items()]
    except RMCError as e:
        sys.exit(f"error: {e}")
    for rel, meta, source, target in pairs:
        if _sha256(source) != meta["sha256"]:
            sys.exit(f"error: {source} does not match its hash in {index_path}; the carried folder is damaged: "
                     "check it out again from git")
        if target.exists():
            kept.append(rel)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".restoring")
        shutil.copy2(source, part)
        part.rename(target)
        added.append(rel)
    print(f"restored {len(added)} files into {run}; kept {len(kept)} that were already there")
    return added


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="copy RUN's carried files into DEST (replacing DEST)")
    s.add_argument("run", type=Path)
    s.add_argument("dest", type=Path)
    s.add_argument("--finished", type=int, metavar="N",
                   help="leave out the online state of evaluation streams with N records (the run's attack.n)")
    r = sub.add_parser("restore", help="add SRC's files to RUN where missing")
    r.add_argument("src", type=Path)
    r.add_argument("run", type=Path)
    a = ap.parse_args(argv)
    save(a.run, a.dest, a.finished) if a.cmd == "save" else restore(a.src, a.run)


if __name__ == "__main__":
    main()
