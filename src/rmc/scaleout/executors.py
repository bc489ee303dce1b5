"""Executors: where a job's tasks run, in this process or as Ray tasks. Nothing here knows what the tasks do.

A driver writes one loop over an executor: `put` the large inputs once (handles), `submit` tasks while `has_room`,
take finished ones with `next`. `executor(ray, workers)` gives the inline executor (ray None: tasks run here, one at
a time, in submission order) or a `RayExecutor` over a Ray `session`; the driver's code is the same for both.

Ray is an optional extra (`pip install 'rmc-defense[ray]'`); nothing here imports it until a Ray executor or
session is asked for. `connect(address)` starts a local Ray (address None or "local") or joins a cluster ("auto",
"HOST:6379", "ray://HOST:10001"); `session()` does the same and shuts down a Ray it started.

Fault tolerance on Ray: a task whose worker dies is re-run (`MAX_RETRIES`) and its result reaches the driver once;
drivers write only on the driver, so no result is lost or written twice.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from rmc.cpu import tune_allocator
from rmc.errors import RMCError

LOCAL = "local"            # --ray with no address: start a Ray on this machine
MAX_RETRIES = 3            # Ray re-runs a task whose worker died this many times before giving up
FORWARD_ENV = "RMC_"       # environment variables with this prefix are set on Ray's workers too
CONNECT_TIMEOUT_S = 15.0   # joining a cluster (--ray ADDRESS) fails after this long (Ray itself waits minutes)
CHECKS = ("is the cluster up (`ray status` on its head node)? is the address HOST:PORT of its GCS (6379 by "
          "default; ray://HOST:10001 for a Ray client server) and is the port open from here? a cluster with token "
          "authentication also needs RAY_AUTH_MODE=token and its token here")


def _ray():
    try:
        import ray
    except ImportError:
        raise RMCError("--ray needs Ray, an optional extra: pip install 'rmc-defense[ray]'") from None
    return ray


# ---------------------------------------------------------------- connection

def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of "HOST:PORT" or "ray://HOST:PORT"; None for "auto" (Ray finds it) or what is not one."""
    text = address.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def _probe(address: str, timeout: float) -> None:
    """Refuse, within `timeout` seconds, a cluster address that does not answer (Ray would wait for minutes, or
    end the process): first the port (nothing listening, no route), then Ray's own handshake, in a child process
    that is killed when time is up."""
    import socket
    import subprocess
    import sys
    import time
    t0 = time.monotonic()
    hp = _host_port(address)
    if hp is not None:
        try:
            socket.create_connection(hp, timeout=timeout).close()
        except OSError as e:
            reason = (f"no answer within {timeout:g} s (--ray-timeout)" if isinstance(e, TimeoutError)
                      else (e.strerror or type(e).__name__).lower())
            raise RMCError(f"cannot reach a Ray cluster at {address!r} ({reason}); {CHECKS}") from None
    left = max(1.0, timeout - (time.monotonic() - t0))
    code = ("import logging, ray\nray.init(address=%r, log_to_driver=False, logging_level=logging.ERROR)\n"
            "ray.cluster_resources()\n" % address)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        raise RMCError(f"the Ray cluster at {address!r} did not answer within {timeout:g} s (--ray-timeout); "
                       f"{CHECKS}") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith((" ", "["))]
        why = (lines[-1] if lines else f"exit status {done.returncode}")[:200]
        raise RMCError(f"cannot join the Ray cluster at {address!r} ({why}); {CHECKS}")


def connect(address: str | None = LOCAL, workers: int | None = None, timeout: float | None = None) -> int:
    """Join Ray and return the number of worker slots (CPUs, at most `workers`). A running connection is reused.

    address None or "local": start Ray on this machine with `workers` CPUs (default: all cores); anything else is
    passed to `ray.init(address=...)`: "auto" (a cluster started on this machine with `ray start --head`),
    "HOST:6379", or a Ray client address "ray://HOST:10001". Joining a cluster that does not answer fails after
    `timeout` seconds (default CONNECT_TIMEOUT_S) with one line naming the address and what to check.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise RMCError(f"--workers must be a whole number >= 1, got {workers!r}")
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise RMCError(f"--ray-timeout must be a number of seconds > 0, got {timeout!r}")
    ray = _ray()
    if not ray.is_initialized() and address not in (None, "", LOCAL):
        _probe(address, timeout)
    if not ray.is_initialized():
        on_sigterm = signal.getsignal(signal.SIGTERM)
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV)}
        kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING,
                                      runtime_env={"env_vars": env} if env else None)
        try:
            if address in (None, "", LOCAL):
                # Ray starts its workers 15 steps nicer than the driver, so that its own services stay responsive;
                # here the workers do all of the work while the driver waits, and at nice 19 any other process on
                # the machine starved them (a paper-scale run made no progress for 20 minutes beside a test run).
                # Same priority as this process, unless the user set RAY_worker_niceness.
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except ConnectionError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RMCError(f"cannot reach a Ray cluster at {address!r} ({first}); start one with `ray start --head` "
                           "and pass the address it prints, or use --ray alone for a local Ray. A cluster with token "
                           "authentication (the default of `ray start` in recent Ray) also needs RAY_AUTH_MODE=token "
                           "and its token (~/.ray/auth_token or RAY_AUTH_TOKEN) here") from None
        if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)   # Ray's own handler dumps a stack trace and ends the process
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus < 1:
        raise RMCError("the Ray cluster has no CPUs available to run tasks")
    return min(cpus, workers) if workers else cpus


def is_connected() -> bool:
    """Whether this process is already connected to a Ray (False when Ray is not installed)."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


