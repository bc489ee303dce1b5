"""A model cut at its feature layer (backbone | head), and a head trained on cached inputs (RMC's scope 'head').

`split_at(model, layer)` traces the model (torch.fx) and cuts it after `layer`; `CachedHead` trains only the head,
its inputs computed once by the frozen backbone or, when the head starts with global pooling, read from the stored
neighbour features themselves.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from rmc.errors import RMCError


def _global_pool(m: nn.Module | None) -> bool:
    return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))


class _LeafAt(fx.Tracer):
    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.layer or super().is_leaf_module(m, qualname)


class HeadSplit:
    """`model` cut after `layer`: backbone(x) is that layer's output, head(h) the rest, head(backbone(x)) = model(x).

    `pooled_input`: the head begins with global average pooling, so it gives the same result on the pooled features
    (N x C, reshaped to N x C x 1 x 1) as on the full map, and the stored neighbour features can stand in for it.
    Both parts share `model`'s parameters.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pooled_input: bool):
        self.backbone, self.head, self.pooled_input = backbone, head, pooled_input

    def head_input(self, features: torch.Tensor) -> torch.Tensor:
        """The head's input from stored (pooled) features."""
        return features[:, :, None, None] if self.pooled_input else features


def split_at(model: nn.Module, layer: str) -> HeadSplit | None:
    """The model split after `layer`, or None when the rest of the network also reads earlier values (a skip
    connection around the layer), the layer runs more than once, or the model cannot be traced."""
    try:
        graph = _LeafAt(layer).trace(model)
    except Exception:
        return None
    gm = fx.GraphModule(model, graph)
    cut = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(cut) != 1:
        return None
    cut = cut[0]
    before = _nodes_before(graph, cut)
    # The head may use the cut, constants and parameters, never another value computed before the cut.
    for node in graph.nodes:
        if node in before or node is cut:
            continue
        if any(a in before and a.op != "get_attr" for a in node.all_input_nodes):
            return None

    back = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in before or node is cut:
            env[node] = back.node_copy(node, lambda a: env[a])
    back.output(env[cut])
    head = fx.Graph()
    env = {}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:                       # a parameter or buffer read before the cut: read it here too
            env[a] = head.node_copy(a)
        return env[a]

    for node in graph.nodes:
        if node is cut:
            env[node] = head.placeholder("h")
        elif node not in before:
            env[node] = head.node_copy(node, arg)
    head_gm = fx.GraphModule(gm, head)
    return HeadSplit(fx.GraphModule(gm, back), head_gm, _pooled_at_once(gm, cut))


def _nodes_before(graph: fx.Graph, cut: fx.Node) -> set[fx.Node]:
    """The nodes of `graph` that come before `cut`."""
    before: set[fx.Node] = set()
    for node in graph.nodes:
        if node is cut:
            break
        before.add(node)
    return before


def _pooled_at_once(gm: fx.GraphModule, cut: fx.Node) -> bool:
    """Whether the cut's only reader is a global average pooling (module or function)."""
    users = list(cut.users)
    if len(users) != 1:
        return False
    u = users[0]
    if u.op == "call_module":
        return _global_pool(gm.get_submodule(str(u.target)))
    if u.op == "call_function" and u.target is F.adaptive_avg_pool2d:
        size = u.args[1] if len(u.args) > 1 else u.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    return False


class CachedHead:
    """Scope 'head' as a `Forward` (rmc.defense.forwards): logits of the head on its inputs, which come from the
    frozen backbone (`inputs`) or, for D' rows, from their stored static-model features (`stored`)."""

    def __init__(self, split: HeadSplit, backbone: nn.Module, vectors: Callable[[np.ndarray], np.ndarray] | None):
        self.split, self.backbone, self.vectors = split, backbone, vectors

    @torch.no_grad()
    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.split.head(h)

    def stored(self, rows: np.ndarray) -> torch.Tensor | None:
        if self.vectors is None:
            return None
        return self.split.head_input(torch.from_numpy(self.vectors(rows)))

    @classmethod
    def build(cls, model: nn.Module, layer: str | None, sample: torch.Tensor,
              vectors: Callable[[np.ndarray], np.ndarray] | None, sample_rows: np.ndarray,
              wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> "CachedHead | None":
        """The cached head of `model` cut after `layer`, checked on `sample` (the images of D' rows `sample_rows`);
        None (with a warning) where the cut does not reproduce the model. `vectors(rows)` reads stored features,
        used only if they equal this backbone's pooled output on the sample. `wrap` speeds up the backbone."""
        split = split_at(model, layer) if layer is not None else None
        if split is None:
            warnings.warn(f"rmc: cannot cut the model after {layer!r} (skip connection or untraceable); scope 'head' "
                          "runs the whole network every batch", stacklevel=2)
            return None
        with torch.no_grad():
            h = split.backbone(sample)
            if not torch.allclose(split.head(h), model(sample), rtol=1e-4, atol=1e-5):
                warnings.warn("rmc: the model cut at its feature layer does not reproduce it; scope 'head' runs the "
                              "whole network every batch", stacklevel=2)
                return None
            if vectors is not None and not _same_features(vectors, sample_rows, h, split.pooled_input):
                vectors = None
        return cls(split, wrap(split.backbone), vectors)


def _same_features(vectors, rows: np.ndarray, h: torch.Tensor, pooled_input: bool) -> bool:
    """Whether the stored features of `rows` are this backbone's (pooled) output `h`, e.g. not another model's."""
    if not (pooled_input or h.dim() == 2):
        return False
    pooled = h.mean((2, 3)) if h.dim() == 4 else h
    try:
        v = torch.from_numpy(np.asarray(vectors(rows))).to(pooled)
    except RMCError:
        return False
    scale = pooled.abs().max().item() + 1e-12
    return v.shape == pooled.shape and bool((v - pooled).abs().max().item() <= 1e-3 * scale)
