"""core.distances: formulas, numerics near zero, exact pruning, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import core.distances as distances
from core.distances import (
    check_grid, cosine_distance, paired_l2, paired_tiled_l2, pairwise_l2, pairwise_tiled_l2,
    relative_l2,
)
from core.errors import InputError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_tiled(a: np.ndarray, b: np.ndarray, grid: int) -> np.ndarray:
    """Direct differences in float64, one pair at a time: the definition, nothing clever."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n, h, w, c = a.shape
    th, tw = h // grid, w // grid
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            sq = (a[i] - b[j]) ** 2
            tiles = [sq[y:y + th, x:x + tw].sum() / (th * tw * c) for y in range(0, h, th) for x in range(0, w, tw)]
            out[i, j] = np.sqrt(max(tiles))
    return out


def photographs(size: int) -> np.ndarray:
    """Real images with structure (scikit-image ships them), centre-cropped and resized to size x size."""
    from PIL import Image
    from skimage import data

    from core.images import to_working

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel"):
        arr = getattr(data, name)()[..., :3]
        out.append(to_working(Image.fromarray(arr), size))
    return np.stack(out)


def near_copies(rng: np.random.Generator, base: np.ndarray, scales: list[float]) -> np.ndarray:
    """base, an identical copy, and noisy copies at the given noise scales (clipped to [0, 1])."""
    rows = [base, base.copy()]
    rows += [np.clip(base + s * rng.standard_normal(base.shape), 0, 1).astype(np.float32) for s in scales]
    return np.stack(rows)


# ---------------------------------------------------------------------------- formulas
def test_l2_and_tiled_l2_hand_computed():
    a = np.zeros((1, 2, 2, 1), np.float32)
    b = a.copy()
    b[0, 0, 0, 0] = 1.0  # one value of four differs by 1
    assert pairwise_l2(a, b).item() == pytest.approx(np.sqrt(1 / 4))
    assert paired_l2(a, b).item() == pytest.approx(0.5)
    # 2 x 2 grid of 1-value tiles: the differing tile has distance 1
    assert pairwise_tiled_l2(a, b, grid=2).item() == pytest.approx(1.0)
    assert paired_tiled_l2(a, b, 2).item() == pytest.approx(1.0)
    # three channels, a 4 x 4 image, grid 2: tile (0, 1) differs by 0.5 in 3 of its 12 values
    a = np.full((1, 4, 4, 3), 0.25, np.float32)
    b = a.copy()
    b[0, 0, 2, :] = 0.75
    assert pairwise_l2(a, b).item() == pytest.approx(np.sqrt(3 * 0.25 / 48))
    assert pairwise_tiled_l2(a, b, grid=2).item() == pytest.approx(np.sqrt(3 * 0.25 / 12))
    assert pairwise_tiled_l2(a, b, grid=4).item() == pytest.approx(np.sqrt(3 * 0.25 / 3))
    # grid 1 is plain L2
    assert pairwise_tiled_l2(a, b, grid=1).item() == pairwise_l2(a, b).item()


def test_pairwise_matches_the_definition_on_photographs():
    x = photographs(64)
    for grid in (1, 2, 4, 8):
        got = pairwise_tiled_l2(x, grid=grid).numpy()
        np.testing.assert_allclose(got, reference_tiled(x, x, grid), atol=5e-5, rtol=0)
        got = pairwise_tiled_l2(x[:2], x[1:], grid=grid).numpy()
        np.testing.assert_allclose(got, reference_tiled(x[:2], x[1:], grid), atol=5e-5, rtol=0)


def test_relative_l2_hand_computed():
    rel = relative_l2(np.array([0.1, 0.2, 0.0, 0.3]),
                      np.array([[0.1, 0.3], [0.2, 0.2], [0.0, 0.0], [0.0, 0.0]]), alpha=0.5)
    np.testing.assert_allclose(rel.numpy()[:3], [0.1 / (0.5 * 0.2), 0.2 / (0.5 * 0.2), 0.0], rtol=1e-6)
    assert rel[3].item() == float("inf")
    assert relative_l2(torch.tensor([0.05]), torch.tensor([[0.1]]), alpha=0.25).item() == pytest.approx(2.0)


