"""The training index on real faiss and a real workspace: exactness, IVF re-ranking, incremental adds, repair."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.embed import embedder_params
from core.errors import ModelError
from core.index import TrainingIndex, choose_nlist, choose_pq_m, write_npy_atomic
from core.store import Workspace, now

PIXEL = 4  # pixel_size 4: the pixel index holds 48-dimensional vectors
DIM = 3 * PIXEL * PIXEL


def workspace(tmp_path: Path, **settings) -> Workspace:
    ws = Workspace.init(tmp_path / "ws")
    ws.set_setting("pixel_size", PIXEL)
    for name, value in settings.items():
        ws.set_setting(name, value)
    return ws


def insert_rows(ws: Workspace, ids: np.ndarray) -> None:
    """Training rows without image files: enough for an index whose embeddings are given."""
    with ws.transaction() as con:
        con.executemany(
            "INSERT INTO training_images(id, path, source_path, caption, sha256, width, height, added_at) "
            "VALUES (?, ?, ?, NULL, ?, 8, 8, ?)",
            [(int(i), f"training/none/{i}.png", f"/nowhere/{i}.png", f"{i:064x}", now()) for i in ids])


def new_index(ws: Workspace, name: str = "pixel", params: dict | None = None) -> TrainingIndex:
    s = ws.settings()
    return TrainingIndex(ws, name, params or embedder_params("pixel", s), exact_max=s["index_exact_max"], nprobe=16)


def clustered(rng: np.random.Generator, n: int, dim: int = DIM, clusters: int = 40, spread: float = 0.3,
              rank: int | None = None) -> np.ndarray:
    """Gaussian clusters; with ``rank``, each cluster spreads in its own rank-r subspace (as real embeddings do)
    plus a little isotropic noise."""
    local = np.random.default_rng(1234)  # the same clusters on every call
    centres = local.normal(size=(clusters, dim))
    label = rng.integers(0, clusters, n)
    if rank is None:
        return (centres[label] + spread * rng.normal(size=(n, dim))).astype(np.float32)
    bases = local.normal(size=(clusters, rank, dim)) / np.sqrt(rank)
    within = np.einsum("nr,nrd->nd", rng.normal(size=(n, rank)), bases[label])
    return (centres[label] + 3 * spread * within + 0.1 * spread * rng.normal(size=(n, dim))).astype(np.float32)


def numpy_knn(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int, metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64 brute force, ties to the smaller id."""
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "l2":
        scores = np.sqrt(((q64[:, None, :] - x64[None, :, :]) ** 2).sum(axis=2))
        key = scores
    else:
        scores = q64 @ x64.T
        key = -scores
    order = np.lexsort((np.broadcast_to(ids, key.shape), key), axis=-1)[:, :k]
    return ids[order], np.take_along_axis(scores, order, 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------- exact search

def test_exact_l2_search_equals_numpy_brute_force(tmp_path: Path, rng: np.random.Generator):
    ws = workspace(tmp_path)
    ids = np.sort(rng.choice(np.arange(1, 100_000), size=600, replace=False)).astype(np.int64)
    insert_rows(ws, ids)
    x = clustered(rng, len(ids))
    x[10] = x[11]  # an exact tie, broken by the smaller id
    new_index(ws).add(ids, x)

    index = TrainingIndex.open(ws, "pixel")
    assert (index.kind, index.count, index.messages) == ("flat", 600, [])
    q = np.concatenate([clustered(rng, 40), x[:10]])
    for k in (1, 10, 37):
        got_ids, got = index.search(q, k)
        want_ids, want = numpy_knn(ids, x, q, k)
        assert got_ids.dtype == np.int64 and got.dtype == np.float32 and got_ids.shape == (50, k)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got_ids, got = index.search(x[10:11], 2)
    assert got_ids[0].tolist() == [ids[10], ids[11]] and got[0].tolist() == [0.0, 0.0]
    np.testing.assert_array_equal(index.brute_force(q, 10)[0], numpy_knn(ids, x, q, 10)[0])


def test_exact_cosine_search_equals_numpy_brute_force(tmp_path: Path, rng: np.random.Generator):
    ws = workspace(tmp_path)
    ids = np.arange(1, 301, dtype=np.int64)
    x = clustered(rng, 300, dim=32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = new_index(ws, "clip", {"clip_model": "test", "clip_pretrained": "none"})
    index.add(ids, x)
    assert index.metric == "cosine"
    q = clustered(rng, 20, dim=32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    got_ids, got = index.search(q, 10)
    want_ids, want = numpy_knn(ids, x, q, 10, "cosine")
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (np.diff(got, axis=1) <= 0).all()  # similarities, best first


def test_k_is_clipped_and_bad_queries_are_refused(tmp_path: Path, rng: np.random.Generator):
    ws = workspace(tmp_path)
    empty = TrainingIndex.open(ws, "pixel")
    ids, scores = empty.search(np.zeros((3, DIM), np.float32), 5)
    assert ids.shape == (3, 0) and scores.shape == (3, 0)

    insert_rows(ws, np.arange(1, 21))
    index = new_index(ws)
    index.add(np.arange(1, 21), clustered(rng, 20))
    ids, scores = index.search(clustered(rng, 4), 1000)
    assert ids.shape == (4, 20) and sorted(ids[0].tolist()) == list(range(1, 21))
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.search(clustered(rng, 1), 0)
    with pytest.raises(ValueError, match=r"shape \(N, 48\)"):
        index.search(np.zeros((2, 7), np.float32), 3)
    bad = clustered(rng, 2)
    bad[1, 3] = np.nan
    with pytest.raises(ModelError, match="NaN or inf"):
        index.search(bad, 3)


def test_non_finite_embeddings_are_never_indexed(tmp_path: Path, rng: np.random.Generator):
    ws = workspace(tmp_path)
    insert_rows(ws, np.arange(1, 11))
    index = new_index(ws)
    index.add(np.arange(1, 6), clustered(rng, 5))
    bad = clustered(rng, 5)
    bad[2, 0] = np.inf
    with pytest.raises(ModelError, match="1 of 5"):
        index.add(np.arange(6, 11), bad)
    assert index.count == 5 and np.load(index.ids_path).tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="already in the pixel index"):
        index.add(np.array([3]), clustered(rng, 1))


# ---------------------------------------------------------------------------- IVF

def test_choose_pq_m():
    assert [choose_pq_m(d) for d in (512, 768, 48, 75, 7)] == [256, 384, 24, 25, 1]


def test_choose_nlist():
    assert choose_nlist(1) == 1
    assert choose_nlist(390) == 10  # at least 39 training points per list
    assert choose_nlist(4000) == 63
    assert choose_nlist(1_000_000) == 1000


def test_ivf_with_exact_reranking_has_high_recall_and_exact_scores(tmp_path: Path, rng: np.random.Generator):
    ws = workspace(tmp_path, index_exact_max=500)
    ids = np.arange(1, 4001, dtype=np.int64)
    insert_rows(ws, ids)
    x = clustered(rng, 4000, rank=8)
    new_index(ws).add(ids, x)

    index = TrainingIndex.open(ws, "pixel")
    assert index.kind == "ivf" and index.meta["nlist"] == 63 and index.messages == []
    q = clustered(rng, 200, rank=8)
    got_ids, got = index.search(q, 10)
    want_ids, want = numpy_knn(ids, x, q, 10)
    assert recall(got_ids, want_ids) >= 0.97
    # re-ranked scores are the exact distances of the ids returned, ascending
    exact = np.sqrt(((x[got_ids - 1].astype(np.float64) - q[:, None, :]) ** 2).sum(axis=2))
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6)
    assert (np.diff(got, axis=1) >= 0).all()
    # without re-ranking the 8-bit codes give approximate distances
    import faiss

    raw, _ = index._index.search(q, 10)
    assert not np.allclose(np.sqrt(np.maximum(raw, 0)), want, atol=1e-4)
    # a stored vector finds itself at distance 0
    self_ids, self_d = index.search(x[[5, 500, 3999]], 1)
    assert self_ids[:, 0].tolist() == [6, 501, 4000] and self_d[:, 0].tolist() == [0.0, 0.0, 0.0]
    # a single probe still answers k results for every query (short lists fall back to exact search)
    index.set_nprobe(1)
    assert faiss.extract_index_ivf(index._index).nprobe == 1
    ids1, _ = index.search(q[:20], 200)
    assert (ids1 > 0).all()


# ---------------------------------------------------------------------------- incremental adds

def test_adds_append_and_switch_from_exact_to_ivf(tmp_path: Path, rng: np.random.Generator):
    ws = workspace(tmp_path, index_exact_max=1000)
    x = clustered(rng, 6000)
    insert_rows(ws, np.arange(1, 6001))
    index = new_index(ws)
    index.add(np.arange(1, 801), x[:800])
    assert index.kind == "flat" and index._index.ntotal == 800

    index.add(np.arange(801, 951), x[800:950])  # still exact: appended
    assert index.kind == "flat" and index._index.ntotal == 950
    assert np.load(index.ids_path).tolist() == list(range(1, 951))
    assert index.search(x[940:941], 1)[0][0, 0] == 941

    index.add(np.arange(951, 1201), x[950:1200])  # crosses index_exact_max: rebuilt as IVF
    assert index.kind == "ivf" and index.meta["trained_count"] == 1200 and index._index.ntotal == 1200
    index.add(np.arange(1201, 4801), x[1200:4800])  # grown to 4x: appended, not retrained
    assert index.meta["trained_count"] == 1200 and index._index.ntotal == 4800
    index.add(np.arange(4801, 6001), x[4800:])  # past 4x the trained size: retrained
    assert index.meta["trained_count"] == 6000 and index.meta["nlist"] == choose_nlist(6000)

    again = TrainingIndex.open(ws, "pixel")
    assert again.messages == [] and again.kind == "ivf" and again.count == 6000
    np.testing.assert_array_equal(again.search(x[[0, 700, 5999]], 1)[0][:, 0], [1, 701, 6000])


def test_small_sets_stay_exact_below_the_ivf_minimum(tmp_path: Path, rng: np.random.Generator):
    ws = workspace(tmp_path, index_exact_max=100)
    insert_rows(ws, np.arange(1, 501))
    index = new_index(ws)
    index.add(np.arange(1, 501), clustered(rng, 500))
    assert index.kind == "flat"  # an IVF index needs MIN_IVF vectors to train
    assert TrainingIndex.open(ws, "pixel").messages == []


def test_ids_out_of_order_are_merged(tmp_path: Path, rng: np.random.Generator):
    ws = workspace(tmp_path)
    insert_rows(ws, np.arange(1, 21))
    x = clustered(rng, 20)
    index = new_index(ws)
    index.add(np.arange(11, 21), x[10:])
    index.add(np.arange(1, 11), x[:10])
    assert np.load(index.ids_path).tolist() == list(range(1, 21))
    np.testing.assert_array_equal(np.load(index.vectors_path), x)
    assert index.search(x, 1)[0][:, 0].tolist() == list(range(1, 21))


# ---------------------------------------------------------------------------- persistence and repair

def test_deleted_or_stale_faiss_file_is_rebuilt_with_a_message(tmp_path: Path, rng: np.random.Generator):
    import faiss

    ws = workspace(tmp_path)
    insert_rows(ws, np.arange(1, 101))
    x = clustered(rng, 100)
    new_index(ws).add(np.arange(1, 101), x)
    path = ws.root / "index" / "pixel.faiss"

    path.unlink()
    said: list[str] = []
    index = TrainingIndex.open(ws, "pixel", on_message=said.append)
    assert said == ["the pixel faiss index file is missing; rebuilding it from the stored embeddings"]
    assert path.is_file() and faiss.read_index(str(path)).ntotal == 100
    assert index.search(x[:3], 1)[0][:, 0].tolist() == [1, 2, 3]

    stale = faiss.IndexIDMap(faiss.IndexFlatL2(DIM))
    stale.add_with_ids(x[:60], np.arange(1, 61, dtype=np.int64))
    faiss.write_index(stale, str(path))
    said.clear()
    index = TrainingIndex.open(ws, "pixel", on_message=said.append)
    assert len(said) == 1 and "holds 60 vectors" in said[0]
    assert faiss.read_index(str(path)).ntotal == 100
    assert TrainingIndex.open(ws, "pixel").messages == []

    path.write_bytes(b"garbage")
    assert "cannot be read" in TrainingIndex.open(ws, "pixel").messages[0]


def test_rows_gone_from_the_database_are_dropped(tmp_path: Path, rng: np.random.Generator):
    ws = workspace(tmp_path)
    insert_rows(ws, np.arange(1, 51))
    x = clustered(rng, 50)
    new_index(ws).add(np.arange(1, 51), x)
    with ws.transaction() as con:
        con.execute("DELETE FROM training_images WHERE id IN (7, 8)")
    index = TrainingIndex.open(ws, "pixel")
    assert index.messages == ["2 indexed training images are no longer in the database; rebuilding the pixel index"]
    assert index.count == 48 and 7 not in index.search(x[6:7], 48)[0]
    with ws.connect() as con:
        row = con.execute("SELECT count, max_training_id FROM indexes WHERE embedder = 'pixel'").fetchone()
    assert tuple(row) == (48, 50)
    assert TrainingIndex.open(ws, "pixel").messages == []


def test_writes_are_atomic(tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch):
    import faiss

    ws = workspace(tmp_path)
    insert_rows(ws, np.arange(1, 41))
    x = clustered(rng, 40)
    index = new_index(ws)
    index.add(np.arange(1, 21), x[:20])
    path = ws.root / "index" / "pixel.faiss"
    before = path.read_bytes()

    def killed(idx, name):  # the process dies half-way through writing the temporary file
        Path(name).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        index.add(np.arange(21, 41), x[20:])
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old index, whole
    assert not [p.name for p in (ws.root / "index").iterdir() if p.name.startswith(".tmp-")]

    with pytest.raises(KeyboardInterrupt):
        write_npy_atomic(tmp_path / "v.npy", [x, _Exploding()], np.float32, (DIM,))
    assert not (tmp_path / "v.npy").exists() and not list(tmp_path.glob(".tmp-*"))

    # the embeddings were written before the faiss file: opening completes the index from them
    reopened = TrainingIndex.open(ws, "pixel")
    assert "holds 20 vectors" in reopened.messages[0] and reopened.count == 40
    assert reopened.search(x[30:31], 1)[0][0, 0] == 31


class _Exploding:
    def __len__(self) -> int:
        return 5

    def __getitem__(self, item):
        raise KeyboardInterrupt


# ---------------------------------------------------------------------------- with real images

@pytest.fixture
def photo_ws(tmp_path: Path) -> Workspace:
    from skimage import data

    from core.training import add_training

    folder = tmp_path / "train"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = getattr(data, name)()
        Image.fromarray(img).resize((64, 64)).save(folder / f"{name}.png")
    ws = workspace(tmp_path)
    assert add_training(ws, folder).added == 4
    return ws


def test_missing_embeddings_are_recomputed_from_the_images(photo_ws: Workspace):
    ws = photo_ws
    first = TrainingIndex.open(ws, "pixel")
    vectors = np.array(first.vectors)
    os.unlink(first.vectors_path)
    again = TrainingIndex.open(ws, "pixel")
    assert again.messages == ["the stored pixel embeddings are missing or do not match the database; re-embedding the training images"]
    np.testing.assert_array_equal(np.asarray(again.vectors), vectors)
    assert again.search(vectors, 1)[0][:, 0].tolist() == [1, 2, 3, 4]


def test_changed_embedder_settings_rebuild(photo_ws: Workspace):
    ws = photo_ws
    ws.set_setting("pixel_size", 8)
    index = TrainingIndex.open(ws, "pixel")
    assert index.messages == ["the pixel embedder settings changed (pixel_size 4 -> pixel_size 8); rebuilding the pixel index"]
    assert index.dim == 192 and index.count == 4
    assert TrainingIndex.open(ws, "pixel").messages == []


def test_images_missing_from_the_index_are_added(photo_ws: Workspace):
    """An ingest killed after inserting rows but before updating the index is completed on open."""
    ws = photo_ws
    with ws.connect() as con:
        row = dict(con.execute("SELECT * FROM training_images WHERE id = 2").fetchone())
    with ws.transaction() as con:
        con.execute("INSERT INTO training_images(path, source_path, caption, sha256, width, height, added_at) "
                    "VALUES (?, ?, NULL, ?, ?, ?, ?)",
                    (row["path"], "/elsewhere/coffee.png", row["sha256"], row["width"], row["height"], now()))
    index = TrainingIndex.open(ws, "pixel")
    assert index.messages == ["1 training images are not in the pixel index yet; adding them"]
    ids, d = index.search(np.asarray(index.vectors[1:2]), 2)
    assert ids[0].tolist() == [2, 5] and d[0].tolist() == [0.0, 0.0]
    assert index.search_images([Image.open(ws.resolve(row["path"]))], 1)[0][0, 0] == 2


# ---------------------------------------------------------------------------- pairs within a radius

@pytest.mark.parametrize("exact_max", [10_000, 1000])
def test_pairs_within_radius_match_brute_force(tmp_path: Path, rng: np.random.Generator, exact_max: int):
    ws = workspace(tmp_path, index_exact_max=exact_max)
    x = clustered(rng, 1500, spread=0.3)
    x[100:110] = x[100] + 0.004 * rng.normal(size=(10, DIM))  # planted near copies, about 0.04 apart
    x[300:310] = x[300] + 0.0082 * rng.normal(size=(10, DIM))  # pairs around the radius, about 0.08 apart
    x[500:545] = x[500] + 0.002 * rng.normal(size=(45, DIM))  # a large group: more than 32 neighbours each
    x[200] = x[201]  # an exact copy
    ids = np.arange(1, 1501, dtype=np.int64)
    insert_rows(ws, ids)
    index = new_index(ws)
    index.add(ids, x)
    assert index.kind == ("flat" if exact_max > 1500 else "ivf")
    radius = 0.08
    x64 = x.astype(np.float64)
    sq = (x64 ** 2).sum(axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x64 @ x64.T, 0))
    want = {(int(a) + 1, int(b) + 1) for a, b in zip(*np.nonzero(d <= radius)) if a != b}
    got = set()
    for a, b, dist in index.pairs_within(radius):
        assert (dist <= radius).all()
        got |= set(zip(a.tolist(), b.tolist()))
    assert (201, 202) in got and len(want) >= 44 * 45 + 100
    assert got <= want and len(got) >= 0.95 * len(want)
    assert {(501, j) for j in range(502, 546)} <= got
    if exact_max > 1500:
        assert got == want
    only = {p for a, b, _ in index.pairs_within(radius, np.array([101])) for p in zip(a.tolist(), b.tolist())}
    assert {(101, j) for j in range(102, 111)} <= only and all(p[0] == 101 for p in only)


