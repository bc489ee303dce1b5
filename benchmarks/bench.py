"""rmc against the naive reference (benchmarks/reference.py), side by side in one process.

    python benchmarks/bench.py            # quick: ~1 minute on 2 cores (8 inputs: a smoke test, not the figures)
    python benchmarks/bench.py --full     # the figures of benchmarks/README.md (~7 minutes on 2 quiet cores)

Same model, D', test inputs, K, epochs and seed for both. Timings alternate between the implementations input by
input (the order rotating), so load from other processes falls on both alike. Sections (--sections):

  matmul   the machine's matrix-product FLOP/s (fp32, bf16), measured here, now
  search   neighbour search over |D'| = 240,000: reference loop vs FAISS (exact; IVF with recall)
  latency  online RMC, full adaptation, default-run settings: per-input latency, accuracy, agreement, profile, FLOP/s
  ablation rmc with and without the fast path (what the rewritten graph adds to removing the per-epoch overhead),
           and one training step against its 3x3 convolutions alone
  scopes   adaptation scope all / head / bn on the default run: latency and accuracy
  threads  rmc with 1 vs 2 intra-op threads
  batched  episodic: B inputs at once vs one at a time (throughput, agreement)
  memory   peak resident memory of rmc evaluating against the 240k D' (a separate process)

The settings are the default run's, read from rmc.cli.config's preset. Results are printed and written to
<workdir>/bench-results[-full][-malloc][-<sections>].json (a run of some sections never overwrites a whole run).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Before numpy / FAISS load their OpenBLAS: on AVX-512 AMD CPUs use its AVX-512 kernels (this machine's
    # environment sets OPENBLAS_CORETYPE=Haswell, AVX2). RMC_BENCH_KEEP_OPENBLAS=1 keeps the environment's choice.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from rmc.cpu import configure_openblas
    configure_openblas(force=not os.environ.get("RMC_BENCH_KEEP_OPENBLAS"))

import argparse
import copy
import json
import statistics
import subprocess
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_RUN,
    DEFAULT_RUN_DPRIME,
    DEFAULT_WORKDIR,
    LAYER,
    get_dprime,
    get_model,
    log,
    make_bank,
    peak_rss_mb,
    run_cfg,
    subset_rows,
    test_inputs,
)
from reference import NaiveRMC, naive_knn  # noqa: E402

from rmc.attacks import pgd  # noqa: E402
from rmc.defense import (  # noqa: E402
    RMC,
    RMCConfig,
    build_rmc,
    kernels,  # noqa: E402
)
from rmc.defense.batched import BatchedEpisodic  # noqa: E402
from rmc.defense.knn import NeighbourIndex  # noqa: E402
from rmc.defense.profiling import PhaseTimer  # noqa: E402

ALL_SECTIONS = ("matmul", "search", "latency", "ablation", "scopes", "threads", "batched", "memory")
SIZES = {  # quick / full
    "search_ref_queries": (8, 40), "search_queries": (1000, 1000),
    "latency_inputs": (8, 200), "ablation_inputs": (3, 16), "scope_inputs": (6, 60), "thread_inputs": (1, 6),
    "batched_rounds": (1, 2), "memory_steps": (10, 40),
}


def settings_text() -> str:
    """The default run's RMC settings that differ from RMCConfig's (the original's) values."""
    original = RMCConfig()
    return ", ".join(f"{k} {v}" for k, v in DEFAULT_RUN.items() if getattr(original, k) != v)


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def _times(fn, reps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `reps` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _best_rate(fn, flops: float, reps: int = 5) -> float:
    return flops / min(_times(fn, reps))


def matmul_flops(dtype: torch.dtype) -> dict[str, float]:
    """Attainable matrix-product FLOP/s for `dtype`, two ways: torch.mm of 2048 x 2048 matrices (MKL for fp32, which
    on this AMD CPU runs its AVX2 kernels; oneDNN for bf16) and a 3x3 convolution as implicit GEMM through oneDNN
    (AVX-512), 64 x 256 x 14 x 14 -> 256 channels. `peak` is the better of the two."""
    n = 2048
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    x = torch.randn(64, 256, 14, 14).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    mm = _best_rate(lambda: a @ b, 2 * n ** 3)
    conv = _best_rate(lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 64 * 196 * 256 * 256 * 9)
    return {"mm": mm, "conv": conv, "peak": max(mm, conv)}


def section_matmul(args, out):
    now = {"fp32": matmul_flops(torch.float32), "bf16": matmul_flops(torch.bfloat16)}
    prev = out.get("matmul", {})
    out["matmul"] = {d: {k: max(v, prev.get(d, {}).get(k, 0.0)) for k, v in now[d].items()} for d in now}
    out["matmul_flops"] = {d: out["matmul"][d]["peak"] for d in now}
    log(f"[matmul] {args.threads} thread(s): " + "; ".join(
        f"{d} torch.mm {v['mm'] / 1e9:.0f} GFLOP/s, oneDNN conv {v['conv'] / 1e9:.0f} GFLOP/s" for d, v in now.items()))


# ------------------------------------------------------------------------------------------------ search
def section_search(args, out, feats, q_all):
    nref, nq = SIZES["search_ref_queries"][args.full], SIZES["search_queries"][args.full]
    k = DEFAULT_RUN["k"]
    idx, t_build = timed(NeighbourIndex, feats)
    ref_rows, t_ref, t_one, t_batch = [], [], [], []
    per_round = max(1, nref // 4)
    got_rows = None
    for r in range(0, nref, per_round):
        qs = q_all[r:r + per_round]
        for q in qs:                                              # the reference: one query at a time
            rows, dt = timed(naive_knn, feats, q, k)
            ref_rows.append(rows)
            t_ref.append(dt)
        for q in qs:                                              # rmc, one query at a time (as RMC.step)
            t_one.append(timed(idx.search, q[None], k)[1])
        (_, rows_b), dt = timed(idx.search, q_all[:nq], k)        # rmc, all test inputs at once (as the runner)
        t_batch.append(dt / nq)
        got_rows = rows_b
    ref_rows = np.stack(ref_rows)
    identical = int((got_rows[:nref] == ref_rows).all(1).sum())
    same_sets = int(sum(set(a) == set(b) for a, b in zip(got_rows[:nref], ref_rows, strict=True)))
    res = {"dprime": len(feats), "dim": feats.shape[1], "k": k, "ref_queries": nref, "batch_queries": nq,
           "ref_s_per_query": statistics.mean(t_ref), "flat_single_s_per_query": statistics.mean(t_one),
           "flat_batched_s_per_query": statistics.mean(t_batch), "flat_build_s": t_build,
           "identical_ordered": identical, "identical_sets": same_sets}
    res["speedup_batched"] = res["ref_s_per_query"] / res["flat_batched_s_per_query"]
    res["speedup_single"] = res["ref_s_per_query"] / res["flat_single_s_per_query"]
    # Approximate: IVF, recall of the exact K neighbours.
    exact = got_rows
    for nprobe in (16, 64):
        ivf, t_b = timed(NeighbourIndex, feats, "ivf", nlist=1024, nprobe=nprobe)
        (_, rows_i), dt = timed(ivf.search, q_all[:nq], k)
        recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(rows_i, exact, strict=True)]))
        res[f"ivf_nprobe{nprobe}"] = {"build_s": t_b, "s_per_query": dt / nq, "recall_at_k": recall,
                                      "speedup_vs_ref": res["ref_s_per_query"] / (dt / nq)}
        del ivf
    out["search"] = res
    log(f"[search] |D'| = {len(feats):,}, K = {k}: reference {res['ref_s_per_query'] * 1e3:.1f} ms/query; "
        f"FAISS flat {res['flat_batched_s_per_query'] * 1e3:.3f} ms/query batched ({res['speedup_batched']:.0f}x), "
        f"{res['flat_single_s_per_query'] * 1e3:.2f} ms one at a time ({res['speedup_single']:.1f}x); "
        f"identical neighbours (ordered) {identical}/{nref}, sets {same_sets}/{nref}")
    for nprobe in (16, 64):
        r = res[f"ivf_nprobe{nprobe}"]
        log(f"[search] IVF nlist 1024 nprobe {nprobe}: {r['s_per_query'] * 1e3:.3f} ms/query "
            f"({r['speedup_vs_ref']:.0f}x), recall@K {r['recall_at_k']:.4f}, build {r['build_s']:.1f} s")


