"""Names and paths read from files rmc did not necessarily write (an index, a manifest, a sidecar, a record).

Anything read from a file is untrusted: a name becomes a path component only through `safe_name`, and a
relative path inside a folder is followed only through `inside`. Both raise a one-line `RMCError` naming the
file, the field and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from rmc.errors import RMCError

# Letters, digits and `._-=+@,`: enough for every name rmc writes (set names like `pgd10-eps0.1-targeted`,
# base names, hashes); no separator, no space, no control character.
_NAME = re.compile(r"[A-Za-z0-9._\-=+@,]+")
MAX_NAME = 128   # one path component, far below every file system's 255-byte limit


def safe_name(value: object, what: str, source: str | Path | None = None) -> str:
    """`value` as a single path component, or a one-line error.

    `what` names the field (e.g. "set name"), `source` the file it came from.
    """
    where = f" in {source}" if source is not None else ""
    if not isinstance(value, str):
        raise RMCError(f"{what}{where} must be a string, got {type(value).__name__}; the file is damaged or "
                       "was not written by rmc: rebuild it")
    if (not value or len(value) > MAX_NAME or not _NAME.fullmatch(value) or value in (".", "..")
            or value.startswith(".")):
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise RMCError(f"{what}{where} is {shown!r}, not a plain name (letters, digits, '._-=+@,', at most "
                       f"{MAX_NAME} characters, not starting with '.'); the file is damaged or hostile: rebuild it")
    return value


def inside(folder: str | Path, relative: object, what: str, source: str | Path | None = None) -> Path:
    """`folder / relative`, refused unless it stays inside `folder` once symbolic links are resolved."""
    where = f" in {source}" if source is not None else ""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise RMCError(f"{what}{where} must be a relative path (a non-empty string), got {relative!r}; "
                       "the file is damaged: rebuild it")
    if Path(relative).is_absolute():
        raise RMCError(f"{what}{where} is the absolute path {relative!r}; rmc only follows paths relative to "
                       f"{folder}: the file is damaged or hostile, rebuild it")
    base = Path(folder).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise RMCError(f"{what}{where} is {relative!r}, which leads outside {base}; rmc only reads inside the "
                       "folder that names it: the file is damaged or hostile, rebuild it")
    return target


__all__ = ["MAX_NAME", "inside", "safe_name"]
