"""Markdown tables of a bench.py results file: python benchmarks/summarize.py /tmp/rmc-bench/bench-results-full.json"""

import json
import sys


def _matmul(mm: dict) -> list[str]:
    out = ["| matrix product, 1 thread | torch.mm 2048^3 | oneDNN 3x3 conv (implicit GEMM) | peak used |",
           "|---|---|---|---|"]
    for d, v in mm.items():
        out.append(f"| {d} | {v['mm'] / 1e9:.0f} GFLOP/s | {v['conv'] / 1e9:.0f} GFLOP/s "
                   f"| {v['peak'] / 1e9:.0f} GFLOP/s |")
    return out + [""]


def _search(s: dict) -> list[str]:
    out = [f"| search, D' = {s['dprime']:,} x {s['dim']}, K = {s['k']} | time per query | vs reference | neighbours |",
           "|---|---|---|---|",
           f"| reference (NumPy loop over batches of 1024 stored features) | {s['ref_s_per_query'] * 1e3:.1f} ms "
           "| 1x | - |",
           f"| FAISS flat + exact re-rank, {s['batch_queries']} queries at once "
           f"| {s['flat_batched_s_per_query'] * 1e3:.3f} ms "
           f"| **{s['speedup_batched']:.0f}x** | identical (ordered) {s['identical_ordered']}/{s['ref_queries']} |",
           f"| FAISS flat + exact re-rank, one query at a time | {s['flat_single_s_per_query'] * 1e3:.2f} ms "
           f"| {s['speedup_single']:.1f}x | identical |"]
    for key in ("ivf_nprobe16", "ivf_nprobe64"):
        v = s[key]
        out.append(f"| IVF nlist 1024, nprobe {key[10:]} (approximate) | {v['s_per_query'] * 1e3:.3f} ms | "
                   f"{v['speedup_vs_ref']:.0f}x | recall@K {v['recall_at_k']:.4f} (build {v['build_s']:.1f} s) |")
    return out + [""]


def _latency(lat: dict) -> list[str]:
    ref = lat["reference"]
    out = [f"| online RMC, {lat['inputs']} inputs, D' = {lat['dprime']:,} | s / input | speed-up | accuracy | "
           "same class as reference | outside fwd/bwd | GFLOP/s (fraction of peak) |",
           "|---|---|---|---|---|---|---|",
           f"| reference | {ref['s_per_input']:.3f} | 1x | {ref['accuracy'] * 100:.1f}% | - | - | - |"]
    for k in ("rmc-fp32", "rmc-bf16"):
        v = lat[k]
        out.append(f"| {k} | {v['s_per_input']:.3f} | **{v['speedup_vs_reference']:.2f}x** "
                   f"| {v['accuracy'] * 100:.1f}% | "
                   f"{v['agreement_with_reference'] * 100:.1f}% | {v['outside_passes_fraction'] * 100:.1f}% | "
                   f"{v['flops_per_s_overall'] / 1e9:.0f} "
                   f"({v['fraction_of_matmul_peak'] * 100:.0f}% of {v['peak_dtype']}) |")
    out.append("")
    for k in ("reference", "rmc-fp32", "rmc-bf16"):
        prof = lat[k].get("profile_s_per_input", {})
        out.append(f"- {k} (ms / input): " + ", ".join(f"{p} {t * 1e3:.1f}" for p, t in prof.items()))
    return out + [""]


def _ablation(ab: dict) -> list[str]:
    no_kernels = ab.get("fast-path-no-kernels")   # (older results files have no such variant)
    nk = f" (without its kernels {no_kernels['s_per_input']:.3f})" if no_kernels else ""
    out = [f"- ablation ({ab['inputs']} inputs, fp32): fast path {ab['fast-path']['s_per_input']:.3f} s/input{nk}, "
           f"plain model {ab['plain-model']['s_per_input']:.3f} s/input; "
           f"same predictions {ab['same_predictions'] * 100:.0f}%"]
    st = ab.get("step")
    if st:
        nk = st["step_s"].get("fast_path_no_kernels")
        nk = f" (without its kernels {nk * 1e3:.1f} ms)" if nk else ""
        out.append(f"- one training step of {st['batch']}: fast path {st['step_s']['fast_path'] * 1e3:.1f} ms{nk}, "
                   f"plain model {st['step_s']['plain_model'] * 1e3:.1f} ms; the 3x3 convolutions alone "
                   f"{st['convolutions_s'] * 1e3:.1f} ms "
                   f"({st['convolutions_share_of_fast_step'] * 100:.0f}% of the fast step)")
    return out + [""]


def _scopes(sc: dict) -> list[str]:
    out = [f"| scope ({sc['inputs']} inputs per set) | clean: s / input | clean accuracy | PGD-10: s / input "
           "| PGD-10 accuracy |",
           "|---|---|---|---|---|",
           f"| static model (no RMC) | - | {sc['clean']['static_accuracy'] * 100:.1f}% | - "
           f"| {sc['pgd10']['static_accuracy'] * 100:.1f}% |"]
    for k in ("all", "head", "bn", "head-uncached"):
        c, p = sc["clean"][k], sc["pgd10"][k]
        out.append(f"| {k} | {c['s_per_input']:.3f} | {c['accuracy'] * 100:.1f}% | {p['s_per_input']:.3f} "
                   f"| {p['accuracy'] * 100:.1f}% |")
    return out + [""]


def _threads(th: dict) -> list[str]:
    out = []
    for k in ("fp32", "bf16"):
        v = th[k]
        out.append(f"- threads, rmc {k} ({th['inputs']} inputs): 1 thread {v['1_threads_s_per_input']:.3f} s/input, "
                   f"2 threads {v['2_threads_s_per_input']:.3f} s/input")
    return out + [""]


def _batched(b: dict) -> list[str]:
    out = [f"| episodic, B = {b['B']} ({b['rounds']} rounds) | inputs / s | vs best one-at-a-time "
           "| same predictions |",
           "|---|---|---|---|"]
    for k in ("one_at_a_time_1thread", "one_at_a_time_2threads", "batched_threads", "batched_vmap"):
        if k not in b:
            continue
        v = b[k]
        out.append(f"| {k} | {v['inputs_per_s']:.2f} | {v['vs_best_one_at_a_time']:.2f}x | "
                   f"{v['same_predictions_as_one_at_a_time'] * 100:.0f}% |")
    return out + [""]


def _memory(m: dict) -> list[str]:
    return [f"- memory (D' = {m['dprime']:,}, {m['steps']} online steps): peak resident {m['peak_rss_mb']:.0f} MB; "
            "after each stage " + ", ".join(f"{k} {v:.0f}" for k, v in m["rss_mb"].items()) + " MB"]


def main(path):
    r = json.load(open(path))
    out = []
    for key, section in (("matmul", _matmul), ("search", _search), ("latency", _latency), ("ablation", _ablation),
                         ("scopes", _scopes), ("batched", _batched), ("memory", _memory)):
        if key == "batched" and isinstance(r.get("threads"), dict):   # (older results files kept it under this key)
            out += _threads(r["threads"])
        if r.get(key):
            out += section(r[key])
    out.append(f"- load average {r.get('loadavg_start')} -> {r.get('loadavg_end')}, OPENBLAS_CORETYPE "
               f"{r.get('openblas_coretype')}, {r.get('seconds', 0):.0f} s")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
