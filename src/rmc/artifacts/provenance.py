"""Whether artifacts belong together: one place, used by every command that combines them.

A model, the data set it is applied to, its D', D''s features and the evaluation sets must describe the same
task (data set, classes, image shape), or every number built from them is silently wrong. D' made against
another model of the same task is allowed (a transfer experiment) but said aloud.
"""

from __future__ import annotations

import sys
from typing import Iterable

from rmc.errors import RMCError
from rmc.models.checkpoint import ModelInfo


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def check_model_data(info: ModelInfo, data, what: str = "the data set") -> None:
    """A model applied to an `ImageDataset` (training or test split)."""
    if tuple(info.input_shape) != tuple(data.input_shape):
        raise RMCError(f"the model takes C x H x W = {tuple(info.input_shape)} but {what} {data.name or ''} has "
                       f"{tuple(data.input_shape)}; use the model trained on this data set")
    if len(data) and int(data.labels.max()) >= info.num_classes:
        raise RMCError(f"{what} has class {int(data.labels.max())} but the model has {info.num_classes} classes; "
                       "use the model trained on this data set")
    if info.dataset and data.name and info.dataset != data.name:
        raise RMCError(f"the model was trained on {info.dataset!r} but {what} is {data.name!r}; use the model "
                       "trained on this data set (or pass the right --dataset)")


def check_model_store(info: ModelInfo, store, model_name: str = "--model") -> None:
    """A model with a D' (`DPrimeStore`): same data set, classes and image shape; another model's D' is noted."""
    m = store.manifest
    data = m.get("dataset", {}).get("name") or m.get("model", {}).get("dataset") or ""
    if info.dataset and data and info.dataset != data:
        raise RMCError(f"{model_name} was trained on {info.dataset!r} but the D' {store.path} was made from {data!r}; "
                       "use the D' built from this model's data set (`rmc augment`)")
    if tuple(store.input_shape) != tuple(info.input_shape):
        raise RMCError(f"{model_name} takes C x H x W = {tuple(info.input_shape)} but the D' {store.path} holds "
                       f"{tuple(store.input_shape)}; use the D' built for this model")
    if store.num_classes != info.num_classes:
        raise RMCError(f"{model_name} has {info.num_classes} classes but the D' {store.path} was made for "
                       f"{store.num_classes}; use the D' built for this model")
    if store.model_sha256 != info.sha256:
        _note(f"the D' {store.path} was made against model {store.model_sha256[:12]}, not {model_name} "
              f"({info.sha256[:12]}); RMC normally uses the D' of the model it defends")


def check_model_sets(info: ModelInfo, sets: Iterable, model_name: str = "--model") -> None:
    """A model with evaluation sets (`EvalSet`s): same data set, classes and image shape."""
    for s in sets:
        data = s.attack.get("dataset") or ""
        if info.dataset and data and info.dataset != data:
            raise RMCError(f"{model_name} was trained on {info.dataset!r} but evaluation set {s.name!r} holds "
                           f"{data!r} test inputs; use the evaluation sets of this data set (`rmc attack`)")
        if tuple(s.images.shape[1:]) != tuple(info.input_shape):
            raise RMCError(f"{model_name} takes C x H x W = {tuple(info.input_shape)} but evaluation set {s.name!r} "
                           f"holds {tuple(s.images.shape[1:])}; use the evaluation sets of this data set")
        if len(s.labels) and int(s.labels.max()) >= info.num_classes:
            raise RMCError(f"evaluation set {s.name!r} has class {int(s.labels.max())} but {model_name} has "
                           f"{info.num_classes} classes; use the evaluation sets of this data set")


def check_together(info: ModelInfo, store=None, sets: Iterable = (), data=None, model_name: str = "--model") -> None:
    """Every pairing of the model with what a command was given."""
    if data is not None:
        check_model_data(info, data)
    if store is not None:
        check_model_store(info, store, model_name)
    check_model_sets(info, sets, model_name)


__all__ = ["check_model_data", "check_model_sets", "check_model_store", "check_together"]
