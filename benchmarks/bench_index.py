"""Training-index benchmark: build time, memory, queries per second and recall@10.

Data: synthetic 512-d embeddings shaped like CLIP's (L2-normalised, cosine metric),
n = 1,000,000 (``--smoke``: 20,000), from two generators (``Mixture`` below):

* ``clustered``: 1,000 clusters around a shared direction, each spread in its own
  16-dimensional subspace plus isotropic noise. Random pairs have cosine ~0.2, a query
  and its nearest neighbour ~0.8 (both measured and reported).
* ``unclustered`` (full run only): one 32-dimensional Gaussian, no clusters; neighbours
  straddle every IVF cell boundary, the hard case for any IVF index.

Queries: 1,000 (smoke: 200) held-out draws from the same generator, so not in the
index; and as many near copies of indexed vectors (cosine ~0.97 to their source: the
memorisation case), scored by whether the source comes back first.

The index is built by ``core.index.TrainingIndex.add`` as an ingest builds it, so it is
the kind memaudit chooses at that size (exact up to ``index_exact_max``, 50,000 by
default; IVF with 4-bit fast-scan PQ codes and exact re-ranking above). Search goes
through ``TrainingIndex.search`` (re-ranking included). The baseline is exact search
in numpy: ``q @ X.T`` in float32 blocks of 65,536 vectors and ``argpartition``;
recall@10 is measured against it. IVF is measured at several ``nprobe`` values
(``default`` marks memaudit's). Peak RSS is measured from just before the build
(``rss_before_build_mb`` already holds the data and the baseline's results).

    python -m benchmarks.bench_index [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import peak_rss_mb, print_table, reset_peak_rss, rss_mb, write_json
from core.index import DEFAULT_NPROBE, TrainingIndex
from core.store import Workspace

DIM = 512
CLUSTERS = 1000
K = 10


class Mixture:
    """CLIP-like synthetic embeddings: clusters around a shared direction, each spread in a low-rank subspace.

    member = normalise(mean + centre[c] + within * B[c] z / sqrt(r) + noise * e), z ~ N(0, I_r), e ~ N(0, I_d),
    with mean, centres, B[c] (r x d) drawn N(0, 1) once. ``clusters=0`` drops mean and centres: one
    low-rank Gaussian with no cluster structure, the hard case for any IVF index.
    """

    def __init__(self, clusters: int, rank: int, within: float, noise: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.clusters, self.rank, self.within, self.noise = clusters, rank, within, noise
        self.mean = rng.standard_normal(DIM, dtype=np.float32) if clusters else np.zeros(DIM, np.float32)
        k = max(clusters, 1)
        self.centres = rng.standard_normal((k, DIM), dtype=np.float32) if clusters else np.zeros((1, DIM), np.float32)
        self.bases = rng.standard_normal((k, rank, DIM), dtype=np.float32)

    def sample(self, n: int, seed: int, chunk: int = 8192) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, DIM), dtype=np.float32)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            lab = rng.integers(0, len(self.centres), m)
            z = rng.standard_normal((m, self.rank), dtype=np.float32)
            x = (self.mean + self.centres[lab]
                 + (self.within / np.sqrt(self.rank)) * np.einsum("mr,mrd->md", z, self.bases[lab])
                 + self.noise * rng.standard_normal((m, DIM), dtype=np.float32))
            out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


DATASETS = {
    # random pairs have cosine ~0.2, a vector and its nearest neighbour ~0.8 (measured on the data)
    "clustered": Mixture(clusters=1000, rank=16, within=1.5, noise=0.3),
    # one 32-dimensional Gaussian: neighbours straddle every IVF cell boundary
    "unclustered": Mixture(clusters=0, rank=32, within=1.0, noise=0.1),
}


def numpy_exact(x: np.ndarray, q: np.ndarray, k: int, block: int = 65_536) -> np.ndarray:
    """Exact top-k by inner product (cosine on normalised vectors), numpy only."""
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for s in range(0, len(x), block):
        sc = q @ x[s:s + block].T
        kk = min(k, sc.shape[1])
        part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(sc, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + s], axis=1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    return best_i


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def timed_search(index: TrainingIndex, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    index.search(q[:10], k)  # warm the page cache and faiss' threads
    t = time.perf_counter()
    ids, _ = index.search(q, k)
    return ids, len(q) / (time.perf_counter() - t)


def run(dataset: str, n: int, n_queries: int, exact_max: int | None, nprobes: tuple[int, ...], label: str) -> list[dict]:
    import faiss

    mix = DATASETS[dataset]
    t = time.perf_counter()
    x = mix.sample(n, 1)
    q = mix.sample(n_queries, 2)
    # near copies of indexed vectors (the memorisation case): cosine ~0.97 to their source
    rng = np.random.default_rng(3)
    source = rng.choice(n, size=n_queries, replace=False)
    near = x[source] + 0.25 / np.sqrt(DIM) * rng.standard_normal((n_queries, DIM), dtype=np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    gen_s = time.perf_counter() - t

    t = time.perf_counter()
    truth = numpy_exact(x, q, K)
    numpy_qps = n_queries / (time.perf_counter() - t)
    nn_cos = float(np.mean(np.sum(q * x[truth[:, 0]], axis=1)))
    random_cos = float(np.mean(q[:100] @ x[:1000].T))

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        index = TrainingIndex(ws, "clip", {"clip_model": "synthetic", "clip_pretrained": "none"},
                              exact_max=exact_max if exact_max is not None else ws.settings()["index_exact_max"],
                              nprobe=DEFAULT_NPROBE)
        ids = np.arange(1, n + 1, dtype=np.int64)
        rss_before = rss_mb()  # the data and the exact baseline's results are held already
        reset_peak_rss()
        t = time.perf_counter()
        index.add(ids, x)
        build_s = time.perf_counter() - t
        faiss_mb = index.faiss_path.stat().st_size / 2**20
        vectors_mb = index.vectors_path.stat().st_size / 2**20
        for nprobe in (nprobes if index.kind == "ivf" else (0,)):
            if nprobe:
                index.set_nprobe(nprobe)
            found, qps = timed_search(index, q, K)
            near_found, _ = index.search(near, 1)
            rows.append({
                "label": label, "dataset": dataset, "n": n, "dim": DIM, "queries": n_queries, "kind": index.kind,
                "nlist": index.meta.get("nlist"), "nprobe": nprobe or None,
                "default": nprobe in (0, DEFAULT_NPROBE),
                "build_s": round(build_s, 2), "faiss_index_mb": round(faiss_mb, 1),
                "embeddings_mb": round(vectors_mb, 1), "rss_before_build_mb": round(rss_before, 1),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "qps": round(qps, 1), "numpy_exact_qps": round(numpy_qps, 1), "speedup": round(qps / numpy_qps, 1),
                "recall_at_10": round(recall_at(found - 1, truth), 4),
                "near_copy_recall_at_1": round(float(np.mean(near_found[:, 0] - 1 == source)), 4),
                "nn_cosine": round(nn_cos, 3), "random_cosine": round(random_cos, 3),
                "data_s": round(gen_s, 1), "faiss_threads": faiss.omp_get_max_threads(),
            })
        del index
    return rows


COLUMNS = ["label", "dataset", "n", "kind", "nlist", "nprobe", "default", "build_s", "faiss_index_mb", "embeddings_mb",
           "rss_before_build_mb", "peak_rss_mb", "qps", "numpy_exact_qps", "speedup", "recall_at_10",
           "near_copy_recall_at_1"]


def main(smoke: bool = False) -> list[dict]:
    if smoke:
        rows = run("clustered", 20_000, 200, None, (DEFAULT_NPROBE,), "smoke")
        # the IVF path at smoke size too, forced by a low index_exact_max
        rows += run("clustered", 20_000, 200, 5_000, (8, DEFAULT_NPROBE), "smoke, IVF forced")
    else:
        rows = run("clustered", 1_000_000, 1_000, None, (8, 16, 32, 64), "full")
        rows += run("unclustered", 1_000_000, 1_000, None, (16, 32, 64, 128), "full, hard case")
    print_table(rows, COLUMNS, title=f"training index, k = {K} (default nprobe {DEFAULT_NPROBE})")
    datasets = {name: {"clusters": m.clusters, "rank": m.rank, "within": m.within, "noise": m.noise}
                for name, m in DATASETS.items()}
    write_json("index", smoke, {"k": K, "default_nprobe": DEFAULT_NPROBE, "datasets": datasets, "rows": rows})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="20k vectors instead of 1M")
    parser.add_argument("--n", type=int, help="another size, printed only (not written to out/)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="clustered", help="with --n")
    args = parser.parse_args()
    if args.n:
        print_table(run(args.dataset, args.n, 1_000, None, (8, 16, 32, 64), f"n={args.n}"), COLUMNS)
    else:
        main(args.smoke)
