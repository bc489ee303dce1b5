#!/usr/bin/env bash
# Installs rmc and what it needs on a fresh machine. `install.sh` for using rmc, `install.sh test` for its tests.
# Order matters: the CPU torch wheel is pinned first so that no dependency can pull a CUDA build or torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1 && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    # The embedded default data set (Fashion-MNIST, IDX files) comes from Debian.
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if command -v apt-get >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
    # A C++ compiler for the fast path's kernels (rmc.defense.kernels, built on first use; without one rmc runs slower).
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi
if [ "${1:-}" = "test" ] && command -v apt-get >/dev/null 2>&1 && ! command -v chromium-headless-shell >/dev/null 2>&1; then
    # A headless Chromium for the test that renders the HTML report offline (playwright drives it; no browser download).
    apt-get update -qq && apt-get install -y -qq chromium-headless-shell >/dev/null
fi
python3 -m pip install -q torch==2.13.0
if [ "${1:-}" = "test" ]; then
    python3 -m pip install -q -e ".[test]"
    # torchattacks declares torchvision (which would pull another torch): install it without dependencies.
    python3 -m pip install -q --no-deps torchattacks==3.5.1
else
    python3 -m pip install -q -e .
fi
