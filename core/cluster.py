"""Attaching this process to a Ray cluster, for the commands that spread their work over one.

Ray is optional (``pip install 'memaudit[ray]'``); nothing here imports it until a caller
connects. An address is one of

* ``auto``: the cluster already running on this machine (``ray start --head`` here, or a
  node of a cluster started with ``ray start --address=...``);
* ``local``: a private instance this process starts and stops, with every CPU and GPU of
  this machine (no ``ray start`` needed on a single multi-GPU machine);
* ``HOST:PORT``: the head node's GCS address, as ``ray start --head`` prints it.

An address that does not answer is refused in a few seconds with one line (a TCP connection
is tried first, so an unreachable head never leaves the command waiting on Ray's own
retries). The process that connects is the *driver*: for every command it is the only
process that writes the workspace's SQLite database.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import tempfile
from typing import Any, Iterator

from .errors import InputError, MemauditError

INSTALL = "pip install 'memaudit[ray]'"
CONNECT_TIMEOUT_S = 5.0
_made: list[str] = []  # temporary folders start_local made, for shutdown to remove
_GCS_WAIT = "RAY_gcs_server_port_wait_time_s"  # how many one-second tries ray.init gives a GCS
_HOST_PORT = re.compile(r"^(?:ray://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


def parse_address(text: Any) -> str:
    """'' (no cluster), 'auto', 'local' or HOST:PORT, stripped; ValueError naming the setting otherwise."""
    value = str(text).strip()
    if value.lower() in ("", "auto", "local"):
        return value.lower()
    m = _HOST_PORT.match(value)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"ray_address must be auto, local or HOST:PORT (the head node's address that `ray start --head` "
                         f"prints), got {value!r}")
    return value


def require_ray() -> Any:
    """The ``ray`` module, or an InputError saying in one line how to install it."""
    _quiet_environment()
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray needs Ray, which is not installed here; install it with: {INSTALL}") from None
    return ray


def _quiet_environment() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report, no prompt about it
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _reachable(address: str, timeout: float) -> None:
    m = _HOST_PORT.match(address)
    assert m is not None, address  # parse_address checked it
    host = m["host"].strip("[]")
    try:
        with socket.create_connection((host, int(m["port"])), timeout=timeout):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise InputError(f"no Ray cluster answers at {address} ({why}); start one with `ray start --head` on the head "
                         "node and pass the address it prints, or use --ray local on one machine") from None


def _running_here() -> str | None:
    """The address Ray's own ``auto`` would join (RAY_ADDRESS, the last ``ray start`` here, a running GCS), or None.

    Resolved here rather than inside ``ray.init`` so that the address is tried with a timeout first:
    ``ray.init`` retries an address that does not answer for minutes.
    """
    from ray._private import services  # no public equivalent in Ray 2.x

    try:
        return services.canonicalize_bootstrap_address("auto")
    except ConnectionError:
        return None


@contextlib.contextmanager
def _stderr_held() -> Iterator[None]:
    """Hold back what Ray's C++ side prints while it connects (a warning per retry); printed only on an unexpected error."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (captured by a test runner): nothing to hold
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        except ConnectionError:
            raise
        except BaseException:
            os.dup2(saved, fd)
            held.seek(0)
            sys.stderr.write(held.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def connect(address: str, *, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """Attach this process to the cluster at ``address`` (see the module docstring); return the ``ray`` module.

    A process already attached (a test's local instance, an earlier call) stays on its cluster.
    """
    address = parse_address(address) or "auto"
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if address == "local":
        ray.init(address="local", include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        return ray
    if address == "auto":
        address = _running_here() or ""
        if not address:
            raise InputError("no Ray cluster is running on this machine; start one with `ray start --head` (or use "
                             "--ray local, or --ray HOST:PORT for a cluster elsewhere)")
    _reachable(address, timeout)
    # Ray's driver retries a GCS that does not answer for ~20 s (one try a second); a few tries are enough
    # for a head that is up, and a port that answers without being Ray is then said in a few seconds too.
    before = os.environ.get(_GCS_WAIT)
    os.environ[_GCS_WAIT] = str(max(1, round(timeout)))
    try:
        with _stderr_held():
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{address} answers but is not a Ray cluster that this Ray {ray.__version__} can join ({first}); "
                         "check the address that `ray start --head` printed and that every node runs the same Ray") from None
    finally:
        if before is None:
            os.environ.pop(_GCS_WAIT, None)
        else:
            os.environ[_GCS_WAIT] = before
    return ray


def start_local(num_cpus: int = 2, num_gpus: int = 0, temp_dir: str | None = None) -> str:
    """Start a private Ray instance in this process (no dashboard, quiet logs, its own temporary folder); its address.

    For tests and benchmarks. ``temp_dir`` defaults to a new short folder under /tmp: Ray puts
    unix sockets there, and a socket path may not exceed about 107 bytes.
    """
    ray = require_ray()
    if temp_dir is None:
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp" if os.path.isdir("/tmp") else None)
        _made.append(temp_dir)  # removed by shutdown()
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False, _temp_dir=temp_dir)
    return ray.get_runtime_context().gcs_address


def slots(device: str) -> tuple[str, int]:
    """('GPU' or 'CPU', how many the cluster has) for actors that sample on ``device`` (auto, cuda, cpu).

    ``auto`` takes the GPUs when the cluster has any, else the CPUs. Slots that other work holds
    now are counted too: actors that find none free wait for one, as Ray queues any work.
    """
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if device.startswith("cuda") and gpus == 0:
        raise InputError(f"device {device!r} was asked for but the Ray cluster has no GPU; use --device cpu or auto")
    if device == "mps":
        raise InputError("device 'mps' cannot be shared out by Ray; use --device cpu or auto")
    kind = "GPU" if gpus and device != "cpu" else "CPU"
    return kind, int(total.get(kind, 0))


def shutdown() -> None:
    """Detach this process from its cluster (and stop the instance it started, if it started one)."""
    import shutil

    import ray

    if ray.is_initialized():
        ray.shutdown()
    while _made:
        shutil.rmtree(_made.pop(), ignore_errors=True)


def explain(e: BaseException, restarts: int, after: str) -> BaseException:
    """A worker's error as the driver raises it: the user's error in one line; a worker that died
    more than ``restarts`` times said so, followed by ``after`` (what is kept, what to do); bugs unchanged."""
    import ray.exceptions as rx

    if isinstance(e, rx.RayTaskError) and isinstance(getattr(e, "cause", None), MemauditError):
        return e.cause
    if isinstance(e, rx.RayActorError):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return MemauditError(f"a Ray worker died {restarts + 1} times ({first[:200]}); {after}")
    return e


def get(refs: Any, restarts: int, after: str) -> Any:
    """``ray.get(refs)``, raising a worker's error as ``explain`` says."""
    import ray

    try:
        return ray.get(refs)
    except Exception as e:  # noqa: BLE001 - every error is re-raised, the user's ones in one line
        raise explain(e, restarts, after) from None
