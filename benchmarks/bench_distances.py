"""Pairwise tiled L2 at the paper's scale: speed, accuracy near zero, memory, several grids.

Data: 500 images of 512 x 512 x 3 (float32, 1.6 GB), each a mosaic of 5 x 5
patches cut at random from scikit-image's photographs (random flips, brightness
and contrast jitter, Gaussian noise 0.02): photographic statistics and no two
alike, like the generations of a prompt that is not memorised; 20 of them are
replaced by copies of others with noise from 1e-5 to 1e-2 and 2 by exact
duplicates, to measure accuracy near zero in the same matrix. Grid 4 (16 tiles).

Compared (``--smoke``: 24 images of 64 x 64):

* memaudit: ``pairwise_tiled_l2(x, grid=4)``, best of 3 runs.
* reference: the straightforward implementation, direct differences block by
  block (4 x 4 images per block, float32, upper-triangle blocks only), timed on
  the first 48 images and scaled by the number of blocks (7,875 for 500 images,
  78 for 48: its time is proportional to the number of blocks).
* matmul: torch's float32 matrix product on matrices of the same shape as
  memaudit's products, (500 x 49,152) x (49,152 x 500), 16 times (one per tile),
  measured in the same run, alternating with memaudit's runs (best of 3): the
  machine's attainable rate for this work.

GFLOP/s counts 2 N^2 d (d = 786,432 values per image) for every method: the
work of the product form over all pairs. Accuracy: the largest difference from
direct differences summed in float64, near zero and overall.

Several grids: ``pairwise_tiled_l2_grids(x, grids=(1, 2, 4, 8))`` (one pass of
products for the four grids the audit caches for the dashboard's grid slider) against
four separate ``pairwise_tiled_l2`` calls and against grid 4 alone, with the largest
difference between the one-pass and the separate results.

    python -m benchmarks.bench_distances [--smoke]
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import cli, peak_rss_mb, print_table, reset_peak_rss, rss_mb, timeit, write_json
from core.distances import pairwise_tiled_l2, pairwise_tiled_l2_grids

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel", "hubble_deep_field",
          "retina", "camera", "coins", "moon", "page")
GRID = 4
GRIDS = (1, 2, 4, 8)
THREADS = 2


def photographs(size: int) -> list[np.ndarray]:
    """scikit-image's photographs with structure, centre-cropped square and resized to size x size."""
    from PIL import Image
    from skimage import data

    out = []
    for name in PHOTOS:
        arr = np.asarray(getattr(data, name)())
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        img = Image.fromarray(arr[..., :3].astype(np.uint8))
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        out.append(np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0)
    return out