@contextlib.contextmanager
def session(address: str | None = LOCAL, workers: int | None = None, timeout: float | None = None) -> Iterator[int]:
    """`connect`, and on exit shut down the Ray this call started (a Ray already running is left alone)."""
    ray = _ray()
    started = not ray.is_initialized()
    try:
        yield connect(address, workers, timeout)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


@contextlib.contextmanager
def hold(ray: str | None, workers: int | None = None, timeout: float | None = None) -> Iterator[int]:
    """Keep one Ray session open over a job of several stages (each stage's `executor` reuses it); in-process
    (`ray` None) there is nothing to hold. Yields the worker slots. `timeout`: see `connect`."""
    if ray is None:
        yield 1
        return
    with session(ray, workers, timeout) as slots:
        yield slots


# ---------------------------------------------------------------- handles and the per-worker cache

@dataclass(frozen=True)
class Local:
    """An object handed to in-process tasks as it is (the inline executor's stand-in for an object-store ref)."""
    obj: Any


def get(handle):
    """The object behind a handle from `put` (called inside tasks)."""
    if isinstance(handle, Local):
        return handle.obj
    return _ray().get(handle)


def handle_key(handle) -> Any:
    """A hashable identity of a handle: the object's id in this process, the object-store id on Ray."""
    return ("local", id(handle.obj)) if isinstance(handle, Local) else handle.hex()


_CACHE: dict[str, tuple[Any, Any]] = {}


def cached(slot: str, key, build: Callable[[], Any]):
    """One object per slot per worker process, rebuilt when its key changes (a worker runs many tasks that need
    the same expensive object)."""
    hit = _CACHE.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    _CACHE.pop(slot, None)
    value = build()
    _CACHE[slot] = (key, value)
    return value


def cpu_model(model: nn.Module) -> nn.Module:
    """The model as shipped to Ray's workers (as CPU tensors; `worker_model` puts it on the worker's GPU if it has
    one): never the caller's object moved."""
    try:
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    except AttributeError:
        on_cpu = True
    return model if on_cpu else copy.deepcopy(model).cpu()


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def worker_device() -> torch.device | None:
    """Inside a Ray task that holds a GPU (one per task: `RayExecutor(gpus=...)`), that GPU; else None."""
    if not _WORKER_READY:
        return None
    try:
        ids = _ray().get_gpu_ids()
    except Exception:   # noqa: BLE001 - not inside a task
        return None
    return torch.device("cuda") if ids and torch.cuda.is_available() else None


def worker_model(handle) -> nn.Module:
    """The model behind a `put_model` handle, where the task computes: in this process as the caller placed it; on
    a Ray worker with a GPU moved there (the worker's own deserialised copy), on a CPU worker as shipped."""
    model = get(handle)
    device = None if isinstance(handle, Local) else worker_device()
    return model.to(device) if device is not None else model


# ---------------------------------------------------------------- executors

class InlineExecutor:
    """Runs each task in this process as it is submitted; `next` hands the results back in submission order."""
    slots = 1
    remote = False           # tasks cost nothing to hand out: drivers give them the smallest unit of work
    where = "in-process"

    def __init__(self):
        self.done: deque = deque()

    def put(self, obj) -> Local:
        return Local(obj)

    def put_model(self, model: nn.Module) -> Local:
        return Local(model)   # on whatever device the caller chose

    def has_room(self) -> bool:
        return not self.done

    def submit(self, key, fn: Callable, *args) -> None:
        self.done.append((key, fn(*args)))

    def __len__(self) -> int:
        return len(self.done)

    def next(self):
        return self.done.popleft()

    def cancel(self) -> None:
        self.done.clear()
        _CACHE.clear()   # what tasks cached here is keyed by object ids, which a later job may reuse


_WORKER_READY = False