def test_clip_index_is_built_from_the_workspace_images(photo_ws: Workspace, tmp_path: Path):
    """The clip index through the real open_clip path: a tiny random-weight architecture saved as a checkpoint."""
    import json

    import open_clip
    import torch

    torch.set_num_threads(1)
    name = "memaudit-test-index-clip"
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    ckpt = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(name).state_dict(), ckpt)
    ws = photo_ws
    ws.set_setting("clip_model", name)
    ws.set_setting("clip_pretrained", str(ckpt))

    index = TrainingIndex.open(ws, "clip")
    assert (index.kind, index.count, index.dim, index.metric, index.messages) == ("flat", 4, 16, "cosine", [])
    photos = [Image.open(ws.resolve(t)) for t in ws_paths(ws)]
    ids, sims = index.search_images(photos, 4)
    assert ids[:, 0].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    assert TrainingIndex.open(ws, "clip").messages == []
    os.utime(ckpt, ns=(1, 1))  # the checkpoint changed: its embeddings are stale
    again = TrainingIndex.open(ws, "clip")
    assert len(again.messages) == 1 and again.messages[0].startswith("the clip embedder settings changed")


def ws_paths(ws: Workspace) -> list[str]:
    with ws.connect() as con:
        return [r[0] for r in con.execute("SELECT path FROM training_images ORDER BY id")]
