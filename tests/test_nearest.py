"""Certified nearest training images (core.nearest) against brute force, on training sets built to
defeat an embedding top-k: templated look-alikes that pooling ranks above the true copy."""

from __future__ import annotations

import numpy as np
import pytest

from core import audit, results, rethreshold
from core.images import load_working
from core.importer import import_generations
from core.nearest import FINE, TrainingPyramid, certified_nearest, pool
from core.store import Workspace
from core.training import add_training
from workspaces import templated_files


def _brute(queries: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Exact normalised L2 of every (query, training image) pair, float64."""
    q = queries.reshape(len(queries), -1).astype(np.float64)
    t = train.reshape(len(train), -1).astype(np.float64)
    return np.sqrt(((q[:, None, :] - t[None, :, :]) ** 2).mean(axis=2))


@pytest.mark.parametrize("size,side", [(64, 16), (64, 4), (30, 16), (20, 4), (17, 16), (8, 16)])
def test_pooled_distance_never_exceeds_the_exact_one(size, side):
    rng = np.random.default_rng(size * side)
    a = rng.random((40, size, size, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, rng.uniform(0.001, 0.3, (40, 1, 1, 1)), a.shape), 0, 1).astype(np.float32)
    exact = np.sqrt(((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3)))
    pooled = np.linalg.norm(pool(a, side) - pool(b, side), axis=1)
    assert (pooled <= exact + 1e-12).all()
    assert pooled.max() > 0  # a bound, not zero


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    root = tmp_path_factory.mktemp("templated")
    files = templated_files(root / "data")
    ws = Workspace.init(root / "ws")
    add_training(ws, files["train"], captions=files["captions"])
    import_generations(ws, files["manifest"])
    return ws, files


def _arrays(ws: Workspace, size: int = 64):
    rows = results.get_training(ws)
    ids = np.array(sorted(rows))
    train = np.stack([load_working(ws.resolve(rows[i].path), size) for i in ids])
    prompts, last = audit.plan(ws)
    gens = [g for p in prompts for chunk in audit.generation_rows(ws, p.prompt_id, last) for g in chunk]
    queries = np.stack([load_working(ws.resolve(path), size) for _, path in gens])
    return rows, ids, train, gens, queries


def test_certified_nearest_is_the_brute_force_nearest_where_pooling_ranks_it_low(templated):
    ws, files = templated
    rows, ids, train, gens, queries = _arrays(ws)
    exact = _brute(queries, train)
    pyramid = TrainingPyramid.load(ws, 64, {i: rows[i].path for i in ids})
    # the case is real: by pooled pixels (the fine level of the bound) the true copy ranks below its look-alikes
    pooled = np.linalg.norm(pool(queries, FINE)[:, None, :] - pool(train, FINE)[None, :, :], axis=2)
    true_rows = exact.argmin(axis=1)
    pooled_rank = (pooled < pooled[np.arange(len(queries)), true_rows][:, None]).sum(axis=1)
    assert pooled_rank.min() >= 10, "a top-10 by pooled pixels would find the copy; the case tests nothing"

    near = certified_nearest(queries, pyramid, 1, show=10, budget=10_000)
    assert near.certified.all()
    assert (near.ids[:, 0] == ids[true_rows]).all()
    assert np.allclose(near.l2[:, 0], exact.min(axis=1), atol=1e-6)
    names = {rows[int(i)].source_path.rsplit("/", 1)[-1] for i in near.ids[:, 0]}
    assert names == set(files["truth"].values())
    # the shown neighbours are exact distances, ascending, and the pooled column is a lower bound of each
    assert (np.diff(near.l2, axis=1) >= 0).all()
    assert (near.pooled <= near.l2 + 1e-6).all()
    # it needed more than the top 10, and far fewer than every image
    assert near.exact_count.min() > 10
    assert near.exact_count.max() < len(ids)


def test_k_nearest_are_certified_too(templated):
    ws, _ = templated
    rows, ids, train, gens, queries = _arrays(ws)
    queries = queries[::12]  # one generation a prompt
    exact = np.sort(_brute(queries, train), axis=1)
    pyramid = TrainingPyramid.load(ws, 64, {i: rows[i].path for i in ids})
    near = certified_nearest(queries, pyramid, 30, budget=10_000)
    assert near.certified.all()
    assert np.allclose(near.l2[:, :30], exact[:, :30], atol=1e-6)
    assert np.allclose(near.lower, near.l2[:, 29])


def test_shown_neighbours_are_measured_when_the_nearest_is_settled_early():
    """On images without look-alikes the bound settles the nearest after a few exact distances; the
    ``show`` neighbours are measured all the same, exactly and in order."""
    from benchmarks.bench_nearest import SIZE, build

    train, queries, truth = build("natural", 3000, 12)
    pyramid = TrainingPyramid.from_loader(SIZE, np.arange(100, 3100), lambda ids: train[np.asarray(ids) - 100] / 255.0)
    near = certified_nearest(queries, pyramid, 1, show=10)
    assert near.certified.all() and np.isfinite(near.l2).all()
    assert (near.ids[:, 0] == truth + 100).all()
    assert (np.diff(near.l2, axis=1) >= 0).all() and (near.exact_count >= 10).all()
    assert near.exact_count.max() < 60  # the bound did the work: far fewer than 3,000 distances each


def test_a_search_stopped_by_its_budget_says_so_with_a_true_lower_bound(templated):
    ws, _ = templated
    rows, ids, train, gens, queries = _arrays(ws)
    exact = _brute(queries, train).min(axis=1)
    pyramid = TrainingPyramid.load(ws, 64, {i: rows[i].path for i in ids})
    near = certified_nearest(queries, pyramid, 1, budget=9)
    assert not near.certified.any()  # 20 look-alikes come first by every bound: 9 distances cannot settle it
    assert (near.exact_count <= 9).all()
    assert (near.lower <= exact + 1e-6).all()  # the bound holds
    assert (near.l2[:, 0] >= exact - 1e-6).all()  # and the answer is an upper bound of the truth


def test_pooled_cache_follows_the_training_set(templated, tmp_path):
    ws, files = templated
    rows = results.get_training(ws)
    paths = {i: rows[i].path for i in rows}
    first = TrainingPyramid.load(ws, 32, paths)
    cache = ws.root / "index" / "pooled-32.npz"
    assert cache.is_file()
    again = TrainingPyramid.load(ws, 32, paths)
    assert np.array_equal(first.fine, again.fine) and np.array_equal(first.ids, again.ids)
    # fewer images (as if some were removed): rows follow the ids, values unchanged
    some = {i: p for i, p in list(paths.items())[::3]}
    fewer = TrainingPyramid.load(ws, 32, some)
    keep = np.isin(first.ids, fewer.ids)
    assert np.array_equal(fewer.fine, first.fine[keep])
    # a corrupt cache is rebuilt, not trusted
    cache.write_bytes(b"not an npz")
    rebuilt = TrainingPyramid.load(ws, 32, paths)
    assert np.array_equal(rebuilt.coarse, first.coarse)


def test_audit_extracts_every_templated_copy_and_stores_certification(templated):
    ws, files = templated
    run_id = audit.run_audit(ws, audit.params_from(ws, grid_choices=""))
    cands = [c for c in results.candidates(ws, run_id) if c.group_rank == 0]
    assert len(cands) == 12
    assert all(c.flagged and c.extracted for c in cands), [(c.prompt, c.l2) for c in cands if not c.extracted]
    assert all(c.nearest_certified and c.clique_exact for c in cands)
    assert all(c.nearest_training_path and c.l2 < 0.08 for c in cands)
    train = results.get_training(ws)
    for c in cands:
        assert train[c.nearest_training_id].source_path.endswith(files["truth"][c.prompt])
        assert c.exact_distances > 10 and c.nearest_lower == pytest.approx(c.l2)
    summary = results.count_summary(ws, run_id)
    assert summary["extracted_candidates"] >= 12
    rc = rethreshold.RunCache(ws, run_id)
    r = rc.recount(0.1, 10, 0.15)
    assert (r.flagged, r.extracted, r.uncertain, r.clique_bounds) == (12, 12, 0, 0)


def _detailed(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    """Images that differ mostly in detail pooling averages away: a smooth 5 x 5 layout upsampled,
    plus noise that sums to zero over every 2 x 2 block."""
    coarse = rng.random((n, 5, 5, 3))
    idx = np.minimum((np.arange(size) * 5) // size, 4)
    layout = 0.3 + 0.4 * coarse[:, idx][:, :, idx]
    noise = rng.normal(0, 0.15, (n, size // 2, 2, size // 2, 2, 3))
    detail = (noise - noise.mean(axis=(2, 4), keepdims=True)).reshape(n, size, size, 3)
    return np.clip(layout + detail, 0, 1).astype(np.float32)


def test_the_dense_level_certifies_what_the_pooled_bounds_cannot(monkeypatch):
    """Generations that copy nothing: pooled bounds cannot separate their 5 nearest from the rest
    within a budget; the dense level certifies them with a few exact distances, equal to brute force."""
    import core.nearest as nearest

    rng = np.random.default_rng(0)
    train = _detailed(rng, 3000)
    queries = _detailed(rng, 24)
    queries[:4] = np.clip(train[:4] + rng.normal(0, 0.01, train[:4].shape), 0, 1)  # and a few copies
    d = np.sqrt(((queries[:, None].reshape(24, 1, -1) - train.reshape(1, 3000, -1)) ** 2).mean(axis=2))
    truth = np.sort(d, axis=1)[:, :5]
    pyramid = TrainingPyramid.from_loader(32, np.arange(3000), lambda ids: train[np.asarray(ids)])

    monkeypatch.setattr(nearest, "DENSE_BYTES", 0)
    pooled_only = certified_nearest(queries, pyramid, 5, show=5, budget=400)
    assert not pooled_only.certified[4:].any()  # out of budget: not certified
    monkeypatch.undo()

    pyramid = TrainingPyramid.from_loader(32, np.arange(3000), lambda ids: train[np.asarray(ids)])
    near = certified_nearest(queries, pyramid, 5, show=5, budget=400)
    assert near.certified.all()
    np.testing.assert_allclose(near.l2, truth, atol=1e-5)
    assert (near.ids[:4, 0] == np.arange(4)).all()
    assert near.exact_count.max() < 100  # about the 5 nearest, a few more within the bound's rounding margin
