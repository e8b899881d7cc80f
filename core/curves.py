"""The largest clique at every tau of a grid, for live re-thresholding, and the worker
processes that compute these curves beside the audit's main loop.

``python -m core.curves`` is a worker: it reads one task per line on standard input, a JSON
object ``{"dist": PATH, "budget": N, "taus": [...]}`` naming a distance matrix the audit saved
(``.npy``) and the taus of the run's curve, and answers one JSON line per task:
``{"size": [...], "medoid": [...], "mean": [...], "exact": [...]}`` (``tau_curve`` at every tau)
or ``{"error": "...", "traceback": "..."}``. It ends when its input closes, which is also what
happens when the audit's process ends, however it ends. A plain subprocess rather than
multiprocessing: nothing of the caller's main module is re-imported, so an audit started from
any script, notebook or Streamlit page can use it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from . import config
from .errors import MemauditError
from .records import AuditParams

# The tau grid on which the largest clique is precomputed for live re-thresholding (each run
# adds its own tau, see ``run_taus``); edge_threshold cannot exceed its last value.
TAU_GRID = np.round(np.arange(0.0, config.TAU_MAX + 1e-9, config.TAU_STEP), 4)


def run_taus(params: AuditParams) -> np.ndarray:
    """The taus a run's curves cover: TAU_GRID and the run's own edge threshold."""
    return np.unique(np.append(TAU_GRID, np.float64(params.edge_threshold)))


CURVE_TASKS_PER_WORKER = 4  # fewer tau curves than this per worker process are computed inline
CURVE_MIN_GENERATIONS = 100  # automatic workers only for prompts this large (smaller curves take milliseconds)


def curve_workers(setting: int, tasks: int, generations: int) -> int:
    """Worker processes for ``tasks`` tau curves of prompts of about ``generations`` each.

    ``setting`` is the ``audit_workers`` setting: -1 (automatic) uses one per CPU core, at most 8,
    when the prompts are large enough to pay for starting them; N > 0 uses N; 0 computes inline.
    Never more workers than the tasks keep busy.
    """
    import os

    n = int(setting)
    if n < 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = min(8, cores) if cores > 1 and generations >= CURVE_MIN_GENERATIONS else 0
    return max(0, min(n, tasks // CURVE_TASKS_PER_WORKER))


def tau_curve(dist: np.ndarray, budget: int | None = None, taus: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Largest clique size, its medoid (row of ``dist``), mean distance and exactness at every tau
    of ``taus`` (default TAU_GRID).

    The size is a non-decreasing step function of tau (``clique_curve`` solves each distinct
    graph once, each with its own ``budget``). Within a run of taus of equal size, the maximum
    clique found at the run's first tau stays a clique (raising tau only adds edges) and stays
    maximum, so it is solved once per run and its medoid and mean distance are kept for the whole
    run. ``exact`` is False where a budget stopped a search: the size there is a lower bound.
    """
    from .cliques import clique_curve, clique_groups

    taus = TAU_GRID if taus is None else np.asarray(taus, dtype=np.float64)
    n = len(taus)
    size, medoid, mean = np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(n, np.float32)
    sizes, exact = clique_curve(dist, taus, budget=budget, on_budget="mark")
    answer = (1, 0, 0.0, True)
    for t, tau in enumerate(taus):
        if t == 0 or sizes[t] != sizes[t - 1] or not exact[t]:
            g = clique_groups(dist, float(tau), 1, 1, budget=budget, on_budget="mark")[0]
            answer = (max(g.size, int(sizes[t])), g.medoid, g.mean_distance, bool(exact[t]) and g.exact)
        size[t], medoid[t], mean[t] = answer[:3]
        exact[t] = answer[3]
    return size, medoid, mean, exact


