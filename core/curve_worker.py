"""A worker process for the audit's tau curves (``python -m core.curve_worker``).

Reads one task per line on standard input, a JSON object ``{"dist": PATH, "budget": N}``
naming a distance matrix the audit saved (``.npy``), and answers one JSON line per task:
``{"size": [...], "medoid": [...], "mean": [...], "warnings": [...]}`` (``core.audit.tau_curve``
at every tau of TAU_GRID) or ``{"error": "..."}``. It ends when its input closes, which
is also what happens when the audit's process ends, however it ends.

A plain subprocess rather than multiprocessing: nothing of the caller's main module is
re-imported, so an audit started from any script, notebook or Streamlit page can use it.
"""

from __future__ import annotations

import json
import sys
import warnings


def main() -> int:
    import numpy as np

    from core.audit import tau_curve

    for line in sys.stdin:
        try:
            task = json.loads(line)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                size, medoid, mean = tau_curve(np.load(task["dist"]), int(task["budget"]))
            answer = {"size": size.tolist(), "medoid": medoid.tolist(), "mean": mean.tolist(),
                      "warnings": [str(w.message) for w in caught]}
        except Exception as e:  # reported to the audit, which raises it there
            answer = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
