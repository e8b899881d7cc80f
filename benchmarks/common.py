"""Shared helpers for the benchmarks: timing, machine description, tables, JSON output.

The shape of a benchmark module
-------------------------------
Every ``benchmarks/bench_<name>.py`` defines

    def main(smoke: bool = False) -> object

which runs the benchmark (``smoke=True``: tiny sizes, a few seconds, for CI and
for checking that the script still works), prints a table, writes its results
as JSON to ``benchmarks/out/bench_<name>.json`` (``bench_<name>_smoke.json``
for a smoke run; ``write_json`` below does both, with the machine description),
and returns what it wrote. It runs alone as ``python -m benchmarks.bench_<name>
[--smoke]`` (``cli(main)`` parses the flag), and ``python -m benchmarks.run_all
[--smoke]`` runs every such module in turn. Figures worth keeping go into
``benchmarks/RESULTS.md`` by hand, with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, memory, library versions, threads, GPU, load."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    import numpy as np

    info["numpy"] = np.__version__
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def timeit(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> dict[str, float]:
    """Wall-clock seconds of ``fn()``: best and median of ``repeat`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"best_s": min(times), "median_s": statistics.median(times), "runs": len(times)}


def rss_mb() -> float:
    """Resident memory now (MB), from /proc; 0 where unavailable."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux) so that ``peak_rss_mb`` measures from now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory (MB) since the process started or ``reset_peak_rss``."""
    return _status_mb("VmHWM")


def _status_mb(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
        return f"{value:.2e}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    if title:
        print(title)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print()


def write_json(name: str, smoke: bool, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with the machine description to benchmarks/out/bench_<name>[_smoke].json."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"bench_{name}{'_smoke' if smoke else ''}.json"
    body = {"benchmark": name, "smoke": smoke, "machine": machine(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload}
    path.write_text(json.dumps(body, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return path


def cli(main: Callable[[bool], Any], description: str | None = None) -> None:
    """``python -m benchmarks.bench_<name> [--smoke]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args()
    main(args.smoke)
