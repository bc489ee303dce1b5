"""Content checks of artifact files that stay cheap: a full sha256 only when a file's size or mtime changed since
the last successful verification (or on demand).

The record of past verifications lives outside the artifact, in `$RMC_CACHE_DIR/verified/` (default
`~/.cache/rmc/verified/`), keyed by the file's absolute path: artifacts stay byte-identical and read-only inputs
are never written. A missing or unwritable cache only costs a re-hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rmc.io import sha256_file, write_json


def _cache_file(path: Path) -> Path:
    root = Path(os.environ.get("RMC_CACHE_DIR", Path.home() / ".cache" / "rmc")) / "verified"
    return root / (hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:32] + ".json")


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def matches_hash(path: str | Path, expected: str | None, full: bool = False) -> bool:
    """Whether the file at `path` has sha256 `expected`. Re-hashes only when `full`, or when the file changed
    (size, mtime or inode) since it last verified against this same hash."""
    path = Path(path)
    if not expected:
        return False
    cache = _cache_file(path)
    stamp = _stamp(path)
    if not full:
        try:
            seen = json.loads(cache.read_text())
            if seen.get("stamp") == stamp and seen.get("sha256") == expected:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    if sha256_file(path) != expected:
        return False
    remember(path, expected, stamp)
    return True


def remember(path: str | Path, sha256: str, stamp: list[int] | None = None) -> None:
    """Record that `path`, as it is now, has hash `sha256` (after a build that just computed it)."""
    path = Path(path)
    try:
        write_json(_cache_file(path), {"path": str(path.absolute()), "stamp": stamp or _stamp(path),
                                       "sha256": sha256})
    except Exception:   # a cache that cannot be written only costs a re-hash next time
        pass
