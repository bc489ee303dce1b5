"""The denoising model's non-local means: the written-out softmax(x^T x / sqrt C) x against
torch.nn.functional.scaled_dot_product_attention, on both x86 instruction sets, in the same process.

    python benchmarks/nonlocal_op.py            # quick: 5 rounds (a smoke test, ~1 minute on 2 cores)
    python benchmarks/nonlocal_op.py --full     # the figures of benchmarks/README.md: 40 rounds

What is timed, one thread, fp32, batch 128 of 28x28 images (RMC's fine-tuning batch):
  op       the operation alone, forward + backward, on the input of each denoising block of small_cnn (the
           shapes the model makes; the table names them)
  step     a whole training step of the denoising small_cnn (forward, loss, backward), what an epoch of RMC's
           adaptation repeats; the ratio here is what a switch would save per epoch
Both implementations alternate round by round, so load from other processes falls on both alike. Each instruction
set runs in its own process (oneDNN and ATen read their limits at start): native, and AVX2 emulated with
ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2. The ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import statistics
import time

from isa_children import ISAS, report, run_child

BATCH = 128   # RMC's fine-tuning batch (RMCConfig.batch_size)


def sdpa_nonlocal(x):
    """The same operation through PyTorch's fused attention (its default scale is 1 / sqrt(C))."""
    import torch.nn.functional as F
    n, c, h, w = x.shape
    seq = x.flatten(2).transpose(1, 2)                                # N x HW x C
    return F.scaled_dot_product_attention(seq, seq, seq).transpose(1, 2).reshape(n, c, h, w)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child(rounds: int) -> dict:
    import torch
    import torch.nn.functional as F

    from rmc.models import build_model, denoising

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, (0.5,), (0.5,), "nonlocal")
    x, y = torch.rand(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    inputs = []   # what each denoising block receives
    hooks = [m.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].detach()))
             for m in model.modules() if isinstance(m, denoising.DenoiseBlock)]
    model(x)
    for h in hooks:
        h.remove()

    impls = {"written out": denoising.nonlocal_means, "sdpa": sdpa_nonlocal}
    out = {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(), "rows": []}
    for i, feat in enumerate(inputs):
        diff = (impls["written out"](feat) - impls["sdpa"](feat)).abs().max().item()
        times = {k: [] for k in impls}

        def op(fn, f=feat):
            f = f.clone().requires_grad_()
            fn(f).square().sum().backward()
        for fn in impls.values():
            op(fn)   # warm-up
        for _ in range(rounds):
            for k, fn in impls.items():
                times[k].append(_timed(lambda fn=fn: op(fn)))
        out["rows"].append({"what": f"op, block{i + 1} input {tuple(feat.shape[1:])}", "max_abs_diff": diff,
                            **{k: statistics.median(v) for k, v in times.items()}})

    times = {k: [] for k in impls}
    original = dict(denoising.OPS)

    def step(fn):
        denoising.OPS[denoising.DenoiseOp.NONLOCAL] = fn
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    try:
        for fn in impls.values():
            step(fn)
        for _ in range(rounds):
            for k, fn in impls.items():
                times[k].append(_timed(lambda fn=fn: step(fn)))
    finally:
        denoising.OPS.update(original)
    out["rows"].append({"what": f"training step, batch {BATCH}",
                        **{k: statistics.median(v) for k, v in times.items()}})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="40 rounds (the README's figures)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        report(child(args.child))
        return
    rounds = 40 if args.full else 5
    print("| instruction set | what | written out (ms) | sdpa (ms) | written out / sdpa | max abs. difference |")
    print("|---|---|---|---|---|---|")
    for isa, env in ISAS.items():
        t0 = time.perf_counter()
        res, code, why = run_child([__file__, "--child", str(rounds)], env)
        if res is None:
            print(f"| {isa} | the process failed (exit {code}): {why} | | | | |")
            continue
        for r in res["rows"]:
            diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
            print(f"| {isa} ({res['capability']}) | {r['what']} | {1e3 * r['written out']:.2f} | "
                  f"{1e3 * r['sdpa']:.2f} | {r['written out'] / r['sdpa']:.2f}x | {diff} |", flush=True)
        print(f"<!-- {isa}: {rounds} rounds in {time.perf_counter() - t0:.0f} s, torch {res['torch']} -->", flush=True)


if __name__ == "__main__":
    main()
