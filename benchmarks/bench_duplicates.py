"""Duplicate-count benchmark: every pair within the duplicate threshold among n training images, at 64 x 64.

Data: n synthetic 64 x 64 RGB images (n = 100,000; ``--smoke``: 1,000), held in memory as
the uint8 working arrays ``core.duplicates`` caches. Each image is a smooth colour field (an
8 x 8 random field, bilinearly enlarged) plus fine uniform noise of +-40 levels:

* half of the images share their colour field with 9 others ("templated": ten images with
  one layout and different detail; 16 x 16 pooling hardly tells them apart, the exact L2
  at 64 x 64 is about 0.13, over the 0.1 threshold): the hard case for pooled bounds;
* 2% are near copies (every pixel moved by 1 to 3 levels) of 200 source images, 1 to 100
  copies each: the duplicates to be counted;
* the rest are distinct.

Measured: ``core.duplicates.PairFinder`` (faiss range search over 8 x 8 pooled vectors, the
16 x 16 bound, the exact L2 of what is left) for every image against every image (a full
count, as a first ingest or a threshold change runs it) and for 1% new images against all
(an incremental ingest). Baseline: exact brute force, every image against every image by
float64 products of the uint8 arrays (exact integers), timed on a sample of queries and
scaled to n; the sample's pairs also check that the finder misses none.

    python -m benchmarks.bench_duplicates [--smoke]
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import cli, peak_rss_mb, print_table, reset_peak_rss, write_json
from core.duplicates import QUERY_BATCH, PairFinder

SIZE = 64
THRESHOLD = 0.1


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """uint8 (n, 64, 64, 3) images as described in the module docstring; returns (arrays, copies planted)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    templated = n // 2 // 10 * 10
    copies = n // 50
    fields = templated // 10 + (n - templated - copies)
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    layout = np.empty(n, dtype=np.int64)
    layout[:templated] = np.repeat(np.arange(templated // 10), 10)
    layout[templated:n - copies] = templated // 10 + np.arange(n - templated - copies)
    small = rng.integers(30, 226, (fields, 8, 8, 3), dtype=np.uint8)
    for s in range(0, n - copies, 4096):
        rows = range(s, min(s + 4096, n - copies))
        smooth = np.stack([np.asarray(Image.fromarray(small[layout[i]]).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
                           for i in rows]).astype(np.int16)
        noise = rng.integers(-40, 41, smooth.shape, dtype=np.int16)
        out[s:s + len(rows)] = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    # near copies: 200 sources among the distinct images, with 1 to 100 copies each (Zipf-like)
    sources = rng.choice(np.arange(templated, n - copies), 200, replace=False)
    weights = 1.0 / np.arange(1, 201)
    per_source = np.maximum(1, np.round(weights / weights.sum() * copies)).astype(int)
    picks = np.repeat(sources, per_source)[:copies]
    picks = np.concatenate([picks, rng.choice(sources, copies - len(picks))])
    for s in range(0, copies, 4096):
        src = picks[s:s + 4096]
        shift = rng.integers(1, 4, (len(src), 1, 1, 1)) * rng.choice([-1, 1], (len(src), 1, 1, 1))
        out[n - copies + s:n - copies + s + len(src)] = np.clip(out[src].astype(np.int16) + shift, 0, 255).astype(np.uint8)
    return out, copies


def brute_force(arrays: np.ndarray, rows: np.ndarray) -> tuple[set[tuple[int, int]], float]:
    """Pairs (p, q) with exact L2 <= THRESHOLD for p in ``rows``, q any other image; and the seconds it took."""
    start = time.perf_counter()
    flat = arrays.reshape(len(arrays), -1)
    sq_all = np.concatenate([np.einsum("ij,ij->i", b, b, dtype=np.int64) for b in
                             (flat[s:s + 4096].astype(np.int32) for s in range(0, len(flat), 4096))]).astype(np.float64)
    q = flat[rows].astype(np.float64)
    limit = THRESHOLD ** 2 * flat.shape[1] * 255.0 ** 2
    pairs = set()
    for s in range(0, len(flat), 8192):
        block = flat[s:s + 8192].astype(np.float64)
        d2 = sq_all[rows][:, None] + sq_all[None, s:s + 8192] - 2.0 * (q @ block.T)
        p, c = np.nonzero(d2 <= limit)
        pairs.update((int(rows[a]), int(s + b)) for a, b in zip(p, c) if rows[a] != s + b)
    return pairs, time.perf_counter() - start


def main(smoke: bool = False) -> dict:
    n = 1_000 if smoke else 100_000
    sample = 100 if smoke else 500
    t = time.perf_counter()
    arrays, copies = synthetic(n)
    made_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(n, sample, replace=False))
    truth, brute_s = brute_force(arrays, rows)
    brute_full_s = brute_s * n / sample

    reset_peak_rss()
    t = time.perf_counter()
    finder = PairFinder(arrays, THRESHOLD)
    build_s = time.perf_counter() - t
    found: set[tuple[int, int]] = set()
    candidates = pairs = 0
    t = time.perf_counter()
    for s in range(0, n, QUERY_BATCH):
        src, dst, _, measured = finder.pairs(np.arange(s, min(s + QUERY_BATCH, n)))
        candidates += measured
        pairs += len(src)
        in_sample = np.isin(src, rows)
        found.update(zip(src[in_sample].tolist(), dst[in_sample].tolist()))
    full_s = build_s + time.perf_counter() - t
    peak = peak_rss_mb()
    new = np.arange(n - n // 100, n)
    t = time.perf_counter()
    src, _, _, measured_new = finder.pairs(new)
    incremental_s = build_s + time.perf_counter() - t

    missed = len(truth - found)
    extra = len(found - truth)
    result = {
        "n": n, "size": SIZE, "threshold": THRESHOLD, "planted_copies": copies, "synthetic_s": made_s,
        "pairs_within": pairs // 2, "candidates_measured_exactly": candidates // 2,
        "all_pairs": n * (n - 1) // 2, "exact_fraction": candidates / (n * (n - 1)),
        "full_count_s": full_s, "index_build_s": build_s, "incremental_1pct_s": incremental_s,
        "brute_force_s": brute_full_s, "brute_force_sample_queries": sample,
        "full_vs_brute_force": full_s / brute_full_s,
        "sample_pairs": len(truth), "sample_missed": missed, "sample_extra": extra, "peak_rss_mb": peak,
        "arrays_mb": arrays.nbytes / 2**20,
    }
    print_table([result], ["n", "pairs_within", "candidates_measured_exactly", "exact_fraction", "full_count_s",
                           "incremental_1pct_s", "brute_force_s", "full_vs_brute_force", "sample_missed", "peak_rss_mb"],
                title=f"duplicate counts at {SIZE} x {SIZE}, threshold {THRESHOLD} (brute force: {sample} queries, scaled)")
    assert missed == 0 and extra == 0, f"the finder disagrees with brute force on the sample: {missed} missed, {extra} extra"
    write_json("duplicates", smoke, result)
    return result


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0])
