"""One module per `rmc` sub-command; the flags and helpers several commands share live here (commands do not
import each other)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rmc.attacks.kinds import ATTACK_KINDS, PROTOCOLS
from rmc.errors import RMCError

if TYPE_CHECKING:
    import torch


def add_trust_arch_argument(p: argparse.ArgumentParser) -> None:
    """--arch FACTORY: the user's own consent to build a package.module:factory architecture named in --model's JSON
    (a model file never chooses code to run by itself)."""
    p.add_argument("--arch", metavar="PKG.MODULE:FACTORY",
                   help="build --model with this user architecture factory (needed when the model's JSON names one; "
                        "the JSON alone is never trusted to choose code to run)")


def add_device_argument(p: argparse.ArgumentParser, default: str | None = "cpu") -> None:
    """--device, taken by every command that computes (one setting for all of its stages)."""
    p.add_argument("--device", default=default, help="cpu, cuda or cuda:N" + (
        " (default: %(default)s)" if default else " (default: the configuration's train.device)"))


def check_ray_device(ray, device) -> None:
    """Ray's workers here run on CPUs: a GPU run with --ray would silently compute on the CPU."""
    if ray is not None and str(device).startswith("cuda"):
        raise RMCError(f"--ray runs RMC on CPU workers, but the device is {device}; drop --ray to use the GPU, "
                       "or use --device cpu")


def load_model(args, device: str | torch.device = "cpu"):
    """(model, info) of --model, on `device`, trusting only the factory the user named with --arch."""
    from rmc.models import load_checkpoint
    return load_checkpoint(args.model, device, trust_arch=getattr(args, "arch", None))


def add_model_and_data_arguments(p: argparse.ArgumentParser) -> None:
    """The flags `model_and_split` reads: --model, --arch, --dataset, --data-dir and --device."""
    p.add_argument("--model", required=True, help="static model written by `rmc train` (.safetensors)")
    add_trust_arch_argument(p)
    p.add_argument("--dataset", help="data set (default: the one the model was trained on)")
    p.add_argument("--data-dir", help="directory holding the data set (default: its standard location)")
    p.add_argument("--resize", type=int, default=None, metavar="SIDE",
                   help="imagefolder: shorter side before the centre crop to the model's input size (default: "
                        "crop * 256 / 224, 256 for 224)")
    add_device_argument(p)


def model_and_split(args, split: str):
    """The model named by --model (on --device) and the `split` of --dataset, default the model's own data set."""
    from rmc.artifacts.provenance import check_model_data
    from rmc.data import load_dataset
    from rmc.training import resolve_device

    model, info = load_model(args, resolve_device(args.device))
    dataset = args.dataset or info.dataset
    if not dataset:
        raise RMCError(f"{args.model} does not record its data set; pass --dataset")
    # An image folder is cropped to the model's input size; other data sets have theirs.
    data = load_dataset(dataset, split, args.data_dir, image_size=int(info.input_shape[-1]),
                        resize=getattr(args, "resize", None))
    check_model_data(info, data, f"the {split} set")
    return model, info, data


def add_verify_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify-store", action="store_true",
                   help="re-hash every file of the D' against its manifest (default: shapes, sizes and the small "
                        "arrays always; the images only when they changed since they last verified)")


def open_store(args):
    """--store, verified (fully with --verify-store)."""
    from rmc.artifacts.dprime import open_dprime_store
    return open_dprime_store(args.store, verify="full" if getattr(args, "verify_store", False) else "auto")


def add_ray_arguments(p: argparse.ArgumentParser, shards: bool = False) -> None:
    """--ray [ADDRESS] and --workers (augment, evaluate, run); evaluate and run also take --shards."""
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the work as Ray tasks: --ray alone starts a local Ray on this machine; --ray ADDRESS "
                        "joins a cluster (auto, HOST:6379 or ray://HOST:10001). Needs pip install 'rmc-defense[ray]'")
    p.add_argument("--workers", type=int, default=None,
                   help="with --ray: at most this many tasks at a time (a local Ray gets this many CPUs; "
                        "default: all CPUs)")
    p.add_argument("--ray-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --ray ADDRESS: give up joining a cluster that does not answer after this long "
                        "(default: 15)")
    if shards:
        p.add_argument("--shards", type=int, default=1, metavar="S",
                       help="online RMC: cut each test stream into S independent streams, each with its own "
                            "adapted state (run in parallel with --ray). Online results depend on S; S is recorded "
                            "in the results. Episodic mode ignores it (default: %(default)s)")
        p.add_argument("--dprime-via", choices=["path", "object-store"], default=None,
                       help="with --ray: how workers get the D' images: read from the store's path, which every worker "
                            "must see at the same path (a shared file system; the default), or through Ray's object "
                            "store (a cluster without one; D' must fit in memory)")
        p.add_argument("--block", type=int, default=None, metavar="B",
                       help="with --ray: inputs per task (online: the state is saved after each task, so a stopped "
                            "run redoes at most B inputs per stream; default: about four tasks per worker, <= 16)")