def test_cosine_distance_hand_computed():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
    d = cosine_distance(x).numpy()
    assert d[0, 1] == pytest.approx(1.0) and d[0, 2] == pytest.approx(2.0)
    assert d[0, 3] == pytest.approx(1 - 1 / np.sqrt(2))
    assert np.all(np.diag(d) == 0) and np.array_equal(d, d.T)
    # near-identical embeddings are resolved, not rounded to 0 or to 1e-7 noise
    e = np.array([[1.0, 1e-4]])
    assert cosine_distance(np.array([[1.0, 0.0]]), e).item() == pytest.approx(1 - 1 / np.sqrt(1 + 1e-8), rel=1e-3)
    assert cosine_distance(x[:1], np.array([[5.0, 0.0]])).item() == 0.0


def test_flat_background_trap():
    """Equal except one corner tile: plain L2 calls them close, tiled L2 does not."""
    a = np.full((1, 32, 32, 3), 0.5, np.float32)
    b = a.copy()
    b[0, :8, :8, :] = 0.9  # one tile of the 4 x 4 grid (1/16 of the image)
    plain = pairwise_l2(a, b).item()
    tiled = pairwise_tiled_l2(a, b, grid=4).item()
    assert plain == pytest.approx(0.1, abs=1e-6)  # sqrt(0.16 / 16)
    assert tiled == pytest.approx(0.4, abs=1e-6)
    assert plain < 0.15 < tiled  # an edge at tau = 0.15 under plain L2, none under tiled L2


# ---------------------------------------------------------------------------- properties
images = st.integers(1, 4).flatmap(lambda n: st.sampled_from([(4, 1), (8, 3), (8, 1)]).flatmap(
    lambda hc: hnp.arrays(np.float32, (n, hc[0], hc[0], hc[1]), elements=st.floats(0, 1, width=32))))