class Curves:
    """The tau curves of every (grid, prompt): computed inline, or by worker processes
    (``python -m core.curves``) beside the audit's main loop, which meanwhile decodes and measures
    the next prompts (pure-Python clique search holds the GIL, so threads would not help).

    Workers read the distance matrix the audit has just saved to the cache; at most two tasks
    per worker are in flight, so memory stays bounded however many prompts. Answers are
    collected in the order the tasks were given, so the result does not depend on timing.
    """

    def __init__(self, shape: tuple[int, int, int], workers: int, budget: int, taus: np.ndarray):
        self.size = np.zeros(shape, dtype=np.int32)
        self.medoid = np.full(shape, -1, dtype=np.int64)
        self.mean = np.zeros(shape, dtype=np.float32)
        self.exact = np.ones(shape, dtype=bool)
        self.budget, self.workers, self.taus = budget, workers, np.asarray(taus, dtype=np.float64)
        self.procs: list = []
        self.pending: list[tuple[int, tuple[int, int, int]]] = []  # (worker, (grid index, prompt index, base)), oldest first
        self.pins: list[tuple[int, int, int, int, object]] = []
        self.next = 0

    def pin(self, gi: int, p: int, t: int, base: int, group) -> None:
        """Put ``group`` (a CliqueGroup of the prompt at row ``base``) at (grid gi, prompt p, tau t), after the curve."""
        self.pins.append((gi, p, t, base, group))

    def _start(self) -> None:
        import os
        import subprocess
        import sys

        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.procs = [subprocess.Popen([sys.executable, "-m", "core.curves"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env) for _ in range(self.workers)]

    def add(self, gi: int, p: int, base: int, dist: np.ndarray, path: Path) -> None:
        if self.workers == 0:
            self.put(gi, p, base, *tau_curve(dist, self.budget, self.taus))
            return
        if not self.procs:
            self._start()
        w = self.next
        self.next = (self.next + 1) % self.workers
        try:
            self.procs[w].stdin.write(json.dumps({"dist": str(path), "budget": self.budget, "taus": self.taus.tolist()}) + "\n")
            self.procs[w].stdin.flush()
        except BrokenPipeError:
            self._died(w)
        self.pending.append((w, (gi, p, base)))
        while len(self.pending) > 2 * self.workers:
            self._collect()

    def finish(self) -> None:
        while self.pending:
            self._collect()
        self.close()
        for gi, p, t, base, g in self.pins:
            self.size[gi, p, t], self.medoid[gi, p, t], self.mean[gi, p, t] = g.size, base + g.medoid, g.mean_distance
            self.exact[gi, p, t] = g.exact

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except Exception:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        self.procs = []

    def _died(self, w: int) -> None:
        import subprocess

        try:  # its pipe is closed, so it is ending: wait for its exit code rather than race it with poll()
            code = self.procs[w].wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        raise MemauditError(f"a tau-curve worker process ended unexpectedly (exit code {code}); "
                            "set audit_workers to 0 to compute the curves in the audit's own process")

    def _collect(self) -> None:
        w, (gi, p, base) = self.pending.pop(0)
        line = self.procs[w].stdout.readline()
        if not line:
            self._died(w)
        answer = json.loads(line)
        if "error" in answer:  # a bug in the worker: raised here with the worker's own traceback
            raise RuntimeError(f"computing a tau curve failed in a worker process:\n{answer.get('traceback', answer['error'])}")
        self.put(gi, p, base, *(np.asarray(answer[k]) for k in ("size", "medoid", "mean", "exact")))

    def put(self, gi: int, p: int, base: int, size: np.ndarray, medoid: np.ndarray, mean: np.ndarray,
            exact: np.ndarray) -> None:
        """Enter the curve of (grid gi, prompt p) computed elsewhere; ``medoid`` counts from the prompt's first row ``base``."""
        self.size[gi, p], self.medoid[gi, p], self.mean[gi, p], self.exact[gi, p] = size, base + medoid, mean, exact


def main() -> int:
    import traceback

    for line in sys.stdin:
        try:
            task = json.loads(line)
            size, medoid, mean, exact = tau_curve(np.load(task["dist"]), int(task["budget"]), np.asarray(task["taus"]))
            answer = {"size": size.tolist(), "medoid": medoid.tolist(), "mean": mean.tolist(), "exact": exact.tolist()}
        except Exception as e:  # reported to the audit, which raises it there with this traceback
            answer = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
