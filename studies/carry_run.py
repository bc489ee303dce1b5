"""Carry a long run's results across machines: copy what cannot be rebuilt into a folder that is committed.

A paper-scale run lasts many sessions, and a new session may start on a fresh machine without the run folder.
Everything the run rebuilds deterministically from its seed (D', its features) stays out: it is data, and large.
What an unfinished run carries: the trained models (the first stage; training is not bit-reproducible across
machines, so the rest is rebuilt against the carried model), the evaluation sets, every record stream (`*.jsonl`),
the online states (`*.state.safetensors`: weights and Adam moments after the last recorded input), baselines and
results JSON, and each D' manifest (its content hashes, for the record: the record streams key on them, so a D'
rebuilt with other bytes is refused instead of resumed).

A finished run (`--finished N` and every record stream holds N records) carries its records, tables, figures and
configuration only: its tensors (model weights, online states, evaluation and attack sets: every `.safetensors`),
which only resuming or re-scoring needs, and `report.html` (the figures again, rebuilt by `rmc report` from the
records) stay out of git. `carried.json` lists them under `left_out` with their hashes; the run's own command
regenerates them in a fresh folder.

    python studies/carry_run.py save /work/runs/paper2 studies/reproduction/paper2 [--finished 100]  # at a stop
    python studies/carry_run.py restore studies/reproduction/paper2 /work/runs/paper2  # at the start of the next
    python studies/carry_run.py prune studies/reproduction/paper2 --finished 50   # a carried run that has finished

`restore` only adds missing files (a run folder that survived keeps its newer records). `save` replaces DEST as a
whole through a temporary folder, states before records, so a run that keeps writing meanwhile is carried in a
state it can resume from (records past a state's count are dropped and recomputed on resume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

SKIP_DIRS = {"dprime", "features"}     # rebuilt from the seed by `rmc run` (data, hundreds of MB)
FEATURE_FILES = ("features-*.npy", "features-*.json")   # `rmc evaluate`'s features in its --out: rebuilt, data too
MAX_BYTES = 8 << 20                    # larger files are reported and left out (nothing carried is near this)
INDEX = "carried.json"
STREAMS = ("rmc*.jsonl", "attack.jsonl")   # per-input record streams: RMC's, and the defense-aware rows'
REPORT = "report.html"                 # rmc report's page: the figures (kept as PNGs) and tables, rebuilt from records


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _records(jsonl: Path) -> int:
    return sum(1 for line in jsonl.read_text().splitlines() if line.strip()) if jsonl.exists() else 0


def run_finished(run: Path, finished: int | None) -> bool:
    """Whether every record stream of `run` holds `finished` records (a run with no stream is not finished)."""
    streams = [p for pattern in STREAMS for p in run.rglob(pattern) if p.is_file()]
    return finished is not None and bool(streams) and all(_records(p) >= finished for p in streams)


def only_for_resuming(rel: Path) -> bool:
    """What a finished run leaves out of git: its tensors (weights, online states, image sets) and report page."""
    return rel.name.endswith(".safetensors") or rel.name == REPORT


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
        if len(rel.parts) == 1 and any(p.match(pattern) for pattern in FEATURE_FILES):
            continue
        if (finished is not None and p.name.startswith("rmc") and p.name.endswith(".state.safetensors")
                and _records(p.with_name(p.name.removesuffix(".state.safetensors") + ".jsonl")) >= finished):
            continue
        if p.stat().st_size > MAX_BYTES:
            print(f"left out (over {MAX_BYTES >> 20} MB): {rel}", file=sys.stderr)
            continue
        out.append(rel)
    return sorted(out, key=lambda r: (not r.name.endswith(".state.safetensors"), str(r)))


def compute_path() -> dict:
    """What decides D''s bytes on a CPU besides the seed: PGD's arithmetic runs on ATen's and oneDNN's vectorised
    code for the CPU's instruction set (the thread count does not change them; studies/README.md)."""
    import torch
    return {"aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "torch": torch.__version__.split("+")[0]}


def compute_path_hint(carried: dict, here: dict) -> str | None:
    """A note when this machine would rebuild D' on another compute path than the one the carried run's D' was
    built on (its record streams key on D''s bytes, so a D' with other bytes is refused), with the settings that
    run the carried path here where that is possible."""
    if not carried or carried == here:
        return None
    was, now = carried.get("aten_cpu_capability"), here.get("aten_cpu_capability")
    text = (f"note: this run's D' was built with torch {carried.get('torch')} on the {was} code path; this machine "
            f"runs torch {here.get('torch')} on {now}: a rebuilt D' may differ in its bytes, and then its record "
            "streams are refused")
    if was == "AVX2" and now in ("AVX512", "AVX512_VNNI", "AVX512_BF16") and carried.get("torch") == here["torch"]:
        text += ("; to rebuild the same path here, run the run's command with ONEDNN_MAX_CPU_ISA=AVX2 "
                 "ATEN_CPU_CAPABILITY=avx2 (whether that emulation gives a real AVX2 CPU's bytes is not measured)")
    return text


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def save(run: Path, dest: Path, finished: int | None = None) -> dict:
    """Copy `run`'s carried files into `dest` (replacing it whole); a finished run leaves its tensors out."""
    if not run.is_dir():
        sys.exit(f"error: run folder {run} does not exist; give the folder `rmc run --out` wrote")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    done = run_finished(run, finished)
    files, left_out = {}, {}
    for rel in carried_files(run, finished):
        if done and only_for_resuming(rel):
            left_out[str(rel)] = _entry(run / rel)
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / rel, tmp / rel)
        files[str(rel)] = _entry(tmp / rel)
    manifests = {}
    for m in sorted((run / "dprime").glob("*/manifest.json")) if (run / "dprime").is_dir() else []:
        if not m.parent.name.endswith(".partial"):
            manifests[m.parent.name] = json.loads(m.read_text())
    index = {"run": str(run), "saved": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "finished": done, "files": files,
             "dprime_manifests": manifests, "compute_path": compute_path(), "left_out": left_out}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    print(f"carried {len(files)} files ({sum(f['bytes'] for f in files.values()) / 1e6:.1f} MB) from {run} to {dest}"
          + (f"; finished: left out {len(left_out)} files only resuming needs" if done else ""))
    return index


