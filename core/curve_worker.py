"""A worker process for the audit's tau curves (``python -m core.curve_worker``).

Reads one task per line on standard input, a JSON object ``{"dist": PATH, "budget": N, "taus": [...]}``
naming a distance matrix the audit saved (``.npy``) and the taus of the run's curve, and answers
one JSON line per task: ``{"size": [...], "medoid": [...], "mean": [...], "exact": [...]}``
(``core.audit.tau_curve`` at every tau) or ``{"error": "..."}``. It ends when its input closes, which
is also what happens when the audit's process ends, however it ends.

A plain subprocess rather than multiprocessing: nothing of the caller's main module is
re-imported, so an audit started from any script, notebook or Streamlit page can use it.
"""

from __future__ import annotations

import json
import sys
import traceback


def main() -> int:
    import numpy as np

    from core.audit import tau_curve

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
