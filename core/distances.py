"""Distances between images and between embeddings (PAPER.md, "Distances").

Images come in batches of shape (N, H, W, C) holding floats in [0, 1] (numpy
arrays or torch tensors; the working resolution of ``core.images.to_working``).
With d = H * W * C values per image, a G x G grid of tiles of
(H / G) x (W / G) x C values each (t = H * W * C / G^2 values per tile):

    l2(x, y)          = sqrt( sum_i (x_i - y_i)^2 / d )
    tiled_l2(x, y)    = max over the G^2 tile positions p of sqrt( sum_{i in p} (x_i - y_i)^2 / t )
    relative_l2       = l2(x_hat, x) / (alpha * mean_{y in S} l2(x_hat, y))
    cosine(u, v)      = 1 - u.v / (|u| |v|)

``tiled_l2 >= l2`` always (the mean of the tiles' squared distances is the plain
squared distance, and a maximum is at least a mean), and tiled_l2 with G = 1 is l2.

How the pairwise functions compute (and why the answer is exact near zero)
---------------------------------------------------------------------------
For every tile the squared distances of all pairs come from one matrix product,
``|x|^2 + |y|^2 - 2 x.y``, which is as fast as the machine's float32 matmul.
Its rounding error is about ``u * (|x|^2 + |y|^2)`` (u = 2^-24), a disaster for
near-identical images with large norms, so:

1. Before the product every band of values is centred on the mean over the
   batch (distances are translation invariant). A cluster of near copies then
   has small norms, and so small rounding errors.
2. Each pair gets an error bound ``E = 128 u (|x|^2 + |y|^2) / t`` (its largest
   over tiles; 128 is over seven times the largest factor measured with MKL on
   photographs, near copies and noise, t from 192 to 49,152). Where the
   product's squared distance is under ``(E / 5e-5)^2``, its square root could
   be off by more than 5e-5, and the pair is recomputed: for a connected group of such pairs, one more
   product with every image centred on one member of the group (the group's
   images are then almost zero, and identical images exactly zero); pairs still
   uncertain after that are computed from direct differences, summed in float64.
3. So every returned distance is within 5e-5 of the direct difference
   (measured: within 1e-6), an image against an identical image is exactly 0,
   the diagonal of a batch against itself is exactly 0 and that matrix is
   exactly symmetric.

Memory: images are read one band of one tile at a time (at most 128 MB of
float32 for all rows of one band; for 500 images of 512 x 512 x 3, 1.6 GB,
a band is a whole tile, 98 MB), so such a batch needs about 200 MB beyond the
inputs. numpy inputs are not copied as a whole; torch inputs stay
on their device and bands are moved to the compute device as needed.

Several grids at once (``pairwise_tiled_l2_grids``)
---------------------------------------------------
A tile of a coarser grid is a union of equal tiles of a finer one, so its squared
sum is the sum of theirs. The products are taken once over the tiles of the finest
grid F (the grids' least common multiple), in an order that completes each coarser
tile before starting the next when the grids nest (1, 2, 4, 8): every grid's
distances then cost one pass plus an (N, M) addition per tile. Each grid gets its
own error bound (from its own tiles' norms) and recomputation, so every result has
the single-grid accuracy and exact zeros.

All functions return float32 torch tensors on the compute device (``device``,
by default the device of a torch input, else the CPU).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .errors import InputError

Array = Any  # np.ndarray | torch.Tensor

_U = 2.0 ** -24  # float32 unit roundoff
ERROR_FACTOR = 128.0  # multiple of u * (|x|^2 + |y|^2) / t bounding a product's squared-distance error
TOLERANCE = 5e-5  # largest error accepted from the product form; worse pairs are recomputed
CHUNK_BYTES = 128 << 20  # float32 bytes of one band (all rows of one band of one tile)
_REFINE_MIN_ROWS = 6  # smaller groups of uncertain pairs go straight to direct differences


# ---------------------------------------------------------------------------- validation
def check_grid(size: int, grid: int) -> None:
    """Raise InputError unless ``grid`` (G) is a positive integer dividing the working size ``size``."""
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise InputError(f"grid must be a positive integer, got {grid!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise InputError(f"the working size must be a positive integer, got {size!r}")
    if size % grid:
        options = ", ".join(str(g) for g in range(1, min(size, 16) + 1) if size % g == 0)
        raise InputError(f"grid {grid} does not divide the working size {size}; "
                         f"choose a grid that divides it (for example {options})")


def _as_images(x: Array, name: str) -> torch.Tensor:
    """A float torch view of an (N, H, W, C) batch in [0, 1]; numpy arrays are not copied."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise InputError(f"{name} must hold floats in [0, 1], got dtype {x.dtype}"
                             + ("; divide 8-bit pixels by 255" if x.dtype == np.uint8 else ""))
        t = torch.from_numpy(np.ascontiguousarray(x)) if x.ndim == 4 else None
        shape = x.shape
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise InputError(f"{name} must hold floats in [0, 1], got dtype {x.dtype}"
                             + ("; divide 8-bit pixels by 255" if x.dtype == torch.uint8 else ""))
        t = x.detach() if x.ndim == 4 else None
        shape = tuple(x.shape)
    else:
        raise InputError(f"{name} must be a numpy array or torch tensor of shape (N, H, W, C), "
                         f"got {type(x).__name__}")
    if t is None or min(shape[1:]) < 1:
        raise InputError(f"{name} must have shape (N, H, W, C) with H, W, C >= 1, got shape {tuple(shape)}")
    if t.shape[0] > 0:
        lo, hi = torch.aminmax(t)
        lo, hi = float(lo), float(hi)
        if not (0.0 <= lo and hi <= 1.0):  # also false for NaN
            raise InputError(f"{name} values must lie in [0, 1], got range [{lo:g}, {hi:g}]"
                             + ("; divide 8-bit pixels by 255" if hi > 1.0 and hi <= 255.0 else ""))
    return t