def prune(dest: Path, finished: int) -> list[str]:
    """A carried run that has finished since: drop from `dest` what only resuming needs, as `save` would have."""
    index_path = dest / INDEX
    if not index_path.is_file():
        sys.exit(f"error: {dest} holds no {INDEX}; give a folder written by `carry_run.py save`")
    if not run_finished(dest, finished):
        sys.exit(f"error: {dest} has record streams with fewer than {finished} records; it is not finished, so it "
                 "keeps what resuming needs")
    index = json.loads(index_path.read_text())
    dropped = [rel for rel in index["files"] if only_for_resuming(Path(rel))]
    for rel in dropped:
        index.setdefault("left_out", {})[rel] = index["files"].pop(rel)
    index["finished"] = True
    index_path.write_text(json.dumps(index, indent=1) + "\n")     # first: a stopped prune leaves no dangling entry
    for rel in dropped:
        (dest / rel).unlink(missing_ok=True)
    for folder in sorted({(dest / rel).parent for rel in dropped}, key=lambda p: -len(p.parts)):
        while folder != dest and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    print(f"pruned {len(dropped)} files from {dest}; it keeps {len(index['files'])}")
    return dropped


def restore(src: Path, run: Path) -> list[str]:
    """Add the files carried in `src` to `run` where missing, each checked against its hash."""
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
    carried_path = index.get("compute_path")
    if not index.get("finished") and isinstance(carried_path, dict):   # a finished run rebuilds no D' to resume
        hint = compute_path_hint(carried_path, compute_path())
        if hint:
            print(hint, file=sys.stderr)
    if index.get("left_out"):
        print(f"{src} is a finished run: {len(index['left_out'])} files only resuming needs (model weights, online "
              "states, evaluation sets) were left out; its command regenerates them in a fresh folder")
    return added


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="copy RUN's carried files into DEST (replacing DEST)")
    s.add_argument("run", type=Path)
    s.add_argument("dest", type=Path)
    s.add_argument("--finished", type=int, metavar="N",
                   help="leave out the online state of evaluation streams with N records (the run's attack.n); "
                        "when every stream holds N, the run is finished and leaves out every tensor")
    r = sub.add_parser("restore", help="add SRC's files to RUN where missing")
    r.add_argument("src", type=Path)
    r.add_argument("run", type=Path)
    p = sub.add_parser("prune", help="drop from a carried finished run what only resuming needs")
    p.add_argument("dest", type=Path)
    p.add_argument("--finished", type=int, metavar="N", required=True,
                   help="the records every stream holds when the run is finished")
    a = ap.parse_args(argv)
    if a.cmd == "save":
        save(a.run, a.dest, a.finished)
    elif a.cmd == "restore":
        restore(a.src, a.run)
    else:
        prune(a.dest, a.finished)


if __name__ == "__main__":
    main()