@settings(max_examples=60, deadline=None)
@given(x=images, grid=st.sampled_from([1, 2, 4]))
def test_properties(x, grid):
    d = pairwise_tiled_l2(x, grid=grid)
    plain = pairwise_l2(x)
    assert torch.equal(d, d.T)  # exactly symmetric
    assert torch.all(torch.diagonal(d) == 0)
    assert torch.all(pairwise_tiled_l2(x, x, grid=grid).diagonal() == 0)  # identical images: exactly 0
    assert torch.all(paired_tiled_l2(x, x.copy(), grid) == 0)
    assert torch.all(d >= plain - 5e-5)  # a maximum over tiles is at least their mean
    ref = reference_tiled(x, x, grid)
    np.testing.assert_allclose(d.numpy(), ref, atol=5e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(x=images)
def test_pairwise_agrees_with_paired(x):
    y = x[::-1].copy()
    d = pairwise_tiled_l2(x, y, grid=2)
    for i in range(len(x)):
        row = paired_tiled_l2(np.repeat(x[i:i + 1], len(y), 0), y, 2)
        np.testing.assert_allclose(d[i].numpy(), row.numpy(), atol=5e-5, rtol=0)


def test_paired_distances_by_index_match_the_paired_functions():
    rng = np.random.default_rng(5)
    gens, train = rng.random((6, 16, 16, 3), dtype=np.float32), rng.random((9, 16, 16, 3), dtype=np.float32)
    ia = np.repeat(np.arange(6), 4)
    ib = rng.integers(0, 9, size=24)
    l2, tiled = distances.paired_distances(gens, train, 4, ia=ia, ib=ib)
    np.testing.assert_allclose(l2.numpy(), paired_l2(gens[ia], train[ib]).numpy(), rtol=1e-6)
    assert torch.equal(tiled, paired_tiled_l2(gens[ia], train[ib], 4))
    np.testing.assert_allclose(tiled.numpy(), [reference_tiled(gens[i:i + 1], train[j:j + 1], 4)[0, 0]
                                               for i, j in zip(ia, ib)], atol=1e-6)
    l2, tiled = distances.paired_distances(gens, train[:6], 2)
    assert torch.equal(tiled, paired_tiled_l2(gens, train[:6], 2))
    with pytest.raises(InputError, match="6 from a \\(ia\\) but 24 from b"):
        distances.paired_distances(gens, train, 4, ib=ib)
    with pytest.raises(InputError, match="ib holds indices outside 0..8"):
        distances.paired_distances(gens, train, 4, ia=[0], ib=[9])
    with pytest.raises(InputError, match="ia must hold integer indices"):
        distances.paired_distances(gens, train, 4, ia=[0.5], ib=[1])


# ---------------------------------------------------------------------------- several grids at once
@settings(max_examples=40, deadline=None)
@given(x=images)
def test_several_grids_in_one_pass_match_each_grid_alone(x):
    grids = [g for g in (1, 2, 4, 8) if x.shape[1] % g == 0]
    both = distances.pairwise_tiled_l2_grids(x, grids=grids)
    assert sorted(both) == grids
    for g in grids:
        d = both[g]
        assert torch.equal(d, d.T) and torch.all(torch.diagonal(d) == 0)
        np.testing.assert_allclose(d.numpy(), reference_tiled(x, x, g), atol=5e-5, rtol=0)
    two = distances.pairwise_tiled_l2_grids(x, x[::-1].copy(), grids=grids)
    for g in grids:
        np.testing.assert_allclose(two[g].numpy(), reference_tiled(x, x[::-1], g), atol=5e-5, rtol=0)


def test_several_grids_are_exact_near_zero_and_on_photographs(monkeypatch):
    """Copies, near copies and photographs: every grid from one pass agrees with the definition,
    identical images are exactly 0, also with bands smaller than a tile."""
    rng = np.random.default_rng(3)
    photos = photographs(64)
    x = np.concatenate([near_copies(rng, photos[0], [1e-5, 1e-3, 1e-2]), photos[1:]])
    for chunk in (distances.CHUNK_BYTES, 16 * 3 * 4 * 12 * 3):
        monkeypatch.setattr(distances, "CHUNK_BYTES", chunk)
        out = distances.pairwise_tiled_l2_grids(x, grids=(1, 2, 4, 8))
        for g, d in out.items():
            ref = reference_tiled(x, x, g)
            assert np.abs(d.numpy() - ref).max() <= distances.TOLERANCE
            assert d[0, 1] == 0.0 and np.array_equal(d.numpy() == 0, ref == 0)
            np.testing.assert_allclose(d.numpy(), pairwise_tiled_l2(x, grid=g).numpy(), atol=1e-5, rtol=0)


def test_grids_that_do_not_nest_still_agree():
    """2 and 3 share no tiles: the 6 x 6 tiles serve both (partial sums stay open longer)."""
    x = photographs(12)
    out = distances.pairwise_tiled_l2_grids(x, grids=(3, 2))
    for g in (2, 3):
        np.testing.assert_allclose(out[g].numpy(), reference_tiled(x, x, g), atol=5e-5, rtol=0)


def test_paired_distances_for_several_grids():
    rng = np.random.default_rng(6)
    gens, train = rng.random((5, 16, 16, 3), dtype=np.float32), rng.random((7, 16, 16, 3), dtype=np.float32)
    ia, ib = np.repeat(np.arange(5), 3), rng.integers(0, 7, size=15)
    l2, tiled = distances.paired_distances_grids(gens, train, (1, 2, 4, 8), ia=ia, ib=ib)
    np.testing.assert_allclose(l2.numpy(), paired_l2(gens[ia], train[ib]).numpy(), rtol=1e-6)
    for g, t in tiled.items():
        np.testing.assert_allclose(t.numpy(), paired_tiled_l2(gens[ia], train[ib], g).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(tiled[1].numpy(), l2.numpy(), rtol=1e-6)


@pytest.mark.parametrize("grids, message", [
    ((), "non-empty sequence"),
    (4, "non-empty sequence"),
    ((2, 3), "grid 3 does not divide the working size 16"),
    ((0,), "positive integer"),
])
def test_bad_grid_sets_raise(grids, message):
    x = np.zeros((2, 16, 16, 3), np.float32)
    with pytest.raises(InputError, match=message):
        distances.pairwise_tiled_l2_grids(x, grids=grids)


# ---------------------------------------------------------------------------- near zero
def test_product_form_is_exact_near_zero():
    """Identical images give exactly 0; near copies agree with direct differences to 1e-4."""
    rng = np.random.default_rng(1)
    photos = photographs(128)
    x = np.concatenate([near_copies(rng, p, [1e-5, 1e-4, 1e-3, 3e-3, 1e-2]) for p in photos[:3]] + [photos[3:]])
    d = pairwise_tiled_l2(x, grid=4).numpy()
    ref = reference_tiled(x, x, 4)
    assert np.abs(d - ref).max() <= 1e-4
    assert np.abs(d - ref).max() <= distances.TOLERANCE
    for k in range(3):
        assert d[7 * k, 7 * k + 1] == 0.0  # the identical copy
        assert d[7 * k, 7 * k + 2] < 1e-4 and d[7 * k, 7 * k + 2] == pytest.approx(ref[7 * k, 7 * k + 2], abs=1e-7)
    # a batch against an identical batch: exact zero diagonal, and plain L2 too
    assert np.all(np.diag(pairwise_tiled_l2(x, x.copy(), grid=4).numpy()) == 0)
    assert np.all(np.diag(pairwise_l2(x, x.copy()).numpy()) == 0)
    np.testing.assert_allclose(pairwise_l2(x).numpy(), reference_tiled(x, x, 1), atol=1e-4, rtol=0)


def test_clusters_of_copies_are_recomputed_exactly():
    """Many identical and near-identical images (the refinement path), beside unrelated ones."""
    rng = np.random.default_rng(2)
    photos = photographs(32)
    copies = np.repeat(photos[:1], 12, axis=0)
    copies[::3] = np.clip(copies[::3] + 1e-4 * rng.standard_normal(copies[::3].shape), 0, 1)
    x = np.concatenate([copies, photos[1:], np.repeat(photos[1:2], 7, axis=0)])
    d = pairwise_tiled_l2(x, grid=4).numpy()
    ref = reference_tiled(x, x, 4)
    assert np.abs(d - ref).max() <= distances.TOLERANCE
    identical = ref == 0
    assert np.array_equal(d == 0, identical)
    assert identical.sum() > len(x) + 50


def test_small_bands_give_the_same_answer(monkeypatch):
    """Bands smaller than a tile (the memory bound at scale) change nothing beyond rounding."""
    x = photographs(64)
    whole = pairwise_tiled_l2(x, x[::-1], grid=2).numpy()
    monkeypatch.setattr(distances, "CHUNK_BYTES", 64 * 3 * 4 * 12 * 3)  # about 3 image rows of a tile per band
    assert distances._bands(x.shape, 2, 12).rows_per_band < 32
    np.testing.assert_allclose(pairwise_tiled_l2(x, x[::-1], grid=2).numpy(), whole, atol=1e-6, rtol=0)


def test_inputs_numpy_torch_float64_agree():
    x = photographs(32)
    a = pairwise_tiled_l2(x, grid=4)
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(pairwise_tiled_l2(torch.from_numpy(x), grid=4), a)
    np.testing.assert_allclose(pairwise_tiled_l2(x.astype(np.float64), grid=4).numpy(), a.numpy(), atol=1e-5)
    assert torch.equal(pairwise_tiled_l2(x, grid=4, device="cpu"), a)
    assert pairwise_tiled_l2(x[:0], x, grid=4).shape == (0, len(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_cpu():
    rng = np.random.default_rng(3)
    x = np.concatenate([near_copies(rng, p, [1e-4, 1e-3]) for p in photographs(64)])
    cpu = pairwise_tiled_l2(x, grid=4)
    gpu = pairwise_tiled_l2(torch.from_numpy(x).cuda(), grid=4)
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-4, rtol=0)
    assert torch.all(gpu.diagonal() == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grids_and_paired_distances_agree_with_cpu_and_identical_images_are_exactly_zero():
    """What the audit computes on CUDA (audit_device cuda): every grid at once, and indexed pairs."""
    from core.distances import paired_distances_grids, pairwise_tiled_l2_grids

    rng = np.random.default_rng(5)
    x = np.concatenate([near_copies(rng, p, [1e-4, 1e-3]) for p in photographs(64)])  # rows 4k and 4k + 1 identical
    grids = (1, 2, 4, 8)
    cpu = pairwise_tiled_l2_grids(x, grids=grids)
    gpu = pairwise_tiled_l2_grids(x, grids=grids, device="cuda")
    copies = torch.arange(0, len(x), 4)
    for g in grids:
        d = gpu[g]
        assert d.device.type == "cuda"
        np.testing.assert_allclose(d.cpu().numpy(), cpu[g].numpy(), atol=1e-4, rtol=0)
        assert torch.all(d.diagonal() == 0) and torch.equal(d, d.T)
        assert torch.all(d[copies, copies + 1].cpu() == 0)  # identical images at different rows: exactly 0
    ia, ib = np.repeat(np.arange(len(x)), 3), rng.integers(0, len(x), 3 * len(x))
    ib[::3] = np.where(ia[::3] % 4 == 0, ia[::3] + 1, ia[::3])  # every third pair: an identical image or the same row
    l2_cpu, tiled_cpu = paired_distances_grids(x, x, grids, ia=ia, ib=ib)
    l2_gpu, tiled_gpu = paired_distances_grids(x, x, grids, ia=ia, ib=ib, device="cuda")
    np.testing.assert_allclose(l2_gpu.cpu().numpy(), l2_cpu.numpy(), atol=1e-4, rtol=0)
    for g in grids:
        np.testing.assert_allclose(tiled_gpu[g].cpu().numpy(), tiled_cpu[g].numpy(), atol=1e-4, rtol=0)
        assert torch.all(tiled_gpu[g][::3].cpu() == 0)
    assert torch.all(l2_gpu[::3].cpu() == 0)


# ---------------------------------------------------------------------------- errors
def test_check_grid_message():
    check_grid(32, 4)
    with pytest.raises(InputError, match=r"^grid 3 does not divide the working size 32; choose a grid that divides it"):
        check_grid(32, 3)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(InputError, match="grid must be a positive integer"):
            check_grid(32, bad)
    with pytest.raises(InputError, match="grid 3 does not divide the working size 32"):
        pairwise_tiled_l2(np.zeros((2, 32, 32, 3), np.float32), grid=3)
    with pytest.raises(InputError, match="grid 4 does not divide the working size 30"):
        paired_tiled_l2(np.zeros((2, 30, 30, 3), np.float32), np.zeros((2, 30, 30, 3), np.float32), 4)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((32, 32, 3), np.float32), r"a must have shape \(N, H, W, C\).*got shape \(32, 32, 3\)"),
    (np.zeros((2, 0, 32, 3), np.float32), r"a must have shape"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"a must hold floats in \[0, 1\], got dtype uint8; divide 8-bit pixels by 255"),
    (torch.zeros(2, 8, 8, 3, dtype=torch.int64), r"a must hold floats"),
    (np.full((2, 8, 8, 3), 255.0, np.float32), r"a values must lie in \[0, 1\], got range \[255, 255\]; divide"),
    (np.full((2, 8, 8, 3), np.nan, np.float32), r"a values must lie in \[0, 1\]"),
    ([[[[0.0]]]], r"a must be a numpy array or torch tensor"),
])
def test_bad_images_raise(bad, message):
    with pytest.raises(InputError, match=message):
        pairwise_tiled_l2(bad, grid=1)


def test_mismatched_batches_raise():
    a = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(InputError, match=r"a holds images of shape \(8, 8, 3\) but b holds \(16, 16, 3\)"):
        pairwise_l2(a, np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(InputError, match=r"a holds images of shape \(8, 8, 3\) but b holds \(8, 8, 1\)"):
        paired_l2(a, np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(InputError, match="a holds 2 images but b holds 3"):
        paired_tiled_l2(a, np.zeros((3, 8, 8, 3), np.float32), 2)


def test_relative_and_cosine_errors():
    with pytest.raises(InputError, match=r"d_neighbours must have shape \(2, n\)"):
        relative_l2(np.zeros(2), np.zeros((3, 4)))
    with pytest.raises(InputError, match=r"d_target must have shape \(N,\)"):
        relative_l2(np.zeros((2, 1)), np.zeros((2, 4)))
    with pytest.raises(InputError, match="alpha must be a number > 0"):
        relative_l2(np.zeros(2), np.ones((2, 4)), alpha=0)
    with pytest.raises(InputError, match="NaN"):
        relative_l2(np.array([np.nan]), np.ones((1, 4)))
    with pytest.raises(InputError, match=">= 0"):
        relative_l2(np.array([-0.1]), np.ones((1, 4)))
    with pytest.raises(InputError, match="x row 1 is an all-zero embedding"):
        cosine_distance(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(InputError, match="x has 2-d embeddings but y has 3-d"):
        cosine_distance(np.ones((1, 2)), np.ones((1, 3)))
    with pytest.raises(InputError, match=r"x must have shape \(N, D\)"):
        cosine_distance(np.ones(3))
