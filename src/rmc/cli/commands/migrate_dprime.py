from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a D' store written by an earlier rmc in the single-file format (one images.npy)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from rmc.artifacts.migrate import migrate_dprime
    from rmc.io import OutputLock
    # The lock `rmc augment --out PATH` takes: no build writes into the store while it is converted.
    with OutputLock(args.path, "rmc " + " ".join(sys.argv[1:])):
        print(migrate_dprime(args.path, progress=not args.quiet))
    return 0