def _pair(a: Array, b: Array | None, name_b: str = "b") -> tuple[torch.Tensor, torch.Tensor | None]:
    ta = _as_images(a, "a")
    if b is None:
        return ta, None
    tb = _as_images(b, name_b)
    if ta.shape[1:] != tb.shape[1:]:
        raise InputError(f"a holds images of shape {tuple(ta.shape[1:])} but {name_b} holds {tuple(tb.shape[1:])}; "
                         "bring both to the same working resolution (core.images.to_working)")
    return ta, tb


def _check_tiles(x: torch.Tensor, grid: int) -> tuple[int, int]:
    h, w = int(x.shape[1]), int(x.shape[2])
    check_grid(h, grid)
    check_grid(w, grid)
    return h // grid, w // grid


def _device(x: torch.Tensor, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else x.device


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """Matrix products in true float32 (no TF32 or bfloat16 shortcuts) for the duration."""
    precision = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32


# ---------------------------------------------------------------------------- direct differences
def _direct_tiles(a: torch.Tensor, b: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor, grid: int,
                  device: torch.device) -> torch.Tensor:
    """Per tile, sum((a[ia[k]] - b[ib[k]])^2) / t for every k: (P, G * G) float64.

    Differences in float32 (float64 for float64 input), squared, and summed per
    tile row in float64: relative error ~1e-9, and exactly 0 for identical images.
    Pairs are gathered by index a chunk at a time (large images one pair at a time,
    from views), so memory stays bounded whatever the number of pairs.
    """
    n, h, w, c = (int(s) for s in a.shape)
    th, tw = h // grid, w // grid
    d = h * w * c
    wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    out = torch.empty(len(ia), grid * grid, dtype=torch.float64, device=device)
    per = CHUNK_BYTES // (12 * d)
    per = per if per >= 16 else 1
    ia_l, ib_l = ia.tolist(), ib.tolist()
    for s in range(0, len(ia_l), per):
        if per == 1:
            xa, xb = a[ia_l[s]][None], b[ib_l[s]][None]
        else:
            xa, xb = a[ia[s:s + per].to(a.device)], b[ib[s:s + per].to(b.device)]
        diff = torch.sub(xa.to(device=device, dtype=wide), xb.to(device=device, dtype=wide))
        rows = diff.square_().view(-1, grid, th, grid, tw * c).sum(dim=4, dtype=torch.float64)
        out[s:s + len(xa)] = rows.sum(dim=2).flatten(1) / (th * tw * c)
    return out


def _direct_sq(a: torch.Tensor, b: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor, grid: int,
               device: torch.device) -> torch.Tensor:
    """max over tiles of sum((a[ia[k]] - b[ib[k]])^2) / t for every k (P,) float64."""
    return _direct_tiles(a, b, ia, ib, grid, device).amax(dim=1)


# ---------------------------------------------------------------------------- the product form
@dataclass
class _Bands:
    """The bands (row ranges) of every tile: each band is y0:y1, x0:x1 of one tile."""
    grid: int
    th: int
    tw: int
    c: int
    rows_per_band: int

    def tile(self, ty: int, tx: int) -> list[tuple[int, int, int, int]]:
        """The bands of the tile in row ty, column tx of the grid."""
        x0 = tx * self.tw
        return [(ty * self.th + y, min((ty + 1) * self.th, ty * self.th + y + self.rows_per_band), x0, x0 + self.tw)
                for y in range(0, self.th, self.rows_per_band)]


def _bands(shape: Sequence[int], grid: int, rows: int) -> _Bands:
    h, w, c = (int(s) for s in shape[1:])
    th, tw = h // grid, w // grid
    per_row = tw * c * 4 * max(rows, 1)  # bytes of one tile row over all rows of the operand
    return _Bands(grid, th, tw, c, max(1, min(th, CHUNK_BYTES // per_row)))


def _mean_image(x: torch.Tensor, idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Mean over the rows idx (all if None) of x: (H, W, C) float32 on ``device``."""
    n = int(x.shape[0]) if idx is None else len(idx)
    if idx is None and x.is_contiguous():
        total = torch.mv(x.view(n, -1).T, torch.ones(n, dtype=x.dtype, device=x.device))
    else:
        per = max(1, CHUNK_BYTES // (x[0].numel() * x.element_size()))
        total = torch.zeros(x[0].numel(), dtype=x.dtype, device=x.device)
        for s in range(0, n, per):
            part = x[s:s + per] if idx is None else x[idx[s:s + per]]
            total += torch.mv(part.reshape(part.shape[0], -1).T, torch.ones(part.shape[0], dtype=x.dtype, device=x.device))
    return (total / n).to(device=device, dtype=torch.float32).view(x.shape[1:])


def _fine_grid(grids: Sequence[int]) -> int:
    """The grid whose tiles make up the tiles of every grid in ``grids`` (their least common multiple)."""
    return math.lcm(*(int(g) for g in grids))


def _tile_order(fine: int, grids: Sequence[int]) -> list[tuple[int, int]]:
    """The fine grid's tiles ordered so that each tile of every coarser grid is a contiguous run
    when the grids nest (each dividing the next): then one partial sum per grid is open at a time."""
    levels = sorted(grids)

    def key(p: tuple[int, int]) -> tuple[int, ...]:
        return tuple(v for g in levels for v in (p[0] * g // fine, p[1] * g // fine)) + p

    return sorted(((ty, tx) for ty in range(fine) for tx in range(fine)), key=key)


def _gemm_sq(a: torch.Tensor, b: torch.Tensor | None, ia: torch.Tensor | None, ib: torch.Tensor | None,
             grid: int, device: torch.device, ref: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared tiled distances by matrix products, and their error bounds (one grid of ``_gemm_sq_grids``)."""
    return _gemm_sq_grids(a, b, ia, ib, (grid,), device, ref)[grid]


def _gemm_sq_grids(a: torch.Tensor, b: torch.Tensor | None, ia: torch.Tensor | None, ib: torch.Tensor | None,
                   grids: Sequence[int], device: torch.device, ref: int | None = None
                   ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Squared tiled distances by matrix products, and their error bounds, for several grids at once.

    ``b is None`` means the rows ``ia`` of ``a`` against themselves. Values are
    centred on the mean image of the rows involved, or on image ``a[ref]`` when given.
    The products are taken once, tile by tile of the finest grid F (the grids' least
    common multiple); a coarser grid's tile is a union of F's tiles of equal size, so its
    squared sum is the sum of theirs. For each grid returns (max over tiles of squared
    normalised distance, clamped at 0; the bound E on its error), both (len(ia), len(ib))
    float32 on ``device``.
    """
    sym = b is None
    xb = a if sym else b
    na = a.shape[0] if ia is None else len(ia)
    nb = na if sym else (xb.shape[0] if ib is None else len(ib))
    fine = _fine_grid(grids)
    bands = _bands(a.shape, fine, na + (0 if sym else nb))
    t_values = bands.th * bands.tw * bands.c
    ia_src = None if ia is None else ia.to(a.device)
    ib_src = None if (ib is None or sym) else ib.to(xb.device)
    if ref is not None:
        centre = a[ref].to(device=device, dtype=torch.float32)
    elif sym:
        centre = _mean_image(a, ia_src, device)
    else:
        centre = (_mean_image(a, ia_src, device) * na + _mean_image(xb, ib_src, device) * nb) / (na + nb)

    per_side = {int(g): fine // int(g) for g in grids}  # fine tiles along one side of a grid's tile
    best = {g: torch.zeros(na, nb, dtype=torch.float32, device=device) for g in per_side}
    scale = {g: torch.zeros(na, nb, dtype=torch.float32, device=device) for g in per_side}
    coarse = [g for g, r in per_side.items() if r > 1]
    partial: dict[tuple[int, int, int], list] = {}  # (grid, row, column) -> [squared sum, norm sum, tiles seen]
    dot = torch.empty(na, nb, dtype=torch.float32, device=device)
    cap = bands.rows_per_band * bands.tw * bands.c
    buf_a = torch.empty(na * cap, dtype=torch.float32, device=device)
    buf_b = buf_a if sym else torch.empty(nb * cap, dtype=torch.float32, device=device)
    tmp = buf_a if sym else torch.empty(max(na, nb) * cap, dtype=torch.float32, device=device)

    def band(x: torch.Tensor, idx: torch.Tensor | None, y0: int, y1: int, x0: int, x1: int, buf: torch.Tensor) -> torch.Tensor:
        """Rows idx of x on one band, centred, as a contiguous (rows, values) float32 matrix."""
        part = x[:, y0:y1, x0:x1, :] if idx is None else x[idx, y0:y1, x0:x1, :]
        if part.device != device:
            part = part.to(device)
        out = buf[: part.shape[0] * (y1 - y0) * (x1 - x0) * bands.c].view(part.shape)
        torch.sub(part, centre[y0:y1, x0:x1, :], out=out)
        return out.view(part.shape[0], -1)

    with _full_float32():
        for ty, tx in _tile_order(fine, list(per_side)):
            if not sym:
                norm_a = torch.zeros(na, dtype=torch.float32, device=device)
                norm_b = torch.zeros(nb, dtype=torch.float32, device=device)
            for k, (y0, y1, x0, x1) in enumerate(bands.tile(ty, tx)):
                A = band(a, ia_src, y0, y1, x0, x1, buf_a)
                B = A if sym else band(xb, ib_src, y0, y1, x0, x1, buf_b)
                if not sym:
                    norm_a += torch.mul(A, A, out=tmp[: A.numel()].view_as(A)).sum(dim=1)
                    norm_b += torch.mul(B, B, out=tmp[: B.numel()].view_as(B)).sum(dim=1)
                if k == 0:
                    torch.mm(A, B.T, out=dot)
                else:
                    dot.addmm_(A, B.T)
            if sym:  # the squared norms are the diagonal of the same product
                norm_a = norm_b = dot.diagonal().clone()
            total = norm_a[:, None] + norm_b[None, :]
            if fine in best:
                torch.maximum(scale[fine], total, out=scale[fine])
            opened = []
            for g in coarse:
                r = per_side[g]
                acc = partial.get((g, ty // r, tx // r))
                if acc is None:
                    partial[(g, ty // r, tx // r)] = acc = [None, total.clone(), 0]
                else:
                    acc[1] += total
                opened.append(acc)
            sq = total.sub_(dot, alpha=2.0)
            if fine in best:
                torch.maximum(best[fine], sq, out=best[fine])
            for g, acc in zip(coarse, opened):
                acc[0] = sq.clone() if acc[0] is None else acc[0].add_(sq)
                acc[2] += 1
                if acc[2] == per_side[g] ** 2:  # the coarse tile is complete
                    torch.maximum(best[g], acc[0], out=best[g])
                    torch.maximum(scale[g], acc[1], out=scale[g])
                    del partial[(g, ty // per_side[g], tx // per_side[g])]
    out = {}
    for g, r in per_side.items():
        t = t_values * r * r
        out[g] = (best[g].div_(t).clamp_(min=0.0), scale[g].mul_(ERROR_FACTOR * _U / t))
    return out


def _uncertain(d2: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """Pairs whose distance from the product form may be off by more than TOLERANCE."""
    return d2 < (err / TOLERANCE).square()


def _resolve(a: torch.Tensor, b: torch.Tensor | None, pi: torch.Tensor, pj: torch.Tensor, grid: int,
             device: torch.device) -> torch.Tensor:
    """Accurate squared tiled distances of the pairs (a[pi[k]], b[pj[k]]) (float64, (P,)).

    Pairs are grouped into connected components; a large component is recomputed by
    one product with every image centred on one of its members, and what is still
    uncertain after that by direct differences.
    """
    sym = b is None
    xb = a if sym else b
    out = torch.empty(len(pi), dtype=torch.float64, device=device)
    if len(pi) == 0:
        return out
    pi_l, pj_l = pi.tolist(), pj.tolist()
    offset = 0 if sym else int(a.shape[0])
    parent: dict[int, int] = {}

    def find(v: int) -> int:
        root = v
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[v] != root:
            parent[v], v = root, parent[v]
        return root

    for i, j in zip(pi_l, pj_l):
        ri, rj = find(i), find(j + offset)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for k, i in enumerate(pi_l):
        members.setdefault(find(i), []).append(k)
    direct: list[int] = []
    for ks in members.values():
        rows_a = sorted({pi_l[k] for k in ks} | (set() if not sym else {pj_l[k] for k in ks}))
        rows_b = rows_a if sym else sorted({pj_l[k] for k in ks})
        if len(rows_a) + (0 if sym else len(rows_b)) < _REFINE_MIN_ROWS:
            direct.extend(ks)
            continue
        pos_a = {r: n for n, r in enumerate(rows_a)}
        pos_b = pos_a if sym else {r: n for n, r in enumerate(rows_b)}
        ia = torch.tensor(rows_a, dtype=torch.long)
        ib = None if sym else torch.tensor(rows_b, dtype=torch.long)
        d2, err = _gemm_sq(a, None if sym else xb, ia, ib, grid, device, ref=rows_a[0])
        li = torch.tensor([pos_a[pi_l[k]] for k in ks], device=device)
        lj = torch.tensor([pos_b[pj_l[k]] for k in ks], device=device)
        vals, bad = d2[li, lj], _uncertain(d2[li, lj], err[li, lj])
        kt = torch.tensor(ks, device=device)
        out[kt[~bad]] = vals[~bad].to(torch.float64)
        direct.extend(kt[bad].tolist())
    if direct:
        kd = torch.tensor(direct, dtype=torch.long)
        out[kd.to(device)] = _direct_sq(a, xb, pi[kd], pj[kd], grid, device)
    return out


def _fingerprints(x: torch.Tensor, rows: list[int]) -> dict[int, int]:
    """An exact integer digest of each image's bits: equal images always get equal numbers."""
    d = x[0].numel()
    out: dict[int, int] = {}
    bits_of = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
    weights = (torch.arange(d, device=x.device) % 65521 + 1).to(torch.int64)
    per = max(1, CHUNK_BYTES // (16 * d))
    for s in range(0, len(rows), per):
        idx = torch.tensor(rows[s:s + per], dtype=torch.long, device=x.device)
        raw = x[idx].reshape(len(idx), -1).view(bits_of[x.dtype])
        shift = max(0, raw.element_size() * 8 - 24)
        # the 24 high bits times weights below 2^16: no overflow below 2^23 values a image (beyond,
        # int64 wraps around, which only weakens the digest: equality is checked value by value)
        digest = ((raw.to(torch.int64) >> shift) * weights).sum(dim=1)
        out.update(zip(rows[s:s + per], digest.tolist()))
    return out


def _identical(a: torch.Tensor, b: torch.Tensor, pi: list[int], pj: list[int]) -> list[bool]:
    """Whether a[pi[k]] and b[pj[k]] hold the same values: digests, then one comparison per image."""
    fa, fb = _fingerprints(a, sorted(set(pi))), _fingerprints(b, sorted(set(pj)))
    reps: dict[int, torch.Tensor] = {}
    same_a: dict[int, bool] = {}
    same_b: dict[int, bool] = {}
    for row, digest in fa.items():
        rep = reps.setdefault(digest, a[row])
        same_a[row] = bool(torch.equal(a[row], rep))
    for row, digest in fb.items():
        rep = reps.setdefault(digest, b[row])
        same_b[row] = rep.dtype == b.dtype and bool(torch.equal(b[row], rep))
    return [fa[i] == fb[j] and same_a[i] and same_b[j] for i, j in zip(pi, pj)]


def _pairwise_sq(a: torch.Tensor, b: torch.Tensor | None, grid: int, device: torch.device,
                 ia: torch.Tensor | None = None, ib: torch.Tensor | None = None) -> torch.Tensor:
    """Accurate squared tiled distances of rows ia of a against rows ib of b (or of a), float32."""
    return _pairwise_sq_grids(a, b, (grid,), device, ia, ib)[grid]


def _pairwise_sq_grids(a: torch.Tensor, b: torch.Tensor | None, grids: Sequence[int], device: torch.device,
                       ia: torch.Tensor | None = None, ib: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """``_pairwise_sq`` for several grids from one pass of products (``_gemm_sq_grids``).

    Identical images get exactly 0: pairs left below TOLERANCE are compared bit for bit.
    """
    sym = b is None
    rows_a = torch.arange(a.shape[0]) if ia is None else ia.cpu()
    rows_b = rows_a if sym else (torch.arange(b.shape[0]) if ib is None else ib.cpu())
    out = {}
    for grid, (d2, err) in _gemm_sq_grids(a, b, ia, ib, grids, device).items():
        bad = _uncertain(d2, err)
        if sym:
            bad = torch.triu(bad, diagonal=1)
        pi, pj = torch.nonzero(bad, as_tuple=True)
        if len(pi):
            d2[pi, pj] = _resolve(a, b, rows_a[pi.cpu()], rows_b[pj.cpu()], grid, device).to(torch.float32)
        tiny = (d2 > 0) & (d2 < TOLERANCE ** 2)
        if sym:
            tiny = torch.triu(tiny, diagonal=1)
        pi, pj = torch.nonzero(tiny, as_tuple=True)
        if len(pi):
            same = _identical(a, a if sym else b, rows_a[pi.cpu()].tolist(), rows_b[pj.cpu()].tolist())
            keep = torch.tensor(same, dtype=torch.bool, device=device)
            d2[pi[keep], pj[keep]] = 0.0
        if sym:
            upper = torch.triu(d2, diagonal=1)
            d2 = upper + upper.T
        out[grid] = d2
    return out


# ---------------------------------------------------------------------------- public API
def pairwise_tiled_l2(a: Array, b: Array | None = None, grid: int = 4, *,
                      device: str | torch.device | None = None) -> torch.Tensor:
    """Tiled L2 of every image of ``a`` against every image of ``b`` (or of ``a``): (N, M) float32.

    ``D[i, j] = max_p sqrt( sum_{k in tile p} (a[i]_k - b[j]_k)^2 / t )`` over the
    G x G tile positions p (t values per tile). With ``b`` omitted the result
    is exactly symmetric with an exact zero diagonal. Accurate to 5e-5 of direct
    differences (see the module docstring: product form, centring, recomputation).

    """
    ta, tb = _pair(a, b)
    _check_tiles(ta, grid)
    dev = _device(ta, device)
    n, m = int(ta.shape[0]), int(ta.shape[0] if tb is None else tb.shape[0])
    if n == 0 or m == 0:
        return torch.zeros(n, m, dtype=torch.float32, device=dev)
    return _pairwise_sq(ta, tb, grid, dev).sqrt_()


def check_grids(size: int, grids: Sequence[int]) -> tuple[int, ...]:
    """The distinct grids, sorted, after checking that each divides ``size``."""
    if isinstance(grids, (int, np.integer)) or not len(grids):
        raise InputError(f"grids must be a non-empty sequence of grids, got {grids!r}")
    for g in grids:
        check_grid(size, g)
    return tuple(sorted({int(g) for g in grids}))  # their least common multiple divides size too


def pairwise_tiled_l2_grids(a: Array, b: Array | None = None, grids: Sequence[int] = (1, 2, 4, 8), *,
                            device: str | torch.device | None = None) -> dict[int, torch.Tensor]:
    """``pairwise_tiled_l2`` for several grids at once: {grid: (N, M) float32}.

    One pass of matrix products over the tiles of the finest grid (the grids' least
    common multiple, which must divide the image size) serves every grid, so four
    grids cost about what one costs. Each result has the accuracy and the exact
    zeros and symmetry of ``pairwise_tiled_l2``.
    """
    ta, tb = _pair(a, b)
    grids = check_grids(int(ta.shape[1]), grids)
    check_grids(int(ta.shape[2]), grids)
    dev = _device(ta, device)
    n, m = int(ta.shape[0]), int(ta.shape[0] if tb is None else tb.shape[0])
    if n == 0 or m == 0:
        return {g: torch.zeros(n, m, dtype=torch.float32, device=dev) for g in grids}
    return {g: d2.sqrt_() for g, d2 in _pairwise_sq_grids(ta, tb, grids, dev).items()}


def pairwise_l2(a: Array, b: Array | None = None, *, device: str | torch.device | None = None) -> torch.Tensor:
    """Normalised L2 ``sqrt( sum_k (a[i]_k - b[j]_k)^2 / d )`` of every pair: (N, M) float32.

    The tiled L2 with a 1 x 1 grid: same accuracy and memory bound.
    """
    return pairwise_tiled_l2(a, b, 1, device=device)


def paired_tiled_l2(a: Array, b: Array, grid: int = 4, *, device: str | torch.device | None = None) -> torch.Tensor:
    """Tiled L2 of a[i] against b[i] for every i: (N,) float32, from direct differences summed in float64."""
    ta, tb = _pair(a, b)
    if ta.shape[0] != tb.shape[0]:
        raise InputError(f"a holds {ta.shape[0]} images but b holds {tb.shape[0]}; paired distances need as many of each")
    _check_tiles(ta, grid)
    dev = _device(ta, device)
    idx = torch.arange(ta.shape[0])
    return _direct_sq(ta, tb, idx, idx, grid, dev).sqrt_().to(torch.float32)


def paired_l2(a: Array, b: Array, *, device: str | torch.device | None = None) -> torch.Tensor:
    """Normalised L2 ``sqrt( sum_k (a[i]_k - b[i]_k)^2 / d )`` for every i: (N,) float32, direct differences."""
    return paired_tiled_l2(a, b, 1, device=device)


def paired_distances(a: Array, b: Array, grid: int = 4, *, ia: Array | None = None, ib: Array | None = None,
                     device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(l2, tiled_l2) of a[ia[k]] against b[ib[k]] for every k, from one pass of direct differences.

    Each (P,) float32. ``ia``/``ib`` (integer indices, default: every row, aligned)
    select the pairs, so neither side needs repeating in memory: 500 generations
    against their 50 nearest training images is ``ia = repeat(arange(500), 50)``,
    ``ib = nearest.ravel()``. Pairs are gathered a chunk at a time. The plain L2 comes
    from the same per-tile sums (tiles are equal, so l2^2 is the mean of the tiles'
    squared distances): the same values as ``paired_l2`` and ``paired_tiled_l2``.
    """
    l2, tiled = paired_distances_grids(a, b, (grid,), ia=ia, ib=ib, device=device)
    return l2, tiled[grid]


def paired_distances_grids(a: Array, b: Array, grids: Sequence[int], *, ia: Array | None = None, ib: Array | None = None,
                           device: str | torch.device | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(l2, {grid: tiled_l2}) of the pairs of ``paired_distances`` for several grids from one pass:
    the squared sums of the finest grid's tiles add up to those of every coarser grid."""
    ta, tb = _pair(a, b)
    grids = check_grids(int(ta.shape[1]), grids)
    check_grids(int(ta.shape[2]), grids)
    dev = _device(ta, device)
    idx = []
    for name, ix, rows in (("ia", ia, int(ta.shape[0])), ("ib", ib, int(tb.shape[0]))):
        if ix is None:
            idx.append(torch.arange(rows))
            continue
        t = (ix if isinstance(ix, torch.Tensor) else torch.as_tensor(np.asarray(ix))).reshape(-1).cpu()
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"{name} must hold integer indices, got dtype {t.dtype}")
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= rows):
            raise InputError(f"{name} holds indices outside 0..{rows - 1}")
        idx.append(t.to(torch.long))
    if len(idx[0]) != len(idx[1]):
        raise InputError(f"the pairs need as many on each side: {len(idx[0])} from a (ia) but {len(idx[1])} from b (ib)")
    fine = _fine_grid(grids)
    tiles = _direct_tiles(ta, tb, idx[0], idx[1], fine, dev)  # (P, fine * fine): mean squared difference per tile
    p = tiles.shape[0]
    tiled = {}
    for g in grids:
        r = fine // g
        tiled[g] = tiles.view(p, g, r, g, r).mean(dim=(2, 4)).flatten(1).amax(dim=1).sqrt().to(torch.float32)
    return tiles.mean(dim=1).sqrt().to(torch.float32), tiled


def _as_vector_batch(x: Array, name: str, ndim: int) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise InputError(f"{name} must hold numbers, got dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    elif isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise InputError(f"{name} must hold real numbers, got dtype {x.dtype}")
        t = x.detach().to(torch.float64)
    else:
        raise InputError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if t.ndim != ndim:
        want = "(N,)" if ndim == 1 else "(N, n)" if name == "d_neighbours" else "(N, D)"
        raise InputError(f"{name} must have shape {want}, got shape {tuple(t.shape)}")
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    return t


def relative_l2(d_target: Array, d_neighbours: Array, alpha: float = 0.5) -> torch.Tensor:
    """``rel[i] = d_target[i] / (alpha * mean_j d_neighbours[i, j])``: (N,) float32.

    ``d_target[i]`` is l2(x_hat_i, x_i); row i of ``d_neighbours`` holds l2(x_hat_i, y)
    for the n training images y nearest to x_hat_i (the set S; n = its columns).
    A generation counts as extracted when rel < 1. Where the mean is 0 (x_hat
    equals all of S) the result is 0 if d_target is 0, else +inf.
    """
    t = _as_vector_batch(d_target, "d_target", 1)
    nb = _as_vector_batch(d_neighbours, "d_neighbours", 2)
    if nb.shape[0] != t.shape[0] or nb.shape[1] < 1:
        raise InputError(f"d_neighbours must have shape ({t.shape[0]}, n) with n >= 1 to match d_target, "
                         f"got shape {tuple(nb.shape)}")
    try:
        ok = float(alpha) > 0 and np.isfinite(float(alpha))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"alpha must be a number > 0, got {alpha!r}")
    if (t < 0).any() or (nb < 0).any():
        raise InputError("distances must be >= 0, got a negative value")
    denom = float(alpha) * nb.mean(dim=1)
    out = torch.where(t == 0, torch.zeros_like(t), t / denom)  # t > 0, denom 0 -> inf
    return out.to(torch.float32)


def cosine_distance(x: Array, y: Array | None = None) -> torch.Tensor:
    """``1 - x_i . y_j / (|x_i| |y_j|)`` for embeddings x (N, D), y (M, D): (N, M) float32 in [0, 2].

    Computed in float64 (near-identical embeddings are resolved to ~1e-15); with
    ``y`` omitted the diagonal is exactly 0. A zero embedding has no direction
    and raises InputError.
    """
    tx = _as_vector_batch(x, "x", 2)
    ty = tx if y is None else _as_vector_batch(y, "y", 2)
    if ty.shape[1] != tx.shape[1]:
        raise InputError(f"x has {tx.shape[1]}-d embeddings but y has {ty.shape[1]}-d ones; use one embedder for both")
    ty = ty.to(tx.device)
    out = []
    for name, t in (("x", tx), ("y", ty)):
        norm = torch.linalg.vector_norm(t, dim=1, keepdim=True)
        if t.shape[0] and bool((norm == 0).any()):
            row = int(torch.nonzero(norm[:, 0] == 0)[0])
            raise InputError(f"{name} row {row} is an all-zero embedding, which has no direction; drop it")
        out.append(t / norm)
    dist = (1.0 - out[0] @ out[1].T).clamp_(0.0, 2.0)
    if y is None:
        dist.fill_diagonal_(0.0)
    return dist.to(torch.float32)
