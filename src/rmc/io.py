"""Small, safe file helpers: atomic writes, JSON, hashing, safetensors tensors.

Everything that writes goes through a temporary name in the same folder and is renamed into place,
so an interrupted command never leaves a half-written file under the final name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rmc.errors import RMCError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)   # mkstemp makes 0600; give files the permissions `open` would
    try:
        try:
            yield tmp_path
            os.replace(tmp_path, path)
        except OSError as e:
            message = describe_os_error(e)
            if message is None:
                raise
            e.filename = e.filename if e.filename and Path(e.filename) != tmp_path else str(path)
            raise RMCError(describe_os_error(e)) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise RMCError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as e:   # ValueError: bad JSON or UTF-8, an integer of thousands of digits
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:120]
        raise RMCError(f"{what} {path} is not valid JSON ({reason}); delete it and re-create it") from None
    except OSError as e:
        if describe_os_error(e) is not None:
            raise
        raise RMCError(f"{what} {path} cannot be read ({e.strerror}); it must be a readable file") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as e:   # safetensors reports I/O faults as its own error: "... (os error 28)"
            m = re.search(r"os error (\d+)", str(e))
            if m is None:
                raise
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None


def load_tensors(path: str | Path, what: str = "tensor file") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise RMCError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RMCError(f"{what} {path} is not a valid safetensors file ({e}); re-create it") from None


# ---------------------------------------------------------------- output locks and stray state

LOCK_PREFIX = "."
LOCK_SUFFIX = ".rmc-lock"


def lock_path(out: str | Path) -> Path:
    """The lock of an output (directory or file) lives beside it, so it exists before the output does and a
    store renamed into place (`<out>.partial` -> `<out>`) stays covered."""
    out = Path(out).resolve()   # two spellings of one output (a symlink, ..) share one lock
    return out.with_name(f"{LOCK_PREFIX}{out.name}{LOCK_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_text(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}: "
            f"{info.get('command', '?')}")


class OutputLock:
    """An exclusive lock on one output, held for the life of a command (fcntl.flock: the kernel drops it when the
    process dies, so a kill -9 never leaves a lock that blocks; the file's JSON names the holder for the message).

    A second process gets RMCError naming the holder. A lock file left by a dead process is taken over with a note.
    """

    def __init__(self, out: str | Path, command: str, note=None):
        self.out, self.path, self.command = Path(out), lock_path(out), command
        self.note = note or (lambda msg: print(msg, file=sys.stderr))
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        import fcntl
        import socket
        import time
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            blocker = next((p for p in self.path.parent.parents if p.exists() and not p.is_dir()), None)
            if self.path.parent.exists() and not self.path.parent.is_dir():
                blocker = self.path.parent
            if blocker is not None:
                raise RMCError(f"{blocker} is a file, so {self.out} cannot be created under it; choose another "
                               "--out") from None
            raise RMCError(f"cannot create {self.path.parent} for {self.out} ({e.strerror}); "
                           "choose a writable --out") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RMCError(f"cannot write beside {self.out} ({e.strerror}: {self.path}); "
                               "choose a writable --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_lock_info(fd)
                os.close(fd)
                raise RMCError(f"{self.out} is in use by another rmc process ({_holder_text(info)}); wait for it "
                               f"to finish or choose another --out") from None
            # The file may have been unlinked by its previous holder between our open and our lock: retry then.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_lock_info(fd)
        host = socket.gethostname()
        if old.get("pid"):
            dead = old.get("host") == host and not _pid_alive(int(old["pid"]))
            self.note(f"note: taking over the lock of {self.out} left by "
                      f"{'a dead process' if dead else 'a process that did not release it'} ({_holder_text(old)})")
        info = {"pid": os.getpid(), "host": host, "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl
        try:
            self.path.unlink()   # before unlocking: a waiter that opened the old file re-checks the inode
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_lock_info(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw) if raw else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def stray_temporaries(folder: str | Path, max_depth: int = 4) -> list[Path]:
    """Temporary files an interrupted write left under `folder` (atomic_path's `.<name>.*.tmp`, `*.jsonl.tmp`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    base_depth = len(folder.parts)
    for root, dirs, files in os.walk(folder):
        if len(Path(root).parts) - base_depth >= max_depth:
            dirs[:] = []
        found += [Path(root) / f for f in files
                  if (f.startswith(".") and f.endswith(".tmp")) or f.endswith(".jsonl.tmp")]
    return sorted(found)


def clean_stray_temporaries(folder: str | Path, note=None) -> list[Path]:
    """Delete the temporaries an interrupted command left in an output we hold the lock of (they are never
    finished files: atomic_path renames a file into place only when it is complete)."""
    found = stray_temporaries(folder)
    for f in found:
        f.unlink(missing_ok=True)
    if found and note is not None:
        names = ", ".join(str(f) for f in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        note(f"note: removed {len(found)} temporary file(s) left by an interrupted run: {names}")
    return found


# ---------------------------------------------------------------- disk faults

def check_free_space(path: str | Path, need: int, what: str) -> None:
    """Refuse before writing `need` bytes under `path` when the file system has less free."""
    import shutil
    path = Path(path)
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < need:
        raise RMCError(f"not enough disk space for {what} at {path}: needs {_size(need)}, {_size(free)} free; "
                       "free some space or choose another --out")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def describe_os_error(e: OSError) -> str | None:
    """One line for a disk-full / permission / read-only fault, naming the path; None for other errors."""
    names = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
             errno.EROFS: "the file system is read-only"}
    if e.errno not in names:
        return None
    where = e.filename or "an output file"
    fix = "free some space and re-run the same command (finished work is kept)" if e.errno in (
        errno.ENOSPC, errno.EDQUOT) else "choose a writable --out or fix the permissions"
    return f"{names[e.errno]} writing {where}; {fix}"
