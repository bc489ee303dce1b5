"""Online RMC's compute paths side by side, on both x86 instruction sets, each against the naive reference in the
same run.

    python benchmarks/compute_paths.py            # quick: 8 inputs per path (a smoke test, ~5 minutes on 2 cores)
    python benchmarks/compute_paths.py --full     # the table of benchmarks/README.md: 100 inputs per path

Paths (default-run settings, fp32, one thread):
  plain            the model as it is (rmc.fast_path false)
  fast             the rewritten graph (rmc.defense.fastpath) with PyTorch operations only (kernels off)
  fast+kernels     the rewritten graph with the kernels of rmc.defense.kernels (the default)
  compiled         torch.compile (inductor) of the model: forward and, through AOTAutograd, backward
  compiled fast+kernels   torch.compile of the rewritten graph, kernels included (they are operators it can trace)

Each instruction set runs in its own processes (oneDNN and ATen read their limits once, at start): native, and AVX2
emulated with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2. The compiled paths run in a process of their own,
with the reference again, so that a crash of the compiler costs only their row, and with an inductor cache of
their own per instruction set (<workdir>/inductor-<set>): torch.compile's on-disk cache does not key on ATen's
capability, and code cached under one was reused under the other, giving wrong predictions or crashing. In every
process the paths step through the same inputs interleaved (benchmarks/bench.py's run_interleaved), so load from
other processes falls on all alike; the ratios are what to compare across machines, the seconds only on this one.
Results: <workdir>/compute-paths[-full].json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from isa_children import ISA_TAGS, ISAS, report, run_child

GROUPS = {"eager": ("plain", "fast", "fast+kernels"), "compiled": ("compiled", "compiled fast+kernels")}


def child(group: str, n: int, workdir: Path) -> dict:
    """Runs the reference and `group`'s paths on n inputs in this process; returns their statistics."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from bench import rmc_impl, run_interleaved, without_kernels
    from common import DEFAULT_RUN_DPRIME, LAYER, get_dprime, get_model, make_bank, run_cfg, subset_rows, test_inputs
    from reference import NaiveRMC

    from rmc.defense import RMC, build_rmc, kernels
    from rmc.defense.fastpath import fast_forward
    from rmc.defense.forwards import PlainForward, compute_path
    from rmc.defense.knn import NeighbourIndex

    torch.set_num_threads(1)
    model, info = get_model(workdir)
    images, labels, copies, feats = get_dprime(workdir, model, info, LAYER)
    rows = subset_rows(len(images) // 4, DEFAULT_RUN_DPRIME, 3)
    bank = make_bank(images[rows], labels[rows], copies[rows])
    feats_run = feats[rows]
    x, y, q = test_inputs(n + 1, model, LAYER)          # the last one is run_interleaved's untimed warm-up
    cfg = run_cfg()
    index = NeighbourIndex(feats_run)
    sample = bank.gather(range(8))[0]
    ref = NaiveRMC(model, bank.images.numpy(), bank.labels.numpy(), feats_run, cfg, seed=0)
    impls = {"reference": lambda xi, fi, i: ref.step(xi, fi)}
    paths = {}
    if group == "eager":
        impls["plain"] = rmc_impl(build_rmc(model, bank, index, run_cfg(fast_path=False), LAYER))
        impls["fast"] = without_kernels(rmc_impl(build_rmc(model, bank, index, cfg, LAYER)))
        impls["fast+kernels"] = rmc_impl(build_rmc(model, bank, index, cfg, LAYER))
        paths = {"plain": compute_path(run_cfg(fast_path=False), "cpu"), "fast+kernels": compute_path(cfg, "cpu")}
    else:
        compiled = RMC(model, bank, index, run_cfg(fast_path=False), LAYER,
                       forward=lambda m: PlainForward(torch.compile(m)))
        compiled_fast = RMC(model, bank, index, cfg, LAYER,
                            forward=lambda m: PlainForward(torch.compile(fast_forward(m, sample))))
        impls["compiled"], impls["compiled fast+kernels"] = rmc_impl(compiled), rmc_impl(compiled_fast)
    t0 = time.perf_counter()
    res = run_interleaved(impls, x, y, q, n, group)
    ref_preds = res["reference"]["preds"]
    for r in res.values():
        r["speedup_vs_reference"] = res["reference"]["s_per_input"] / r["s_per_input"]
        r["agreement_with_reference"] = sum(a == b for a, b in zip(r.pop("preds"), ref_preds, strict=True)) / n
    return {"paths": res, "seconds": time.perf_counter() - t0, "kernels": kernels.load(),
            "capability": torch.backends.cpu.get_cpu_capability(), "compute_paths": paths,
            "loadavg": os.getloadavg()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="100 inputs per path (the README's table)")
    ap.add_argument("--n", type=int, default=None, help="inputs per path (default 8, or 100 with --full)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("RMC_BENCH_DIR", "/tmp/rmc-bench")))
    ap.add_argument("--isas", nargs="+", choices=list(ISA_TAGS.values()), default=list(ISA_TAGS.values()),
                    help="instruction sets to measure (default: both); the others' rows are kept from the results file")
    ap.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS),
                    help="eager and/or compiled paths (default: both)")
    ap.add_argument("--child", choices=list(GROUPS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = args.n or (100 if args.full else 8)
    if args.child:
        report(child(args.child, n, args.workdir))
        return
    path = args.workdir / f"compute-paths{'-full' if args.full else ''}.json"
    out = {"inputs": n, "cpus": os.cpu_count(), "results": {}}
    earlier = json.loads(path.read_text()) if path.exists() else {}
    if earlier.get("inputs") == n:   # a partial re-run keeps the other rows
        out["results"] = earlier["results"]
    for isa, env in ISAS.items():
        for group in GROUPS:
            if ISA_TAGS[isa] not in args.isas or group not in args.groups:
                continue
            env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(args.workdir / f"inductor-{ISA_TAGS[isa]}")}
            print(f"[{isa}] {group} paths, {n} inputs ...", flush=True)
            t0 = time.perf_counter()
            result, code, why = run_child([__file__, "--child", group, "--n", str(n), "--workdir",
                                           str(args.workdir)], env)
            if result is None:
                print(f"[{isa}] {group}: the process failed (exit {code}): {why}", flush=True)
                out["results"][f"{isa}/{group}"] = {"failed": code, "why": why}
                continue
            out["results"][f"{isa}/{group}"] = result
            print(f"[{isa}] {group} done in {time.perf_counter() - t0:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    print(table(out))
    print(f"results in {path}")


def table(out: dict) -> str:
    lines = ["| instruction set | path | s / input | vs reference (same process) | accuracy "
             "| same class as reference |",
             "|---|---|---|---|---|---|"]
    order = [f"{isa}/{group}" for isa in ISAS for group in GROUPS]
    for key, r in sorted(out["results"].items(), key=lambda kv: order.index(kv[0])):
        isa, group = key.split("/")
        if "failed" in r:
            for path in GROUPS[group]:
                lines.append(f"| {isa} | {path} | failed (exit {r['failed']}: {r['why'][:80]}) | - | - | - |")
            continue
        for path, s in r["paths"].items():
            if path == "reference" and group != "eager":
                continue
            lines.append(f"| {isa} | {path} | {s['s_per_input']:.3f} | {s['speedup_vs_reference']:.2f}x | "
                         f"{s['accuracy'] * 100:.0f}% | {s['agreement_with_reference'] * 100:.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
