"""Background jobs for the dashboard: a worker thread with progress, ETA and cancel.

A job runs ``work(progress, should_stop)`` in a daemon thread; ``progress(done, total)`` and
``should_stop()`` are the callbacks core's long functions take (core.generate.generate). The
page polls ``status()`` and renders it; nothing here touches Streamlit, so one registry can be
shared by every session of the server (it is kept with ``st.cache_resource``): a workspace
runs at most one job of a kind at a time, whichever browser tab started it.

ETA: the rate is measured from the first progress report (work skipped on resume is reported
at once and must not count as speed): rate = (done - done_first) / (now - t_first), and
eta = (total - done) / rate once rate > 0.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from core.errors import MemauditError

Work = Callable[[Callable[[int, int], None], Callable[[], bool]], Any]


@dataclass(frozen=True)
class JobStatus:
    name: str
    state: str            # running | stopping | done | cancelled | failed
    done: int
    total: int
    elapsed: float        # seconds since start (until the end once finished)
    eta: float | None     # seconds left, None until measurable
    result: Any = None
    error: str | None = None       # one sentence for a MemauditError, else the exception's repr
    traceback: str | None = None   # only for unexpected errors (bugs)

    @property
    def running(self) -> bool:
        return self.state in ("running", "stopping")

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


class Job:
    def __init__(self, name: str, work: Work, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self._work = work
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._state = "running"
        self._done = self._total = 0
        self._first: tuple[float, int] | None = None
        self._started = clock()
        self._ended: float | None = None
        self._result: Any = None
        self._error: str | None = None
        self._traceback: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"memaudit-{name}", daemon=True)

    def start(self) -> "Job":
        self._thread.start()
        return self

    def _progress(self, done: int, total: int) -> None:
        with self._lock:
            self._done, self._total = int(done), int(total)
            if self._first is None:
                self._first = (self._clock(), int(done))

    def _should_stop(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        try:
            result = self._work(self._progress, self._should_stop)
            with self._lock:
                self._result = result
                self._state = "cancelled" if self._stop.is_set() else "done"
        except MemauditError as e:
            with self._lock:
                self._state, self._error = "failed", str(e)
        except BaseException as e:  # a bug: keep the traceback for the page to show
            with self._lock:
                self._state, self._error, self._traceback = "failed", repr(e), traceback.format_exc()
        finally:
            with self._lock:
                self._ended = self._clock()

    def cancel(self) -> None:
        """Ask the work to stop before its next batch (what is written stays; a rerun resumes)."""
        self._stop.set()
        with self._lock:
            if self._state == "running":
                self._state = "stopping"

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def status(self) -> JobStatus:
        with self._lock:
            now = self._ended if self._ended is not None else self._clock()
            eta = None
            if self._first is not None and self._ended is None:
                t0, d0 = self._first
                if now > t0 and self._done > d0:
                    rate = (self._done - d0) / (now - t0)
                    eta = max(0.0, (self._total - self._done) / rate)
            return JobStatus(self.name, self._state, self._done, self._total, now - self._started, eta,
                             self._result, self._error, self._traceback)


class JobRegistry:
    """At most one job per key (for example (workspace, "generate")); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[Any, Job] = {}

    def get(self, key: Any) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def start(self, key: Any, name: str, work: Work) -> Job:
        """Start ``work`` under ``key``; refuses (MemauditError) while a job with that key is still running."""
        with self._lock:
            old = self._jobs.get(key)
            if old is not None and old.status().running:
                raise MemauditError(f"a {old.name} job is already running on this workspace; wait for it or cancel it")
            job = Job(name, work)
            self._jobs[key] = job
        return job.start()

    def forget(self, key: Any) -> None:
        """Drop a finished job (so its result is no longer shown)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not job.status().running:
                del self._jobs[key]
