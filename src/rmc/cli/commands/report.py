from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="an `rmc run --out` directory (finished or not)")
    p.add_argument("--out", help="folder for report.html and figures/ (default: RUN_DIR)")


def main(args) -> int:
    from rmc.evaluation.html_report import write_report
    path = write_report(args.run_dir, args.out)
    print(f"wrote {path} (open it in any browser; it needs no server or network)")
    return 0
