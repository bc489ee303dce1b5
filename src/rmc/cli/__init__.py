"""The `rmc` command: a thin layer over the library. Each sub-command lives in rmc/cli/commands/<name>.py and
defines `add_arguments(parser)` and `main(args) -> int`."""

from __future__ import annotations

import argparse
import sys

from rmc.cli.commands import attack, augment, evaluate, features, layers, report, run, train, visualize
from rmc.cpu import pick_threads, tune_allocator
from rmc.errors import RMCError

# sub-command -> (module, one-line help)
COMMANDS = {
    "run": (run, "the main job: train -> augment -> features -> attack -> evaluate -> visualize into a run "
                 "directory"),
    "train": (train, "train a model (standard or PGD adversarial training); writes safetensors + JSON metadata"),
    "attack": (attack, "write evaluation sets (clean, FGSM, PGD) made against a static model"),
    "augment": (augment, "build the augmented dataset D' (clean + PGD copies), resumable"),
    "features": (features, "hidden features of D' and evaluation sets from one layer of the static model"),
    "layers": (layers, "list the layer names a model offers for feature extraction"),
    "evaluate": (evaluate, "run RMC and the baselines over evaluation sets and print the table"),
    "visualize": (visualize, "PNG grid of test inputs beside their nearest neighbours in D'"),
    "report": (report, "report.html (self-contained, opens offline) and figures from a run directory's records"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmc", description="Runtime Masking and Cleansing, evaluated honestly.")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: the cores not busy with other work when the command "
                             "starts, at least 1; on a busy machine 1 is several times faster than 2)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_allocator()   # the command owns its process
    try:
        if args.threads is not None and args.threads < 1:
            raise RMCError(f"--threads must be >= 1, got {args.threads}")
        import torch
        threads = args.threads or pick_threads()
        if threads != torch.get_num_threads():
            if args.threads is None:
                print(f"[threads] {threads} torch thread(s): other work keeps the other cores busy "
                      "(--threads N to choose)", file=sys.stderr)
            torch.set_num_threads(threads)
        return int(args._main(args) or 0)
    except RMCError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is saved; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