def _entry(fn: Callable, *args):
    """What a Ray worker runs: once per worker process, one thread per task (each task holds one CPU) and the
    memory allocator tuned as the `rmc` command tunes its own (without it, PGD and fine-tuning spent most of their
    time in the kernel faulting in freshly mapped pages); then the task."""
    global _WORKER_READY
    if not _WORKER_READY:
        torch.set_num_threads(1)
        try:
            import faiss
            faiss.omp_set_num_threads(1)
        except Exception:   # noqa: BLE001 - only a thread setting
            pass
        tune_allocator()
        _WORKER_READY = True
    return fn(*args)


_REMOTE = None


class RayExecutor:
    """Runs tasks as Ray tasks (retried when their worker dies) and hands back results as they finish.

    `gpus` > 0: every task also holds one GPU, so Ray runs one worker per GPU (`slots` of them) and `worker_model`
    puts the model there; else every task holds one CPU."""
    remote = True

    def __init__(self, slots: int, capacity: int | None = None, gpus: int = 0):
        global _REMOTE
        self.ray = _ray()
        if _REMOTE is None:
            _REMOTE = self.ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_entry)
        self.gpus = gpus
        self.slots = max(1, min(slots, gpus) if gpus else slots)
        self._remote = _REMOTE.options(num_gpus=1) if gpus else _REMOTE
        # Tasks queued beyond the slots keep every worker busy; an explicit --workers is a hard limit.
        self.capacity = capacity or 2 * self.slots
        self.where = f"{self.slots} Ray workers" + (" (one GPU each)" if gpus else "")
        self.refs: dict = {}

    def put(self, obj):
        return self.ray.put(obj)

    def put_model(self, model: nn.Module):
        return self.ray.put(cpu_model(model))

    def has_room(self) -> bool:
        return len(self.refs) < self.capacity

    def submit(self, key, fn: Callable, *args) -> None:
        self.refs[self._remote.remote(fn, *args)] = key

    def __len__(self) -> int:
        return len(self.refs)

    def next(self):
        """(key, result) of a task that finished; raises what the task raised."""
        ready, _ = self.ray.wait(list(self.refs), num_returns=1)
        key = self.refs.pop(ready[0])
        try:
            return key, self.ray.get(ready[0])
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, RMCError):
                raise cause from None   # a clear message about the user's input: no remote traceback
            raise   # anything else: Ray's exception (an instance of the task's exception class, with its traceback)
        except self.ray.exceptions.RayError as e:
            raise lost(e, key) from None

    def cancel(self) -> None:
        for ref in list(self.refs):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:   # noqa: BLE001 - finished or already gone
                pass
        self.refs.clear()


def gpu_slots(device: torch.device | str | None) -> int:
    """GPUs of the connected Ray cluster that tasks computing on `device` use: all of them for a CUDA device, none
    for the CPU (a cluster without GPUs: none, and the tasks run on CPUs as the model is shipped)."""
    if device is None or torch.device(device).type != "cuda":
        return 0
    return int(_ray().cluster_resources().get("GPU", 0))


def lost(error: BaseException, key) -> RMCError:
    """The one line for a task Ray gave up on: its workers or nodes died (MAX_RETRIES times), or the cluster went
    away. Drivers write each result as it arrives, so what finished is on disk and a re-run resumes from it."""
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return RMCError(f"Ray lost task {key} ({type(error).__name__}{': ' + first if first else ''}) after "
                    f"{MAX_RETRIES + 1} tries: its workers or the cluster went away. The finished work is saved; check "
                    "the cluster (`ray status`) and re-run the same command to resume")


@contextlib.contextmanager
def executor(ray: str | None = None, workers: int | None = None,
             device: torch.device | str | None = None) -> Iterator[InlineExecutor | RayExecutor]:
    """The executor of one job: in this process (`ray` None) or on Ray ("local" or a cluster address; at most
    `workers` tasks at a time). `device`: where the caller's model computes; a CUDA device gets one Ray worker per
    GPU of the cluster. Unfinished tasks are cancelled on exit."""
    with contextlib.ExitStack() as stack:
        ex: InlineExecutor | RayExecutor
        if ray is None:
            ex = InlineExecutor()
        else:
            slots = stack.enter_context(session(ray, workers))
            gpus = gpu_slots(device)
            ex = RayExecutor(min(gpus, workers or gpus) if gpus else slots, workers, gpus)
        try:
            yield ex
        finally:
            ex.cancel()


__all__ = ["CONNECT_TIMEOUT_S", "InlineExecutor", "LOCAL", "Local", "MAX_RETRIES", "RayExecutor", "cached", "connect",
           "cpu_model", "executor", "get", "gpu_slots", "handle_key", "hold", "is_connected", "lost", "model_device",
           "session", "worker_device", "worker_model"]
