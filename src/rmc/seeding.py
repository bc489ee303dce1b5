"""Randomness that depends only on what it is for: a stable seed from any parts, and a generator from it."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (so each input's randomness is independent of run order)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded by `derive_seed(*parts)`."""
    return torch.Generator().manual_seed(derive_seed(*parts))
