"""Run every benchmark: each ``benchmarks/bench_*.py`` module's ``main(smoke)``, in name order.

    python -m benchmarks.run_all [--smoke] [--only NAME ...]

A benchmark that fails is reported and the others still run; the exit status is
1 if any failed. Results go to benchmarks/out/ (see common.py).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))


def modules() -> list[str]:
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: every benchmark in seconds")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (bench_NAME.py or NAME)")
    args = parser.parse_args(argv)
    names = modules()
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        unknown = wanted - set(names)
        if unknown:
            parser.error(f"no such benchmark: {', '.join(sorted(unknown))}; known: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    failed: list[str] = []
    for name in names:
        print(f"=== {name}{' (smoke)' if args.smoke else ''}", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            params = list(inspect.signature(module.main).parameters)
            if params[:1] != ["smoke"]:
                raise TypeError(f"benchmarks/{name}.py: main takes {params}, not (smoke: bool) (see benchmarks/common.py)")
            module.main(args.smoke)
        except Exception:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - start:.1f} s{' FAILED' if name in failed else ''}\n", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    print(f"all {len(names)} benchmarks ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
