"""One module per `rmc` sub-command; shared argument handling lives here."""

from __future__ import annotations


def model_and_split(args, split: str):
    """The model named by --model (on --device) and the `split` of --dataset, default the model's own data set."""
    from rmc.data import load_dataset
    from rmc.errors import RMCError
    from rmc.models import load_checkpoint
    from rmc.training import resolve_device

    model, info = load_checkpoint(args.model, resolve_device(args.device))
    dataset = args.dataset or info.dataset
    if not dataset:
        raise RMCError(f"{args.model} does not record its data set; pass --dataset")
    return model, info, load_dataset(dataset, split, args.data_dir)
