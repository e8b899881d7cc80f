"""The audit's units of work on a Ray cluster (``memaudit audit WS --ray``).

Each actor builds an ``AuditContext`` once (the training set's pyramid, read from the
workspace's cache, the embedder) and runs units: a text prompt (decode, neighbours, pairwise
distances saved to the run's cache folder, clique groups, tau curves) or a chunk of an
unconditional model's generations. What a unit returns is stored by the run's own process
exactly as a local unit's result, so the run is the local run, number for number.

The cluster needs what generation on Ray needs (README, "Auditing at scale"): the same
memaudit version on every node and the workspace at the same path on a filesystem they all
read and write (the actors read the images and the training cache and write the distance
matrices; the driver alone writes the database). An actor that dies is restarted by Ray and
its unit run again: a unit only reads, and writes its distance files whole again.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Callable, Iterator

from . import cluster
from .errors import InputError
from .records import AuditParams
from .store import Workspace

MAX_RESTARTS = 3  # times Ray restarts a dead actor and retries its unit
IN_FLIGHT = 2  # units handed to each actor at once: one running, one waiting


class AuditWorker:
    """A Ray actor's state: the audit context, built on first use (and again after a restart)."""

    def __init__(self, root: str, params: dict, version: str) -> None:
        self.root, self.params, self.version = root, AuditParams(**params), version
        self.ctx = None

    def _context(self):
        if self.ctx is None:
            import ray
            import torch

            from . import __version__
            from .audit import AuditContext

            if self.version != __version__:
                raise InputError(f"{socket.gethostname()} runs memaudit {__version__} and the driver {self.version}; "
                                 "install the same memaudit version on every node of the Ray cluster")
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, int(cpus)))
            self.ctx = AuditContext(Workspace.open(self.root), self.params)
        return self.ctx

    def prompt(self, prompt_id: int, generations: list[tuple[int, str]], cache: str):
        return self._context().audit_prompt(prompt_id, generations, Path(cache), inline_curves=True)

    def chunk(self, generations: list[tuple[int, str]]):
        return self._context().audit_chunk(generations)


class RayRunner:
    """Hands an audit's units to actors on the cluster at ``address`` and gives back their results
    (``take(unit, result)``) as they arrive, with at most IN_FLIGHT units per actor outstanding."""

    def __init__(self, ws: Workspace, address: str, workers: int = 0) -> None:
        from . import __version__
        from .audit import audit_device

        if workers < 0:
            raise InputError(f"ray_workers must be >= 0, got {workers}")
        self.ray = cluster.connect(address)
        setting = str(ws.get_setting("audit_device")).strip().lower()
        kind, have = cluster.slots("cpu" if setting == "cpu" else "auto")
        if kind == "CPU" and setting == "cuda":
            audit_device(setting)  # the cluster has no GPU: the same one line as locally
        if have < 1:
            raise InputError(f"the Ray cluster has no {kind} to audit on; add a node with one")
        self.count = have if workers == 0 else min(workers, have)
        resources = {"num_cpus": 1, "num_gpus": 1} if kind == "GPU" else {"num_cpus": 1}
        self.actor_class = self.ray.remote(AuditWorker).options(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
                                                                **resources)
        self.root, self.version = str(ws.root.resolve()), __version__
        self.actors: list[Any] = []

    def run(self, params: AuditParams, units: Iterator, cache: Path, take: Callable[[Any, Any], None]) -> None:
        """Run ``units`` of an audit with ``params`` and ``take`` each result as it arrives (a result's
        place in the run is its unit's, so the order of arrival changes nothing)."""
        ray = self.ray
        pending: dict[Any, tuple[Any, Any]] = {}  # object ref -> (unit, actor)
        units = iter(units)

        def hand_out(actor: Any) -> bool:
            unit = next(units, None)
            if unit is None:
                return False
            if unit.plan.unconditional:
                ref = actor.chunk.remote(unit.generations)
            else:
                ref = actor.prompt.remote(unit.plan.prompt_id, unit.generations, str(cache))
            pending[ref] = (unit, actor)
            return True

        more = True
        while more and len(self.actors) < self.count:
            actor = self.actor_class.remote(self.root, params.to_dict(), self.version)
            self.actors.append(actor)
            more = hand_out(actor)
        for _ in range(IN_FLIGHT - 1):
            for actor in self.actors:
                more = more and hand_out(actor)
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            unit, actor = pending.pop(ready)
            take(unit, cluster.get(ready, MAX_RESTARTS, "nothing of the run is kept: run the same command again"))
            if more:
                more = hand_out(actor)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