# ------------------------------------------------------------------------------------------------ latency
def step_flops(rmc: RMC, x, feats) -> float:
    """FLOPs of one full RMC step (adaptation, prediction, calibration), counted on a copy of `rmc`."""
    r = rmc.clone()
    with FlopCounterMode(display=False) as fc:
        r.step(x, feats, key=("flops", 0))
    return float(fc.get_total_flops())


def run_interleaved(impls: dict, x, y, feats, n: int, label: str) -> dict:
    """Each implementation steps through the same n inputs; per input the order rotates. Returns per-impl stats.

    Each first steps once, untimed, through the last input (not among the n): one-time costs (convolution primitives
    built, memory first touched) would otherwise fall on whichever implementation goes first."""
    names = list(impls)
    times = {k: [] for k in names}
    preds = {k: [] for k in names}
    w = len(x) - 1
    assert w >= n, "the warm-up input must not be one of the timed ones"
    for k in names:
        impls[k](x[w:w + 1], feats[w:w + 1], w)
    t_start = time.perf_counter()
    for i in range(n):
        order = names[i % len(names):] + names[:i % len(names)]
        for k in order:
            p, dt = timed(impls[k], x[i:i + 1], feats[i:i + 1], i)
            times[k].append(dt)
            preds[k].append(p)
        if (i + 1) % max(1, n // 10) == 0:
            msg = ", ".join(f"{k} {statistics.mean(times[k]):.2f}s" for k in names)
            log(f"  [{label}] {i + 1}/{n} inputs ({time.perf_counter() - t_start:.0f} s): {msg}")
    yy = y[:n].numpy()
    return {k: {"s_per_input": statistics.mean(times[k]), "median_s": statistics.median(times[k]),
                "accuracy": float((np.array(preds[k]) == yy).mean()), "preds": [int(p) for p in preds[k]]}
            for k in names}


def rmc_impl(rmc: RMC):
    return lambda x, f, i: rmc.step(x, f, key=i).prediction


def without_kernels(impl):
    """`impl` with the fast path's C kernels switched off (their PyTorch fallback instead)."""
    def run(*args):
        with kernels.use(False):
            return impl(*args)
    return run


def section_latency(args, out, model, bank_run, feats_run, x, y, q):
    n = args.n_latency or SIZES["latency_inputs"][args.full]
    cfg = run_cfg()
    index = NeighbourIndex(feats_run)
    images, labels = bank_run.images.numpy(), bank_run.labels.numpy()
    ref = NaiveRMC(model, images, labels, feats_run, cfg, seed=0)
    variants = {"rmc-fp32": build_rmc(model, bank_run, index, cfg, LAYER),
                "rmc-bf16": build_rmc(model, bank_run, index, run_cfg(precision="bf16"), LAYER)}
    for r in variants.values():
        r.profile = PhaseTimer()
    impls = {"reference": lambda xi, fi, i: ref.step(xi, fi), **{k: rmc_impl(r) for k, r in variants.items()}}
    log(f"[latency] online RMC, default-run settings ({settings_text()}), |D'| = {len(bank_run):,}, {n} inputs ...")
    res = run_interleaved(impls, x, y, q, n, "latency")
    peak = out.get("matmul_flops", {})
    for k, r in variants.items():
        t = r.profile
        flops = step_flops(r, x[:1], q[:1])
        passes, total = t.passes() / t.steps, t.total() / t.steps
        res[k]["profile_s_per_input"] = {p: s / t.steps for p, s in t.summary().items()}
        res[k]["outside_passes_fraction"] = 1 - passes / total
        res[k]["flops_per_input"] = flops
        res[k]["flops_per_s_in_passes"] = flops / passes
        res[k]["flops_per_s_overall"] = flops / res[k]["s_per_input"]
        dtype = "bf16" if "bf16" in k else "fp32"
        if peak:
            res[k]["fraction_of_matmul_peak"] = res[k]["flops_per_s_overall"] / peak[dtype]
            res[k]["fraction_of_fp32_matmul_peak"] = res[k]["flops_per_s_overall"] / peak["fp32"]
            res[k]["peak_dtype"] = dtype
        res[k]["speedup_vs_reference"] = res["reference"]["s_per_input"] / res[k]["s_per_input"]
        res[k]["agreement_with_reference"] = float(np.mean(np.array(res[k]["preds"])
                                                           == np.array(res["reference"]["preds"])))
    res["reference"]["profile_s_per_input"] = {p: s / ref.steps
                                               for p, s in sorted(ref.seconds.items(), key=lambda kv: -kv[1])}
    out["latency"] = {"inputs": n, "dprime": len(bank_run), "settings": DEFAULT_RUN, "threads": args.threads, **res}
    log(f"[latency] reference {res['reference']['s_per_input']:.3f} s/input, "
        f"accuracy {res['reference']['accuracy']:.3f}; profile (ms/input): "
        + ", ".join(f"{p} {s * 1e3:.1f}" for p, s in res["reference"]["profile_s_per_input"].items()))
    for k in variants:
        r = res[k]
        frac = f", {r['fraction_of_matmul_peak'] * 100:.0f}% of the {r['peak_dtype']} matmul peak" if peak else ""
        log(f"[latency] {k}: {r['s_per_input']:.3f} s/input ({r['speedup_vs_reference']:.2f}x faster), accuracy "
            f"{r['accuracy']:.3f}, same class as reference {r['agreement_with_reference'] * 100:.1f}%; outside forward/"
            f"backward {r['outside_passes_fraction'] * 100:.1f}%; {r['flops_per_input'] / 1e9:.1f} GFLOP/input at "
            f"{r['flops_per_s_overall'] / 1e9:.1f} GFLOP/s{frac}")
        prof = ", ".join(f"{p} {s * 1e3:.1f}" for p, s in r["profile_s_per_input"].items())
        log(f"[latency] {k} profile (ms/input): {prof}")


# ------------------------------------------------------------------------------------------------ ablation
def section_ablation(args, out, model, bank_run, feats_run, x, y, q):
    n = SIZES["ablation_inputs"][args.full]
    index = NeighbourIndex(feats_run)
    variants = {"fast-path": build_rmc(model, bank_run, index, run_cfg(), LAYER),
                "fast-path-no-kernels": build_rmc(model, bank_run, index, run_cfg(), LAYER),
                "plain-model": build_rmc(model, bank_run, index, run_cfg(fast_path=False), LAYER)}
    impls = {k: rmc_impl(v) for k, v in variants.items()}
    impls["fast-path-no-kernels"] = without_kernels(impls["fast-path-no-kernels"])
    log(f"[ablation] rmc fp32 with the fast path (with / without its C kernels) and without it, {n} inputs ...")
    r = run_interleaved(impls, x, y, q, n, "ablation")
    out["ablation"] = {"inputs": n, **{k: {kk: vv for kk, vv in v.items() if kk != "preds"} for k, v in r.items()},
                       "same_predictions": float(np.mean(np.array(r["fast-path"]["preds"])
                                                         == np.array(r["plain-model"]["preds"])))}
    log("[ablation] " + "; ".join(f"{k} {v['s_per_input']:.3f} s/input" for k, v in r.items()))
    out["ablation"]["step"] = step_breakdown(model, bank_run.gather(np.arange(128))[0])


def _median_time(fn, reps: int = 20) -> float:
    return statistics.median(_times(fn, reps, warmup=3))


def step_breakdown(model, xb: torch.Tensor) -> dict:
    """One training step (forward + backward, batch of 128) through the fast path and the plain model, and the
    3x3 convolutions alone (forward + backward, channels-last, as oneDNN runs them in both): how much of a step is
    work that neither implementation can remove."""
    from torch.nn import Conv2d
    from torch.nn import functional as F

    from rmc.defense.fastpath import fast_forward
    from rmc.defense.scope import configure_model
    net = configure_model(copy.deepcopy(model))
    params = [p for p in net.parameters() if p.requires_grad]
    y = torch.zeros(len(xb), dtype=torch.long)
    shapes, hooks = {}, []

    def record(mod, inp, out):
        shapes[mod] = tuple(inp[0].shape)

    for m in net.modules():
        if isinstance(m, Conv2d) and m.in_channels * m.kernel_size[0] * m.kernel_size[1] > 32:   # not the stem
            hooks.append(m.register_forward_hook(record))
    with torch.no_grad():
        net(xb)
    for h in hooks:
        h.remove()
    conv_s = 0.0
    for m, shape in shapes.items():
        xi = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = m.weight.detach().clone().contiguous(memory_format=torch.channels_last).requires_grad_()
        b = torch.zeros(m.out_channels, requires_grad=True)

        def conv_step(xi=xi, w=w, b=b, m=m):
            o = F.conv2d(xi, w, b, m.stride, m.padding)
            torch.autograd.grad(o, (xi, w, b), torch.ones_like(o))
        conv_s += _median_time(conv_step)
    fast = fast_forward(net, xb[:8])

    def step(f):
        return torch.autograd.grad(F.cross_entropy(f(xb), y), params)
    steps = {"fast_path": _median_time(lambda: step(fast)),
             "fast_path_no_kernels": _median_time(without_kernels(lambda: step(fast))),
             "plain_model": _median_time(lambda: step(net))}
    res = {"batch": len(xb), "step_s": steps, "convolutions_s": conv_s,
           "convolutions_share_of_fast_step": conv_s / steps["fast_path"]}
    log(f"[ablation] one step of {len(xb)}: fast path {steps['fast_path'] * 1e3:.1f} ms (without its C kernels "
        f"{steps['fast_path_no_kernels'] * 1e3:.1f} ms), plain model "
        f"{steps['plain_model'] * 1e3:.1f} ms; the {len(shapes)} 3x3 convolutions alone {conv_s * 1e3:.1f} ms "
        f"({res['convolutions_share_of_fast_step'] * 100:.0f}% of the fast step)")
    return res


# ------------------------------------------------------------------------------------------------ scopes
def section_scopes(args, out, model, bank_run, feats_run, x, y, q, x_adv, q_adv):
    n = args.n_scopes or SIZES["scope_inputs"][args.full]
    index = NeighbourIndex(feats_run)
    res = {}
    for name, xs, qs in (("clean", x, q), ("pgd10", x_adv, q_adv)):
        variants = {s: build_rmc(model, bank_run, index, run_cfg(scope=s), LAYER) for s in ("all", "head", "bn")}
        variants["head-uncached"] = build_rmc(model, bank_run, index, run_cfg(scope="head",
                                                                          cache_head_inputs=False), LAYER)
        log(f"[scopes] {name}: scope all / head / bn (+ head without cached inputs), {n} inputs ...")
        r = run_interleaved({k: rmc_impl(v) for k, v in variants.items()}, xs, y, qs, n, f"scopes {name}")
        with torch.no_grad():
            static = float((model(xs[:n]).argmax(1) == y[:n]).float().mean())
        res[name] = {"static_accuracy": static, **{k: {kk: vv for kk, vv in v.items() if kk != "preds"}
                                                    for k, v in r.items()}}
        log(f"[scopes] {name}: static model accuracy {static:.3f}; " + "; ".join(
            f"{k} {v['s_per_input']:.3f} s/input acc {v['accuracy']:.3f}" for k, v in r.items()))
    out["scopes"] = {"inputs": n, **res}


# ------------------------------------------------------------------------------------------------ threads
def section_threads(args, out, model, bank_run, feats_run, x, y, q):
    n = SIZES["thread_inputs"][args.full]
    index = NeighbourIndex(feats_run)
    res = {}
    for prec in ("fp32", "bf16"):
        r = build_rmc(model, bank_run, index, run_cfg(precision=prec), LAYER)
        r2 = build_rmc(model, bank_run, index, run_cfg(precision=prec), LAYER)
        times = {1: [], 2: []}
        for i in range(n):
            for t, rr in ((1, r), (2, r2)) if i % 2 == 0 else ((2, r2), (1, r)):
                torch.set_num_threads(t)
                faiss.omp_set_num_threads(t)
                times[t].append(timed(rr.step, x[i:i + 1], q[i:i + 1], i)[1])
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        res[prec] = {f"{t}_threads_s_per_input": statistics.mean(v) for t, v in times.items()}
        log(f"[threads] rmc {prec}: 1 thread {res[prec]['1_threads_s_per_input']:.3f} s/input, 2 threads "
            f"{res[prec]['2_threads_s_per_input']:.3f} s/input ({n} inputs, interleaved)")
    out["threads"] = {"inputs": n, **res}


# ------------------------------------------------------------------------------------------------ batched
def section_batched(args, out, model, bank_run, feats_run, x, y, q):
    b, rounds = args.batch, SIZES["batched_rounds"][args.full]
    index = NeighbourIndex(feats_run)
    cfg = run_cfg(mode="episodic")
    one = build_rmc(model, bank_run, index, cfg, LAYER)
    batched = BatchedEpisodic(build_rmc(model, bank_run, index, cfg, LAYER), backend="threads", intra_op_threads=1)
    vm = BatchedEpisodic(build_rmc(model, bank_run, index, cfg, LAYER), backend="vmap")
    keys = list(range(b))
    timings = {"one_at_a_time_1thread": [], "one_at_a_time_2threads": [], "batched_threads": [], "batched_vmap": []}
    preds = {}

    def one_at_a_time(threads):
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        try:
            return [one.step(x[i:i + 1], q[i:i + 1], key=i).prediction for i in range(b)]
        finally:
            torch.set_num_threads(args.threads)
            faiss.omp_set_num_threads(args.threads)

    jobs = {"one_at_a_time_1thread": lambda: one_at_a_time(1),
            "one_at_a_time_2threads": lambda: one_at_a_time(2),
            "batched_threads": lambda: [r.prediction for r in batched.run(x[:b], q[:b], keys)],
            "batched_vmap": lambda: [r.prediction for r in vm.run(x[:b], q[:b], keys)]}
    if not args.full:       # slow on a CPU (see rmc.defense.batched): --full only
        del jobs["batched_vmap"], timings["batched_vmap"]
    log(f"[batched] episodic, B = {b}, {rounds} round(s), default-run settings, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} ...")
    for rnd in range(rounds):
        names = list(jobs)
        names = names[rnd % len(names):] + names[:rnd % len(names)]
        for k in names:
            if k == "batched_vmap" and rnd > 0:      # slow on a CPU (see rmc.defense.batched); once is enough
                continue
            p, dt = timed(jobs[k])
            timings[k].append(dt)
            preds[k] = p
            log(f"  [batched] {k}: {b / dt:.2f} inputs/s")
    res = {k: {"inputs_per_s": b / statistics.mean(v)} for k, v in timings.items()}
    base = max(v["inputs_per_s"] for k, v in res.items() if k.startswith("one_at_a_time"))
    for k in res:
        res[k]["vs_best_one_at_a_time"] = res[k]["inputs_per_s"] / base
        res[k]["same_predictions_as_one_at_a_time"] = float(np.mean(np.array(preds[k])
                                                                    == np.array(preds["one_at_a_time_1thread"])))
    out["batched"] = {"B": b, "rounds": rounds, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), **res}
    if not args.full:
        log("[batched] (quick mode: --full adds the vmap backend)")
    log("[batched] " + "; ".join(f"{k} {v['inputs_per_s']:.2f} inputs/s ({v['vs_best_one_at_a_time']:.2f}x best "
                                 f"one-at-a-time, same predictions {v['same_predictions_as_one_at_a_time'] * 100:.0f}%)"
                                 for k, v in res.items()))


