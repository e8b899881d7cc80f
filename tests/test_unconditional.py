"""The unconditional audit streams: generations are decoded, searched and stored in chunks, and the
result does not depend on the chunk size."""

import csv

import numpy as np
import pytest
from PIL import Image

from core import audit, config, results, runs
from core.importer import import_generations
from core.store import Workspace
from core.training import add_training
from workspaces import planted_files, training_arrays

COPIES = 9
OTHERS = 40


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return mixed_workspace(tmp_path_factory.mktemp("uncond"))


def mixed_workspace(root):
    """The planted training set; 49 unconditional generations (9 noisy copies of training images, 40
    images of noise) beside the planted text prompts."""
    files = planted_files(root / "data")
    ws = Workspace.init(root / "ws")
    add_training(ws, files["train"], captions=files["captions"])
    import_generations(ws, files["manifest"])
    train = list(training_arrays().values())
    rng = np.random.default_rng(3)
    gdir = root / "uncond"
    gdir.mkdir()
    with open(gdir / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "prompt"])
        for i in range(COPIES + OTHERS):
            if i < COPIES:
                a = np.clip(train[i % len(train)] + rng.normal(0, 3, train[0].shape), 0, 255)
            else:
                a = rng.integers(0, 255, train[0].shape)
            Image.fromarray(a.astype(np.uint8)).save(gdir / f"u{i:03d}.png")
            w.writerow([f"u{i:03d}.png", ""])
    import_generations(ws, gdir / "m.csv")
    return ws


def cache_arrays(ws, run_id):
    d = runs.cache_dir(ws, run_id)
    return {p.name: np.load(p) for p in sorted(d.rglob("*.npy"))}  # prompts' matrices in p<id // 1000>/


def stored(ws, run_id):
    return [(c.prompt, c.medoid_generation_id, c.nearest_training_id, c.l2, c.tiled_l2, c.relative_l2, c.extracted,
             c.nearest_certified, c.nearest_lower, c.members) for c in results.candidates(ws, run_id, with_members=True)]


def test_chunked_audit_equals_the_audit_of_one_chunk_and_decodes_at_most_a_chunk(mixed, monkeypatch):
    ws = mixed
    size = 64
    whole = audit.run_audit(ws, audit.params_from(ws, relative_n=5, working_size=size))
    decoded = []
    real_decode = audit._decode

    def counting(ws_, paths, size_, workers=4):
        decoded.append(len(paths))
        return real_decode(ws_, paths, size_, workers)

    monkeypatch.setattr(config, "AUDIT_CHUNK_BYTES", 7 * size * size * 3 * 4)
    monkeypatch.setattr(audit, "_decode", counting)
    chunked = audit.run_audit(ws, audit.params_from(ws, relative_n=5, working_size=size))
    # unconditional generations came 7 at a time (the text prompts' are decoded whole, as their cliques need)
    plan, _ = audit.plan(ws)
    uncond = next(p for p in plan if p.unconditional)
    assert uncond.count == COPIES + OTHERS
    text_sizes = sorted(p.count for p in plan if not p.unconditional)
    assert sorted(decoded) == sorted(text_sizes + [7] * 7)

    a, b = cache_arrays(ws, whole), cache_arrays(ws, chunked)
    assert a.keys() == b.keys() and "nn_rel.npy" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert stored(ws, whole) == stored(ws, chunked)
    assert results.count_summary(ws, whole) | {"run_id": 0} == results.count_summary(ws, chunked) | {"run_id": 0}
    copies = [c for c in results.candidates(ws, chunked) if c.prompt is None and c.extracted]
    assert len(copies) == COPIES


def test_an_interrupted_unconditional_audit_leaves_no_run_and_no_cache(mixed, monkeypatch):
    ws = mixed
    before = [r.id for r in runs.list_runs(ws)]
    folders = sorted(p.name for p in (ws.root / "cache").iterdir())
    calls = []
    real = audit.AuditContext.audit_chunk

    def interrupted(self, chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, chunk)

    monkeypatch.setattr(config, "AUDIT_CHUNK_BYTES", 7 * 64 * 64 * 3 * 4)
    monkeypatch.setattr(audit.AuditContext, "audit_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        audit.run_audit(ws, audit.params_from(ws, relative_n=5, working_size=64))
    assert [r.id for r in runs.list_runs(ws)] == before
    with ws.connect() as con:
        assert con.execute("SELECT COUNT(*) FROM audit_runs WHERE status != 'done'").fetchone()[0] == 0
    assert sorted(p.name for p in (ws.root / "cache").iterdir()) == folders


def test_progress_counts_generations(mixed):
    ws = mixed
    seen = []
    audit.run_audit(ws, audit.params_from(ws, relative_n=5, working_size=64), progress=lambda s, d, t: seen.append((d, t)))
    total = ws.counts()["generations"]
    assert seen[-1] == (total, total)
    assert all(t == total for _, t in seen) and [d for d, _ in seen] == sorted(d for d, _ in seen)