def image_set(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """n unrelated images, then near copies and duplicates written over the last 22 (see the docstring).

    Each image is a mosaic of 5 x 5 patches cut at random places from random photographs
    (flipped at random), with brightness and contrast jitter and noise: photographic
    statistics, and no two images alike.
    """
    rng = np.random.default_rng(seed)
    photos = photographs(size)
    p = -(-size // 5)
    canvas = np.empty((5 * p, 5 * p, 3), dtype=np.float32)
    x = np.empty((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        for by in range(5):
            for bx in range(5):
                src = photos[rng.integers(len(photos))]
                y0, x0 = rng.integers(0, size - p + 1, size=2)
                patch = src[y0:y0 + p, x0:x0 + p]
                canvas[by * p:(by + 1) * p, bx * p:(bx + 1) * p] = patch[:, ::-1] if rng.random() < 0.5 else patch
        img = (canvas[:size, :size] - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.1, 0.1)
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * 0.02
        np.clip(img, 0.0, 1.0, out=x[i])
    near: list[tuple[int, int, float]] = []
    scales = np.logspace(-5, -2, 20)
    for j, s in enumerate(scales):
        k = n - 22 + j
        x[k] = np.clip(x[j] + rng.standard_normal(x[j].shape, dtype=np.float32) * np.float32(s), 0, 1)
        near.append((j, k, float(s)))
    for j, k in ((20, n - 2), (21, n - 1)):
        x[k] = x[j]
        near.append((j, k, 0.0))
    return x, near


def direct64(a: np.ndarray, b: np.ndarray, grid: int) -> float:
    """Tiled L2 of one pair by direct differences in float64."""
    h, w, c = a.shape
    sq = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    tiles = sq.reshape(grid, h // grid, grid, w // grid, c).sum(axis=(1, 3, 4))
    return float(np.sqrt(tiles.max() / (h // grid * w // grid * c)))


def reference(x: torch.Tensor, grid: int, block: int = 4) -> torch.Tensor:
    """The straightforward way: direct differences, block by block, float32, upper-triangle blocks."""
    n, h, w, c = x.shape
    th, tw = h // grid, w // grid
    out = torch.zeros(n, n)
    for i in range(0, n, block):
        for j in range(i, n, block):
            diff = x[i:i + block, None] - x[None, j:j + block]
            bi, bj = diff.shape[:2]
            sq = diff.square_().view(bi, bj, grid, th, grid, tw, c).sum(dim=(3, 5, 6))
            out[i:i + bi, j:j + bj] = (sq.flatten(2).amax(dim=2) / (th * tw * c)).sqrt()
    upper = torch.triu(out, 1)
    return upper + upper.T


def run(n: int, size: int, subset: int, repeat: int) -> dict:
    torch.set_num_threads(THREADS)
    d = size * size * 3
    flops = 2.0 * n * n * d
    t0 = time.perf_counter()
    x, near = image_set(n, size)
    data_s = time.perf_counter() - t0
    xt = torch.from_numpy(x)

    # memaudit, with its peak memory beyond the inputs
    before = rss_mb()
    reset_peak_rss()
    dist = pairwise_tiled_l2(x, grid=GRID)
    extra_mb = peak_rss_mb() - before

    # memaudit and the machine's matmul rate on the same shapes, measured alternately (a shared
    # machine's load drifts: each gets the same chances)
    th = size // GRID
    a = torch.rand(n, th * th * 3)
    [a @ a.T for _ in range(2)]
    ours_runs, mm_runs = [], []
    for _ in range(repeat):
        ours_runs.append(timeit(lambda: pairwise_tiled_l2(x, grid=GRID), repeat=1, warmup=0)["best_s"])
        mm_runs.append(timeit(lambda: [a @ a.T for _ in range(GRID * GRID)], repeat=1, warmup=0)["best_s"])
    ours = {"best_s": min(ours_runs), "runs_s": ours_runs}
    mm = {"best_s": min(mm_runs), "runs_s": mm_runs}
    del a

    # the reference on a subset, scaled by blocks
    ref_time = timeit(lambda: reference(xt[:subset], GRID), repeat=1, warmup=0)
    ref_sub = reference(xt[:subset], GRID)
    blocks = lambda m: (-(-m // 4)) * (-(-m // 4) + 1) // 2  # noqa: E731
    scale = blocks(n) / blocks(subset)
    ref_s = ref_time["best_s"] * scale

    # accuracy: near zero against float64 direct differences, and the subset against the reference
    near_rows = []
    for i, k, s in near:
        want = direct64(x[i], x[k], GRID)
        near_rows.append({"noise": s, "direct_float64": want, "memaudit": float(dist[i, k]),
                          "abs_error": abs(float(dist[i, k]) - want)})
    diag_max = float(dist.diagonal().abs().max())
    subset_err = float((dist[:subset, :subset] - ref_sub).abs().max())

    rows = [
        {"method": "memaudit pairwise_tiled_l2", "seconds": ours["best_s"], "gflops": flops / ours["best_s"] / 1e9,
         "vs_reference": ref_s / ours["best_s"], "of_matmul": mm["best_s"] / ours["best_s"]},
        {"method": f"reference, direct (scaled x{scale:.1f})", "seconds": ref_s, "gflops": flops / ref_s / 1e9,
         "vs_reference": 1.0, "of_matmul": mm["best_s"] / ref_s},
        {"method": "torch float32 matmul, same shapes", "seconds": mm["best_s"], "gflops": flops / mm["best_s"] / 1e9,
         "vs_reference": ref_s / mm["best_s"], "of_matmul": 1.0},
    ]
    print_table(rows, ["method", "seconds", "gflops", "vs_reference", "of_matmul"],
                f"pairwise tiled L2, {n} images {size}x{size}x3, grid {GRID}, {torch.get_num_threads()} threads")
    print_table(near_rows, ["noise", "direct_float64", "memaudit", "abs_error"], "near zero (pairs of copies)")
    print(f"diagonal max {diag_max:g}; subset max |memaudit - reference| {subset_err:.2e}; "
          f"peak memory beyond the inputs {extra_mb:.0f} MB (inputs {x.nbytes / 2**20:.0f} MB)\n")

    grids = grid_rows(x, ours["best_s"])
    print_table(grids, ["method", "seconds", "vs_one_grid", "max_abs_vs_separate"],
                f"grids {', '.join(map(str, GRIDS))} from one pass vs separately ({n} images {size}x{size}x3)")

    return {
        "n": n, "size": size, "grid": GRID, "threads": torch.get_num_threads(), "data_s": data_s,
        "flops_per_run": flops, "reference_subset": subset, "reference_scale": scale,
        "reference_subset_s": ref_time["best_s"], "timings": rows, "memaudit_runs": ours,
        "matmul_runs": mm, "near_zero": near_rows, "diagonal_max": diag_max,
        "subset_max_abs_vs_reference": subset_err, "peak_extra_mb": extra_mb, "inputs_mb": x.nbytes / 2**20,
        "grids": grids,
    }


def grid_rows(x: np.ndarray, one_grid_s: float) -> list[dict]:
    t0 = time.perf_counter()
    together = pairwise_tiled_l2_grids(x, grids=GRIDS)
    together_s = time.perf_counter() - t0
    separate, separate_s = {}, 0.0
    for g in GRIDS:
        t0 = time.perf_counter()
        separate[g] = pairwise_tiled_l2(x, grid=g)
        separate_s += time.perf_counter() - t0
    err = max(float((together[g] - separate[g]).abs().max()) for g in GRIDS)
    return [{"method": f"pairwise_tiled_l2_grids {GRIDS}", "seconds": together_s, "vs_one_grid": together_s / one_grid_s,
             "max_abs_vs_separate": err},
            {"method": f"{len(GRIDS)} pairwise_tiled_l2 calls", "seconds": separate_s, "vs_one_grid": separate_s / one_grid_s,
             "max_abs_vs_separate": 0.0},
            {"method": f"pairwise_tiled_l2, grid {GRID} alone (best above)", "seconds": one_grid_s, "vs_one_grid": 1.0,
             "max_abs_vs_separate": None}]


def main(smoke: bool = False) -> dict:
    result = run(24, 64, 8, 1) if smoke else run(500, 512, 48, 3)
    write_json("distances", smoke, result)
    return result


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0])