def check_ray_arguments(args) -> None:
    if getattr(args, "workers", None) is not None and args.ray is None:
        raise RMCError("--workers only applies with --ray (add --ray to run on a local Ray)")
    if getattr(args, "ray_timeout", None) is not None and args.ray is None:
        raise RMCError("--ray-timeout only applies with --ray ADDRESS")


def add_batch_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=1, metavar="B",
                   help="episodic mode: adapt B inputs at once, with the same results (one worker per core on a "
                        "CPU, one vectorised model on a GPU; see rmc.defense.batched). Default: %(default)s")


def add_attack_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the attack rows (evaluate, run); they override the config's `attack_rows` section."""
    g = p.add_argument_group("attack rows", "transfer PGD (always), transfer AutoAttack and the defense-aware "
                             "attacks FPA / GMSA-AVG / GMSA-MIN against RMC under each protocol; the config's "
                             "attack_rows section")
    kinds = [*ATTACK_KINDS.names(), "autoattack"]
    g.add_argument("--attacks", nargs="+", metavar="ATTACK", choices=[*kinds, "none"],
                   help=f"rows beside transfer PGD: {' '.join(kinds)}, or none (default: gmsa-min)")
    g.add_argument("--protocols", nargs="+", metavar="PROTOCOL", choices=PROTOCOLS.names(),
                   help="protocols of the defense-aware attacks: chen2022 (Chen et al., ICLR 2022, as they ran it) "
                        "and/or strong (every choice that strengthens it); default: both (attack_rows.protocols)")
    g.add_argument("--rand-n", type=int, metavar="N",
                   help="add AutoAttack's rand version (EOT) against episodic stateless RMC on the first N inputs "
                        "(attack_rows.rand_n; each gradient is a full adaptation: keep N small)")
    g.add_argument("--rand-eot", type=int, metavar="E", help="its EOT samples per gradient (attack_rows.rand_eot)")
    g.add_argument("--rounds", type=int, help="rounds per input of the defense-aware attacks (attack_rows.rounds)")
    g.add_argument("--attack-n", type=int, help="inputs in the attack rows (attack_rows.n; default: all)")
    g.add_argument("--attack-eps", help="L-inf eps of the attack rows, e.g. 0.1 or 8/255 (attack_rows.eps)")
    g.add_argument("--no-attack-rows", action="store_true", help="skip the attack rows")


def add_shared_arguments(p: argparse.ArgumentParser) -> None:
    """The flags `rmc evaluate` and `rmc run` share: Ray, --batch, the attack rows."""
    add_ray_arguments(p, shards=True)
    add_batch_argument(p)
    add_attack_arguments(p)


def attack_overrides(args) -> list[tuple[str, object]]:
    """The attack-row flags as config overrides (attack_rows.*)."""
    from rmc.artifacts.evalsets import parse_number
    out: list[tuple[str, object]] = []
    if args.attacks:
        if "none" in args.attacks and len(args.attacks) > 1:
            raise RMCError("--attacks none means no rows beside transfer PGD; do not combine it with other attacks")
        out += [("attack_rows.attacks", [a for a in args.attacks if a not in ("none", "autoattack")]),
                ("attack_rows.autoattack", "autoattack" in args.attacks)]
    if args.protocols:
        out.append(("attack_rows.protocols", list(args.protocols)))
    for flag, key in (("rand_n", "rand_n"), ("rand_eot", "rand_eot"), ("rounds", "rounds")):
        if getattr(args, flag) is not None:
            out.append((f"attack_rows.{key}", getattr(args, flag)))
    if args.attack_n is not None:
        out.append(("attack_rows.n", args.attack_n))
    if args.attack_eps is not None:
        out.append(("attack_rows.eps", parse_number(args.attack_eps, "--attack-eps")))
    if args.no_attack_rows:
        out += [("attack_rows.attacks", []), ("attack_rows.autoattack", False), ("attack_rows.transfer_pgd", False),
                ("attack_rows.rand_n", 0)]
    return out
