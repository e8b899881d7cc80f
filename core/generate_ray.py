"""``generate`` spread over a Ray cluster: one actor per GPU (or per CPU slot), the driver the only database writer.

The run is the local one (``core.generate``) cut at its batches:

* the driver (the process that runs ``memaudit generate --ray``) checks the settings, asks
  one actor to load the model and describe it, records the model and prompts and lists the
  images not yet stored (``generate.plan``), exactly as the local run does;
* it cuts that list into batches of ``batch_size`` in the local run's order, so every image
  is sampled in the same batch, at the same position, as it would be locally: the same
  device, dtype and batch size give the same pixels;
* each actor holds the loaded pipeline, samples a batch (``generate.sample_batch``), writes
  each image atomically into the workspace (``generate.write_images``; the workspace sits
  on a filesystem every node reaches at the same path) and returns the rows, not inserted;
* the driver inserts each batch's rows (``generate.insert_rows``) as it arrives.

A row is only ever inserted after its actor has returned, that is after its file is
complete. When an actor's process or node dies, Ray restarts it (``MAX_RESTARTS``) and
runs its unfinished batches again; the files such a batch had already written are named by
their content (``{seed}-{sha256[:12]}.png``), so the rerun writes the same bytes to the same
names. A driver that is interrupted loses at most the batches in flight: the next run's
``plan`` skips every stored row and removes half-written temporary files. (Those are
named by the writing process's id, which the driver can only check on its own machine: a
temporary file of a worker on another node is removed once no process of that id runs on
the driver's machine, so two runs on one workspace at the same time are not supported.)
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

from . import cluster, tempfiles
from .errors import InputError, ModelError
from .generate import (GenerateReport, LoadedPipeline, Unit, check_settings, conditioning, free_path, insert_rows,
                       load_pipeline, plan, provenance, sample_batch, write_images)
from .store import Workspace

MAX_RESTARTS = 3  # an actor (and each of its batches) is restarted this many times before the run stops
IN_FLIGHT = 2  # batches queued on each actor, so that it samples the next while the driver stores the last


def _same_file(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except FileNotFoundError:
        return False


def content_path(root: Path, folder: str, stem: str, png: bytes) -> str:
    """``folder/stem.png`` unless a file with other bytes is there already (then ``stem-2.png``...).

    The stem holds the first 12 hex digits of the PNG's sha256, so the file found there is
    almost always this very image: written by an earlier try of the same batch, or by another
    generation with identical pixels. Rewriting it replaces it with the same bytes.
    """
    for k in range(1, 10_000):
        rel = f"{folder}/{stem}.png" if k == 1 else f"{folder}/{stem}-{k}.png"
        if not (root / rel).exists() or _same_file(root / rel, png):
            return rel
    raise RuntimeError(f"no free file name for {folder}/{stem}")


class GenerateWorker:
    """A Ray actor's state: the pipeline, loaded on first use (and again after a restart).

    ``fault`` is a test hook: ``(n, marker)`` makes the process exit abruptly (``os._exit``)
    right after it has written its n-th image, unless the file ``marker`` exists; it creates
    the marker first, so the restarted actor carries on.
    """

    def __init__(self, model_ref: str, device: str, root: str, fault: tuple[int, str] | None = None) -> None:
        self.model_ref, self.device, self.root, self.fault = model_ref, device, Path(root), fault
        self.loaded: LoadedPipeline | None = None
        self.base: dict[tuple, dict[str, Any]] = {}
        self.written = 0

    def _pipeline(self) -> LoadedPipeline:
        if self.loaded is None:
            import ray
            import torch

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, int(cpus)))
            self.loaded = load_pipeline(self.model_ref, self.device)
        return self.loaded

    def describe(self, prompts: Sequence[str] | None) -> dict[str, Any]:
        """The loaded model without its pipeline, where it runs, and the prompts' conditioning."""
        from . import __version__

        loaded = self._pipeline()
        return {"loaded": dataclasses.replace(loaded, pipeline=None), "version": __version__, "host": socket.gethostname(),
                "conditions": conditioning(loaded, prompts)}

    def run(self, batch: list[Unit], *, model_id: int, steps: int, guidance: float | None, weights_hash: str,
            version: str) -> list[dict[str, Any]]:
        """Sample one batch and write its images; their rows, for the driver to insert."""
        from . import __version__

        if version != __version__:
            raise InputError(f"{socket.gethostname()} runs memaudit {__version__} and the driver {version}; install the "
                             "same memaudit version on every node of the Ray cluster")
        loaded = self._pipeline()
        if loaded.weights_hash != weights_hash:
            raise ModelError(f"the model at {loaded.ref} on {socket.gethostname()} differs from the one the run started "
                             f"with (weights hash {loaded.weights_hash[:12]}, expected {weights_hash[:12]}); every node "
                             "needs the same model folder")
        key = (steps, guidance)
        if key not in self.base:
            self.base[key] = provenance(loaded, steps=steps, guidance=guidance)
        images = sample_batch(loaded, batch, steps=steps, guidance=guidance)
        rows = []
        for row in write_images(self.root, batch, images, model_id=model_id, base=self.base[key],
                                path_for=lambda folder, stem, png: content_path(self.root, folder, stem, png)):
            rows.append(row)
            self.written += 1
            self._maybe_fail()
        return rows

    def _maybe_fail(self) -> None:
        if self.fault is None or self.written < self.fault[0]:
            return
        try:
            os.close(os.open(self.fault[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


def claim_path(ws: Workspace, row: dict[str, Any]) -> dict[str, Any]:
    """The row with a file name no other row uses, as the local run names it (``generate.free_path``).

    An actor cannot see the database, so when identical pixels are already stored for another
    row under the same name, the driver gives this row its own copy, like the local run does.
    """
    rel = Path(row["path"])
    want = free_path(ws, rel.parent.as_posix(), f"{row['seed']}-{row['sha256'][:12]}")
    if want != row["path"]:
        data = (ws.root / rel).read_bytes()
        if not _same_file(ws.root / want, data):
            tempfiles.write_bytes_atomic(ws.root / want, data)
        row = dict(row, path=want)
    return row


AFTER_DEATH = "the finished batches are stored: run the same command again to resume"


def generate_on_ray(ws: Workspace, model_ref: str, prompts: Sequence[str] | None, per_prompt: int, *, steps: int,
                    guidance: float, batch_size: int, seed: int, device: str = "auto", address: str = "auto",
                    workers: int = 0, progress: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    fault: tuple[int, str] | None = None) -> GenerateReport:
    """``generate.generate`` on the Ray cluster at ``address`` (``cluster.connect``), same arguments and report.

    ``workers``: actors to start, 0 for one per GPU of the cluster (or, on a cluster without GPUs or
    with ``device='cpu'``, per CPU), at most that many. ``progress`` and ``should_stop`` behave as in ``generate``
    (``should_stop`` is asked before each batch is handed out; the batches in flight finish).
    ``fault`` is GenerateWorker's test hook.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    per_prompt, steps, guidance, batch_size, seed = check_settings(per_prompt, steps, guidance, batch_size, seed)
    if workers < 0:
        raise InputError(f"ray_workers must be >= 0, got {workers}")
    ray = cluster.connect(address)
    kind, have = cluster.slots(device)
    if have < 1:
        raise InputError(f"the Ray cluster has no {kind} to sample on; add a node with one")
    count = have if workers == 0 else min(workers, have)
    resources = {"num_cpus": 1, "num_gpus": 1} if kind == "GPU" else {"num_cpus": 1}
    ref = str(Path(model_ref).resolve()) if Path(model_ref).exists() else model_ref  # the path every node opens
    actor_class = ray.remote(GenerateWorker).options(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS, **resources)
    actors = [actor_class.remote(ref, device, str(ws.root), fault)]
    try:
        described = cluster.get([actors[0].describe.remote(prompts)], MAX_RESTARTS, AFTER_DEATH)[0]
        meta = described["loaded"]
        todo = plan(ws, meta, described["conditions"], per_prompt, steps=steps, guidance=guidance, seed=seed)
        batches = deque(todo.pending[i:i + batch_size] for i in range(0, len(todo.pending), batch_size))
        actors += [actor_class.remote(ref, device, str(ws.root), fault) for _ in range(min(count, len(batches)) - 1)]
        args = {"model_id": todo.model_id, "steps": steps, "guidance": todo.guidance, "weights_hash": meta.weights_hash,
                "version": described["version"]}

        generated, stopped, failure = 0, False, None
        in_flight: dict[Any, tuple[Any, list[Unit]]] = {}

        def hand_out(actor: Any) -> None:
            nonlocal stopped
            if failure is not None or stopped or not batches:
                return
            if should_stop is not None and should_stop():
                stopped = True
                return
            batch = batches.popleft()
            in_flight[actor.run.remote(batch, **args)] = (actor, batch)

        if progress:
            progress(todo.skipped, todo.planned)
        bar = tqdm(total=todo.planned, initial=todo.skipped, unit="img", desc="generate", disable=None)
        try:
            for _ in range(IN_FLIGHT):
                for actor in actors:
                    hand_out(actor)
            while in_flight:
                (done,), _ = ray.wait(list(in_flight), num_returns=1)
                actor, batch = in_flight.pop(done)
                try:
                    rows = ray.get(done)
                except Exception as e:  # noqa: BLE001 - kept, the batches in flight are stored, then it is raised
                    failure = failure or e
                    continue
                generated += insert_rows(ws, [claim_path(ws, r) for r in rows])
                bar.update(len(batch))
                if progress:
                    progress(todo.skipped + generated, todo.planned)
                hand_out(actor)
        finally:
            bar.close()
        if failure is not None:
            raise cluster.explain(failure, MAX_RESTARTS, AFTER_DEATH) from None
    finally:
        for a in actors:
            ray.kill(a)
    return GenerateReport(planned=todo.planned, skipped_existing=todo.skipped, generated=generated,
                          seconds=time.perf_counter() - t0, stopped=stopped, model_id=todo.model_id)
