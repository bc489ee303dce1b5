"""The `rmc` command: a thin layer over the library. Each sub-command lives in rmc/cli/commands/<name>.py and
defines `add_arguments(parser)` and `main(args) -> int`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from rmc.cli.commands import (
    attack,
    augment,
    evaluate,
    features,
    import_model,
    layers,
    migrate_dprime,
    report,
    run,
    train,
    visualize,
)
from rmc.cpu import pick_threads, tune_allocator
from rmc.errors import RMCError

# sub-command -> (module, one-line help)
COMMANDS = {
    "run": (run, "the main job: train -> augment -> features -> attack -> evaluate -> visualize into a run "
                 "directory"),
    "train": (train, "train a model (standard or PGD adversarial training); writes safetensors + JSON metadata"),
    "import-model": (import_model, ("turn pretrained weights (PyTorch state dict, safetensors, Keras ResNet152V2 "
                                    ".h5) into an rmc model with their provenance")),
    "attack": (attack, "write evaluation sets (clean, FGSM, PGD) made against a static model"),
    "augment": (augment, "build the augmented dataset D' (clean + PGD copies), resumable"),
    "migrate-dprime": (migrate_dprime, "convert a D' store of an earlier rmc (one images.npy) to shards, in place"),
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


# What each command's --out is: a directory, or a file (None: the command writes nothing to lock).
OUTPUT_KIND = {"run": "dir", "train": "file", "import-model": "file", "attack": "dir", "augment": "dir",
               "features": "dir", "evaluate": "dir", "visualize": "file", "layers": None}


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def output_lock(args, argv: list[str] | None):
    """Check the command's --out can be written, lock it for this process and clean what an interrupted run left
    in it (before any work). A context manager; a no-op for commands that write nothing."""
    from contextlib import nullcontext
    from pathlib import Path

    from rmc.io import OutputLock, clean_stray_temporaries
    kind = OUTPUT_KIND.get(args.command)
    out = getattr(args, "out", None)
    if kind is None or out is None or getattr(args, "print_config", False):
        return nullcontext()
    path = Path(out)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise RMCError(f"--out {path} is a file; `rmc {args.command}` writes a directory: name a directory")
    if kind == "file" and path.is_dir():
        raise RMCError(f"--out {path} is a directory; `rmc {args.command}` writes a file: name a file")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise RMCError(f"--out {path} is not writable; choose a writable --out or fix its permissions")
    if path.is_file() and not os.access(path, os.W_OK):
        raise RMCError(f"--out {path} is not writable; choose a writable --out or fix its permissions")
    command = "rmc " + " ".join(sys.argv[1:] if argv is None else argv)
    lock = OutputLock(path, command, _note).acquire()
    try:
        if kind == "dir":
            clean_stray_temporaries(path, _note)
            if args.command == "augment":
                clean_stray_temporaries(path.with_name(path.name + ".partial"), _note)
        else:
            for f in path.absolute().parent.glob(f".{path.name}.*.tmp"):
                f.unlink(missing_ok=True)
                _note(f"note: removed {f}, left by an interrupted run")
    except BaseException:
        lock.release()
        raise
    return lock


def stop_on_sigterm() -> None:
    """`kill PID` (SIGTERM) stops a command like Ctrl-C. A run started with `&` or nohup ignores SIGINT, so kill is
    how a background run is stopped; it should end with the same message and the same saved records. (Only the
    main thread may set a handler; `main` called from another thread keeps the process's own.)"""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)   # Python's own: raises KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_allocator()   # the command owns its process
    stop_on_sigterm()
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
        with output_lock(args, argv):
            return int(args._main(args) or 0)
    except RMCError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from rmc.io import describe_os_error
        message = describe_os_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is saved; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
