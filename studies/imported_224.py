"""The seed's pipeline end to end at 224 px on a CPU: a pretrained ResNet-50 brought in by `rmc import-model`, an
ImageNet-layout image folder, `rmc run` with the imported weights (no training stage), a handful of inputs.

No ImageNet and no pretrained weights exist on this machine, so both are made here, as a user would bring theirs:
1. an image folder in ImageNet's layout (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`) from a few Fashion-MNIST
   classes, upscaled from 28 to 256 px (RGB JPEGs), so rmc's preprocessing (shorter side 256, centre crop 224) runs
   as on ImageNet;
2. "pretrained" weights: the built-in ResNet-50 trained briefly on that folder by a plain PyTorch loop and saved as
   a training script would save them (`{"state_dict": {"module.conv1.weight": ...}, "epoch": ...}`, torchvision's
   key names under DataParallel's prefix);
3. `rmc import-model` turns them into an rmc checkpoint, `rmc run --weights standard=...` runs every other stage.

It checks that the pipeline finishes at the seed's image size with an ImageNet architecture; its accuracies are of a
network trained for a minute on 120 images, not ImageNet figures.

    python studies/imported_224.py /work/scratch/imported_224      # writes studies/imported_224/record.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rmc.models import build_model

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = {0: "n00000000", 1: "n00000001", 8: "n00000008"}   # T-shirt, trouser, bag: wnid-style folder names
PER_CLASS = {"train": 40, "val": 10}
SIZE = 256            # stored images: the shorter side rmc resizes to before the 224 crop
RECORD = Path(__file__).resolve().parent / "imported_224" / "record.json"


def _idx(name: str) -> np.ndarray:
    with gzip.open(FASHION / name) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def make_folder(root: Path) -> None:
    """An ImageNet-layout folder of upscaled Fashion-MNIST images (RGB JPEGs, 256 x 256)."""
    if (root / "val").exists():
        return
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images, labels = _idx(f"{prefix}-images-idx3-ubyte.gz"), _idx(f"{prefix}-labels-idx1-ubyte.gz")
        for label, wnid in CLASSES.items():
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == label)[:PER_CLASS[split]]:
                img = Image.fromarray(images[i]).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
                img.save(folder / f"{wnid}_{i}.JPEG", quality=90)


def _load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as the model sees it (224-px centre crops in [0, 1]), for the plain training loop."""
    xs, ys = [], []
    for label, wnid in enumerate(sorted(CLASSES.values())):
        for f in sorted((root / split / wnid).iterdir()):
            a = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255
            off = (SIZE - 224) // 2
            xs.append(torch.from_numpy(a[off:off + 224, off:off + 224]).permute(2, 0, 1))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def pretrain(root: Path, out: Path, epochs: int = 3) -> dict:
    """The built-in ResNet-50 trained by a plain loop; saved as a training script saves its checkpoint."""
    info_path = out.with_suffix(".pretrain.json")   # not .json: `rmc import-model` writes its sidecar there
    if out.exists() and info_path.exists():
        return json.loads(info_path.read_text())
    torch.manual_seed(0)
    x, y = _load_split(root, "train")
    xv, yv = _load_split(root, "val")
    model = build_model("resnet50", len(CLASSES), 3)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(16):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item()
        print(f"pretrain epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, val accuracy {acc:.3f}", flush=True)
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    torch.save({"state_dict": state, "epoch": epochs}, out)
    info = {"seconds": time.perf_counter() - t0, "val_accuracy": acc, "epochs": epochs, "train_images": len(x)}
    info_path.write_text(json.dumps(info))
    return info


def _rmc(*args: str) -> float:
    t0 = time.perf_counter()
    print("+ rmc " + " ".join(args), flush=True)
    subprocess.run(["rmc", "--threads", "2", *args], check=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scratch", type=Path, help="where the folder, the weights and the run go (not committed)")
    args = ap.parse_args(argv)
    root, scratch = args.scratch / "folder", args.scratch
    make_folder(root)
    pre = pretrain(root, scratch / "r50.pth")
    ckpt = scratch / "r50.safetensors"
    seconds = {"import": _rmc("import-model", str(scratch / "r50.pth"), "--arch", "resnet50", "--input-size", "224",
                              "--dataset", "imagefolder", "--out", str(ckpt))}
    sets = ["data.dataset=imagefolder", f"data.data_dir={root}", "train.arch=resnet50", "augment.steps=[2]",
            "augment.eps=0.03", "augment.step_size=0.01", "augment.chunk_size=32", "augment.batch_size=16",
            "rmc.k=32", "rmc.max_epochs=2", "rmc.calib_k=16", "rmc.batch_size=16", "attack.n=4",
            "attack.pgd=[[2, 0.03]]", "attack.targeted=false"]
    # RMC on the first 2 inputs of each set (minutes per input at 224 px on 2 shared cores); the static and kNN rows
    # on all 4.
    run_args = ["run", "--out", str(scratch / "run"), "--weights", f"standard={ckpt}", "--no-attack-rows",
                "--rmc-n", "2"]
    for s in sets:
        run_args += ["--set", s]
    seconds["run"] = _rmc(*run_args)
    results = json.loads((scratch / "run" / "results.json").read_text())
    record = {"command": "python studies/imported_224.py " + str(args.scratch), "pretrain": pre,
              "seconds": seconds, "stages": results.get("stages"), "table": results.get("table"),
              "config": sets, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                                         f"torch {torch.__version__}"}
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=1))
    print((scratch / "run" / "results.md").read_text() if (scratch / "run" / "results.md").exists() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
