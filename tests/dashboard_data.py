"""An audited, labelled workspace shared by the dashboard, report and browser tests.

Built once per test process through core: the planted data of ``workspaces.py`` (real
scikit-image photographs imported as generations, real training images) plus three prompts
whose cliques are *not* exact copies, so that review and calibration see both classes:

    prompt               generations                                   truth
    "a mirrored astronaut"  10 noisy copies of the astronaut, mirrored  flagged, far in L2: a near copy
    "a clock"            5 noisy copies of a clock (not in training)   a clique, not memorised
    "a colour wheel"     4 noisy copies of a colour wheel (not in training)  a clique, not memorised

then audited and labelled by two reviewers (alice by the truth above; bob agrees except
"not_memorized" on the mirrored astronaut and "unsure" on the last candidate).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_BUILT: dict[str, tuple] = {}
EXTRA_PROMPTS = {"a mirrored astronaut": "near_copy", "a clock": "not_memorized", "a colour wheel": "not_memorized"}


def _extra_manifest(root: Path, seed: int = 1) -> Path:
    from skimage import data

    from workspaces import _noisy, _square

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    sources = {"a mirrored astronaut": (_square(data.astronaut())[:, ::-1], 10),
               "a clock": (_square(data.clock()), 5),
               "a colour wheel": (_square(data.colorwheel()), 4)}
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "prompt", "seed"])
        for p, (prompt, (img, n)) in enumerate(sources.items()):
            for j in range(n):
                name = f"extra{p}-{j}.png"
                Image.fromarray(_noisy(np.ascontiguousarray(img), rng)).save(root / name)
                w.writerow([name, prompt, j])
    return manifest


def truth_of(candidate) -> str:
    """What a careful reviewer says of a candidate, by the way its prompt's images were made."""
    from workspaces import FLAGGED

    if candidate.prompt in EXTRA_PROMPTS:
        return EXTRA_PROMPTS[candidate.prompt]
    return "exact_copy" if candidate.prompt in FLAGGED or candidate.prompt == "six copies" else "not_memorized"


def audited_workspace(root: Path, snapshot: Path | None = None):
    """(ws, run_id): planted and extra generations imported and audited, no labels.

    With ``snapshot``, a copy of the workspace as it was before the audit is left there."""
    from core.audit import run_audit
    from core.importer import import_generations
    from workspaces import planted_workspace

    ws, _ = planted_workspace(root, audit=False)
    import_generations(ws, _extra_manifest(root / "extra"))
    if snapshot is not None:
        shutil.copytree(ws.root, snapshot)
    return ws, run_audit(ws)


def labelled_workspace(tmp_path_factory: pytest.TempPathFactory):
    """The shared labelled workspace, read-only: tests that write use ``labelled_copy``."""
    if "ws" not in _BUILT:
        from core import labels, results
        from core.store import Workspace

        ingested = tmp_path_factory.mktemp("ingested") / "ws"
        ws, run_id = audited_workspace(tmp_path_factory.mktemp("dashboard"), snapshot=ingested)
        _BUILT["ingested"] = (ingested,)
        copy = tmp_path_factory.mktemp("unlabelled") / "ws"
        shutil.copytree(ws.root, copy)  # no connection is open: audit.db and its WAL are consistent
        _BUILT["unlabelled"] = (Workspace.open(copy), run_id)
        cands = results.candidates(ws, run_id)
        for i, c in enumerate(cands):
            truth = truth_of(c)
            labels.add_label(ws, c.id, truth, "alice")
            bob = "unsure" if i == len(cands) - 1 else ("not_memorized" if truth == "near_copy" else truth)
            labels.add_label(ws, c.id, bob, "bob")
        _BUILT["ws"] = (ws, run_id)
    return _BUILT["ws"]


def labelled_copy(tmp_path_factory: pytest.TempPathFactory, name: str):
    """A private copy of the shared labelled workspace, for tests that write labels or settings."""
    from core.store import Workspace

    ws, run_id = labelled_workspace(tmp_path_factory)
    copy = tmp_path_factory.mktemp(name) / "ws"
    shutil.copytree(ws.root, copy)
    return Workspace.open(copy), run_id


def ingested_copy(tmp_path_factory: pytest.TempPathFactory, name: str):
    """A private copy of the shared workspace before its audit: generations and training images, no run."""
    from core.store import Workspace

    labelled_workspace(tmp_path_factory)
    copy = tmp_path_factory.mktemp(name) / "ws"
    shutil.copytree(_BUILT["ingested"][0], copy)
    return Workspace.open(copy)


def unlabelled_workspace(tmp_path_factory: pytest.TempPathFactory):
    """A copy of the shared workspace as it was before anyone labelled it."""
    labelled_workspace(tmp_path_factory)
    return _BUILT["unlabelled"]


def empty_workspace(root: Path):
    from core.store import Workspace

    return Workspace.init(root)
