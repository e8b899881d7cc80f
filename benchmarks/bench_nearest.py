"""Certified nearest training image (``core.nearest``) against the embedding top-k it replaced and
against brute force, on synthetic training sets of 10,000, 100,000 and 1,000,000 images.

Images are 32 x 32 x 3 (the working size), uint8, generated from a seed. Two sets:

* ``templated`` (the adversarial case): groups of 50 images share a layout (a smooth random
  image); one of each group is the original (layout + detail), the 49 others are look-alikes
  (layout + 0.06 + their own detail). Details are high-pass, zero over every 2 x 2 block, so
  pooled to 16 x 16 (the pixel embedder, and the fine bound) every look-alike matches a
  query better than the original does. Queries copy originals with the 0.06 shift and a little
  noise: the true nearest is the original (L2 ~0.06), every look-alike is beyond 0.15.
* ``natural``: every image its own smooth random layout plus detail; queries copy random images.
* ``novel``: the ``natural`` training set, queries that copy nothing (fresh images of the same
  kind): certified with the pooled bounds only, and with the dense level, at k = 1 and k = 50
  (up to 100,000 training images, where the dense level fits in memory).

Methods, on 64 queries (smoke: 16):

* ``brute force`` (the baseline): exact normalised L2 to every training image, float32
  products ``|q|^2 + |t|^2 - 2 q.t`` in blocks, argmin.
* ``top-10 (pixel embedding)``: memaudit's previous audit: exact flat faiss search of the
  16 x 16 pooled pixels (the ``pixel`` embedder) for the 10 nearest, then exact distances to
  those 10; recall = share of queries whose true nearest is among them.
* ``certified``: ``certified_nearest(k=1, show=10)`` over a ``TrainingPyramid`` (the pooled
  vectors are built once per workspace and working size; their time is reported apart).

Reported: seconds, seconds as a fraction of brute force, exact distances as a fraction of
brute force's (every query against every image), recall of the true nearest, certified share.

    python -m benchmarks.bench_nearest [--smoke] [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import peak_rss_mb, print_table, write_json

SIZE = 32
GROUP = 50
SHIFT = 0.06


def _smooth(rng: np.random.Generator, n: int) -> np.ndarray:
    """n smooth random images (n, 32, 32, 3) in [0.3, 0.7]: 4 x 4 random values upsampled bilinearly."""
    coarse = rng.random((n, 5, 5, 3))
    x = np.linspace(0, 4, SIZE)
    i = np.minimum(x.astype(int), 3)
    f = (x - i)[None, :, None, None]
    rows = coarse[:, i] * (1 - f) + coarse[:, i + 1] * f  # (n, 32, 5, 3)
    f2 = (x - i)[None, None, :, None]
    img = rows[:, :, i] * (1 - f2) + rows[:, :, i + 1] * f2
    return 0.3 + 0.4 * img


def _detail(rng: np.random.Generator, n: int, amplitude: float = 0.15) -> np.ndarray:
    noise = rng.normal(0, 1, (n, SIZE, SIZE, 3))
    blocks = noise.reshape(n, SIZE // 2, 2, SIZE // 2, 2, 3)
    hp = (blocks - blocks.mean(axis=(2, 4), keepdims=True)).reshape(n, SIZE, SIZE, 3)
    return amplitude * hp


def build(kind: str, n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training uint8 (n, 32, 32, 3), queries float32, the true nearest row of each query)."""
    rng = np.random.default_rng(seed)
    train = np.empty((n, SIZE, SIZE, 3), np.uint8)
    block = 20_000
    groups = _smooth(rng, -(-n // GROUP)) if kind == "templated" else None
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        if kind == "templated":
            base = groups[rows // GROUP] + np.where(rows % GROUP == 0, 0.0, SHIFT)[:, None, None, None]
        else:
            base = _smooth(rng, len(rows))
        img = np.clip(base + _detail(rng, len(rows)), 0, 1)
        train[rows] = (img * 255 + 0.5).astype(np.uint8)
    pick = (rng.choice(n // GROUP, queries, replace=False) * GROUP if kind == "templated"
            else rng.choice(n, queries, replace=False))
    q = train[pick].astype(np.float32) / 255 + (SHIFT if kind == "templated" else 0.0)
    q = np.clip(q + rng.normal(0, 0.01, q.shape), 0, 1).astype(np.float32)
    return train, q, pick


def brute_force(train: np.ndarray, q: np.ndarray, block: int = 32_768) -> tuple[np.ndarray, np.ndarray]:
    qf = q.reshape(len(q), -1)
    qn = (qf.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
    best = np.full(len(q), np.inf, np.float32)
    arg = np.zeros(len(q), np.int64)
    d = qf.shape[1]
    for start in range(0, len(train), block):
        t = train[start:start + block].reshape(-1, d).astype(np.float32) / 255
        d2 = qn[:, None] + (t * t).sum(axis=1)[None, :] - 2 * qf @ t.T
        j = d2.argmin(axis=1)
        v = d2[np.arange(len(q)), j]
        better = v < best
        best[better], arg[better] = v[better], start + j[better]
    return arg, np.sqrt(np.maximum(best, 0) / d)


def run_one(kind: str, n: int, queries: int) -> list[dict]:
    import faiss

    from core.nearest import FINE, TrainingPyramid, certified_nearest, pool

    train, q, _ = build(kind, n, queries)
    loader = lambda ids: train[np.asarray(ids)].astype(np.float32) / 255  # noqa: E731
    t0 = time.perf_counter()
    truth, truth_l2 = brute_force(train, q)
    brute_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    pyramid = TrainingPyramid.from_loader(SIZE, np.arange(n), loader, block=4096)
    pool_s = time.perf_counter() - t0

    # the previous audit: top-10 by the pixel embedding (16 x 16 pooled pixels), then exact distances
    index = faiss.IndexFlatL2(pyramid.fine.shape[1])
    index.add(pyramid.fine)
    t0 = time.perf_counter()
    _, top = index.search(pool(q, FINE).astype(np.float32), 10)
    cand = train[top.reshape(-1)].astype(np.float32).reshape(len(q), 10, -1) / 255
    exact = np.sqrt(((cand - q.reshape(len(q), 1, -1)) ** 2).mean(axis=2))
    topk_found = top[np.arange(len(q)), exact.argmin(axis=1)]
    topk_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    near = certified_nearest(q, pyramid, 1, show=10, budget=10 * n)
    cert_s = time.perf_counter() - t0
    rows = []
    for name, seconds, found, computed, certified in (
            ("brute force", brute_s, truth, len(q) * n, 1.0),
            ("top-10 (pixel embedding)", topk_s, topk_found, len(q) * 10, 0.0),
            ("certified", cert_s, near.ids[:, 0], int(near.exact_count.sum()), float(near.certified.mean()))):
        rows.append({"set": kind, "training": n, "method": name, "seconds": seconds,
                     "time_vs_brute": seconds / brute_s, "distances_vs_brute": computed / (len(q) * n),
                     "recall": float((np.asarray(found) == truth).mean()), "certified": certified})
    rows[-1]["pooling_once_s"] = pool_s
    rows[-1]["max_exact_per_query"] = int(near.exact_count.max())
    assert np.allclose(near.l2[:, 0], truth_l2, atol=1e-4), "certified nearest disagrees with brute force"
    return rows


def run_novel(n: int, queries: int) -> list[dict]:
    """Queries that copy nothing (fresh ``natural`` images): the pooled bounds cannot separate their
    nearest from thousands of others; the dense level (full working-size bound) settles them.
    k = 1 (a text prompt's generations) and k = 50 (relative L2 of unconditional generations)."""
    import core.nearest as nearest
    from core.nearest import TrainingPyramid, certified_nearest

    train, _, _ = build("natural", n, 1)
    rng = np.random.default_rng(7)
    q = np.clip(_smooth(rng, queries) + _detail(rng, queries), 0, 1).astype(np.float32)
    loader = lambda ids: train[np.asarray(ids)].astype(np.float32) / 255  # noqa: E731
    t0 = time.perf_counter()
    truth, truth_l2 = brute_force(train, q)
    brute_s = time.perf_counter() - t0
    pyramid = TrainingPyramid.from_loader(SIZE, np.arange(n), loader, block=4096)
    rows = [{"set": "novel", "training": n, "method": "brute force", "seconds": brute_s, "time_vs_brute": 1.0,
             "distances_vs_brute": 1.0, "recall": 1.0, "certified": 0.0}]
    dense_bytes = nearest.DENSE_BYTES
    for k in (1, 50):
        for name, limit in (("certified, pooled bounds only", 0), ("certified with the dense level", dense_bytes)):
            nearest.DENSE_BYTES = limit
            try:
                t0 = time.perf_counter()
                near = certified_nearest(q, pyramid, k, show=max(k, 10), budget=5000)
                seconds = time.perf_counter() - t0
            finally:
                nearest.DENSE_BYTES = dense_bytes
            rows.append({"set": "novel", "training": n, "method": f"{name}, k={k}", "seconds": seconds,
                         "time_vs_brute": seconds / brute_s, "distances_vs_brute": float(near.exact_count.sum()) / (len(q) * n),
                         "recall": float((near.ids[:, 0] == truth).mean()), "certified": float(near.certified.mean())})
            if near.certified.all():
                assert np.allclose(near.l2[:, 0], truth_l2, atol=1e-4), "certified nearest disagrees with brute force"
    return rows


def main(smoke: bool = False, sizes: tuple[int, ...] | None = None) -> dict:
    sizes = sizes or ((2_000,) if smoke else (10_000, 100_000, 1_000_000))
    queries = 16 if smoke else 64
    from core.distances import paired_l2

    paired_l2(np.zeros((1, 4, 4, 3), np.float32), np.zeros((1, 4, 4, 3), np.float32))  # imports torch before any timing
    rows = []
    for n in sizes:
        for kind in ("templated", "natural"):
            rows.extend(run_one(kind, n, queries))
            print(f"  {kind} {n:,}: done, peak RSS {peak_rss_mb():.0f} MB", flush=True)
        from core.nearest import DENSE_BYTES

        if n * SIZE * SIZE * 3 * 4 <= DENSE_BYTES:  # the dense level needs the training pixels as one matrix
            rows.extend(run_novel(n, queries))
            print(f"  novel {n:,}: done, peak RSS {peak_rss_mb():.0f} MB", flush=True)
    print_table(rows, ["set", "training", "method", "seconds", "time_vs_brute", "distances_vs_brute", "recall", "certified",
                       "pooling_once_s", "max_exact_per_query"],
                title=f"nearest training image of {queries} queries (32 x 32 x 3): certified vs top-10 vs brute force")
    payload = {"rows": rows, "queries": queries, "size": SIZE}
    write_json("nearest", smoke, payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sizes", help="comma-separated training set sizes")
    args = parser.parse_args()
    main(args.smoke, tuple(int(s) for s in args.sizes.split(",")) if args.sizes else None)