# ------------------------------------------------------------------------------------------------ memory
def section_memory(args, out):
    steps = SIZES["memory_steps"][args.full]
    cmd = [sys.executable, str(Path(__file__).with_name("memory.py")), "--workdir", str(args.workdir),
           "--steps", str(steps), "--threads", str(args.threads)]
    log(f"[memory] {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(proc.stderr[-2000:])
        raise SystemExit("memory benchmark failed")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    out["memory"] = res
    log(f"[memory] {res}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the README's sizes (>= 200 inputs for accuracy)")
    ap.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (default 1)")
    ap.add_argument("--sections", default=",".join(ALL_SECTIONS),
                    help="comma-separated subset of: %(default)s (a subset writes its own results file)")
    ap.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR))
    ap.add_argument("--n-latency", type=int, default=None)
    ap.add_argument("--n-scopes", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tuned-malloc", action="store_true",
                    help="keep freed memory in glibc's heap (no page faults on re-allocation); "
                         "helps the reference most")
    args = ap.parse_args(argv)
    if args.tuned_malloc:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)    # M_MMAP_THRESHOLD: blocks up to 256 MB from the heap, not fresh mmaps
        libc.mallopt(-1, 1 << 30)      # M_TRIM_THRESHOLD: do not hand freed heap memory back to the kernel
    args.full = int(args.full)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(ALL_SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(ALL_SECTIONS)}")
    c_kernels = kernels.load()          # built here on first use (~20 s), then cached
    log(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}, {args.threads} thread(s), C kernels "
        f"{'on' if c_kernels else 'OFF (no compiler?)'}, load average {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    out: dict = {"torch_threads": args.threads, "torch": torch.__version__, "faiss": faiss.__version__,
                 "full": bool(args.full), "sections": sections, "cpus": os.cpu_count(),
                 "loadavg_start": os.getloadavg(), "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
                 "tuned_malloc": args.tuned_malloc, "c_kernels": c_kernels}

    model, info = get_model(args.workdir)
    images, labels, copies, feats = get_dprime(args.workdir, model, info, LAYER)
    n_train = len(images) // 4
    n_test = max(SIZES["search_queries"][1], SIZES["latency_inputs"][1])
    x, y, q = test_inputs(n_test, model, LAYER)
    if "matmul" in sections:
        section_matmul(args, out)
    if "search" in sections:
        section_search(args, out, np.ascontiguousarray(feats), q)
    rows_run = subset_rows(n_train, DEFAULT_RUN_DPRIME, 3)
    bank_run = make_bank(np.ascontiguousarray(images[rows_run]), labels[rows_run], copies[rows_run])
    feats_run = np.ascontiguousarray(feats[rows_run])
    if "latency" in sections:
        section_latency(args, out, model, bank_run, feats_run, x, y, q)
    if "ablation" in sections:
        section_ablation(args, out, model, bank_run, feats_run, x, y, q)
    if "scopes" in sections:
        n = args.n_scopes or SIZES["scope_inputs"][args.full]
        # n + 1: the last one is run_interleaved's untimed warm-up input
        x_adv = pgd(model, x[:n + 1], y[:n + 1], 0.1, 0.025, 10, generator=torch.Generator().manual_seed(0))
        from rmc.models import extract_features
        q_adv = extract_features(model, LAYER, x_adv).numpy()
        section_scopes(args, out, model, bank_run, feats_run, x, y, q, x_adv, q_adv)
    if "threads" in sections:
        section_threads(args, out, model, bank_run, feats_run, x, y, q)
    if "batched" in sections:
        section_batched(args, out, model, bank_run, feats_run, x, y, q)
    if "matmul" in sections:
        section_matmul(args, out)      # again at the end: the peak is the better of the two
    if "memory" in sections:
        section_memory(args, out)
    out["bench_peak_rss_mb"] = peak_rss_mb()
    out["loadavg_end"] = os.getloadavg()
    out["seconds"] = time.perf_counter() - t0
    subset = "" if set(sections) >= set(ALL_SECTIONS) else "-" + "-".join(sections)   # never overwrite a whole run
    path = args.workdir / ("bench-results" + ("-full" if args.full else "") + ("-malloc" if args.tuned_malloc else "")
                           + subset + ".json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, default=float))
    tmp.replace(path)
    log(f"done in {out['seconds']:.0f} s; results in {path}")


if __name__ == "__main__":
    main()
