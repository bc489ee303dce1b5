"""Cost of the ImageNet architectures: parameters, FLOPs per 224-px image (forward, and forward + backward as RMC's
fine-tuning pays it) counted by torch.utils.flop_counter, and the forward time of a batch on this CPU.

    OMP_NUM_THREADS=1 python benchmarks/model_cost.py              # 224 px, batches of 1 and 8, one thread
    python benchmarks/model_cost.py --archs resnet50 --batches 1 --repeats 5

FlopCounterMode counts a multiply-add as 2 FLOPs (torchvision's tables list multiply-adds: half these figures).
Each forward is timed in wall and in CPU seconds (one thread: CPU time is the forward's own cost on a machine other
processes share); the achieved rate (forward FLOPs / CPU time) is printed beside it, and each architecture's time
as a ratio against ResNet-50's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from rmc.models import build_model, default_layer, extract_features

ARCHS = ["resnet50", "resnet101", "resnet152", "resnet152v2"]


def flops(model: torch.nn.Module, size: int, backward: bool, to_input: bool = False) -> int:
    """FLOPs of one image: forward; with `backward`, also the backward pass to the weights (a fine-tuning step), or
    with `to_input` only to the input (a PGD step: no weight gradients)."""
    x = torch.rand(1, 3, size, size, requires_grad=to_input)
    frozen = [p for p in model.parameters() if p.requires_grad] if to_input else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            if backward or to_input:
                F.cross_entropy(model(x), torch.zeros(1, dtype=torch.long)).backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def forward_seconds(model: torch.nn.Module, size: int, batch: int, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward, medians. With one torch thread the work runs on this thread, so its CPU
    time is what the forward costs without the other processes of a shared machine; the wall time includes them."""
    x = torch.rand(batch, 3, size, size)
    wall, cpu = [], []
    with torch.no_grad():
        model(x)   # warm-up: first-call allocations
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.thread_time()
            model(x)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=ARCHS)
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default: %(default)s)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes to time (default: 1 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per batch size; the median is kept")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for arch in args.archs:
        model = build_model(arch, 1000, 3).eval()
        state = model.state_dict()
        layer = default_layer(model)
        row = {"arch": arch, "parameters": sum(q.numel() for q in model.parameters()),
               "state_values": sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")),
               "state_keys": len(state), "feature_layer": layer,
               "feature_dim": int(extract_features(model, layer, torch.rand(1, 3, args.size, args.size)).shape[1]),
               "forward_flops": flops(model, args.size, backward=False),
               "train_step_flops": flops(model, args.size, backward=True),
               "seconds": {b: forward_seconds(model, args.size, b, args.repeats) for b in args.batches}}
        rows.append(row)
        print(f"{arch:12s} params {row['parameters'] / 1e6:6.2f} M  forward {row['forward_flops'] / 1e9:6.2f} GFLOP  "
              f"fwd+bwd {row['train_step_flops'] / 1e9:6.2f} GFLOP  feature {layer} ({row['feature_dim']}-d)",
              flush=True)
        for b, (wall, cpu) in row["seconds"].items():
            print(f"{'':12s} batch {b}: wall {wall:.2f} s, CPU {cpu:.2f} s "
                  f"({row['forward_flops'] * b / cpu / 1e9:.0f} GFLOP/s of CPU time)", flush=True)
    base = next((r for r in rows if r["arch"] == "resnet50"), None)
    if base is not None:
        for r in rows:
            ratios = ", ".join(f"batch {b}: {r['seconds'][b][1] / base['seconds'][b][1]:.2f}x" for b in args.batches)
            print(f"{r['arch']:12s} forward CPU time / resnet50's: {ratios}")
    meta = {"torch": torch.__version__, "threads": args.threads, "size": args.size, "load": os.getloadavg(),
            "machine": platform.processor() or platform.machine(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=2)


if __name__ == "__main__":
    main()
