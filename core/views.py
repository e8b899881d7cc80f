"""Image preparation for the dashboard and the HTML report: workspace images at display size,
inpainting inputs as the model saw them, difference maps, blends and PNG data URIs.

The queries behind the pages live in ``core.results`` (runs, candidates, counts) and
``core.recount`` (live re-thresholding)."""

from __future__ import annotations

import base64

import numpy as np

from .store import Workspace

def upscale_nearest(array: np.ndarray, min_side: int) -> np.ndarray:
    """Enlarge (H, W, C) uint8 by the integer factor ceil(min_side / min(H, W)) with nearest neighbour,
    so that every source pixel stays a visible square; images already that large are returned as is."""
    h, w = array.shape[:2]
    factor = max(1, -(-min_side // max(1, min(h, w))))
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def display_image(ws: Workspace, relpath: str, min_side: int = 192) -> np.ndarray:
    """A workspace image as uint8 (H, W, 3), enlarged with nearest neighbour when its short side is below ``min_side``."""
    from .images import load_image

    return upscale_nearest(np.asarray(load_image(ws.resolve(relpath)), dtype=np.uint8), min_side)


MASK_SHADE = (128, 128, 128)  # how a masked input shows the region the model had to reconstruct


def masked_input(ws: Workspace, image_path: str, mask_path: str, min_side: int = 0) -> np.ndarray:
    """An inpainting input as the model saw it: the stored original with the mask's white region painted
    grey, uint8 (H, W, 3), enlarged with nearest neighbour to at least ``min_side``."""
    from .errors import ImageError
    from .images import load_image

    img = np.array(load_image(ws.resolve(image_path)), dtype=np.uint8)
    mask = np.asarray(load_image(ws.resolve(mask_path)).convert("L")) >= 128
    if mask.shape != img.shape[:2]:
        raise ImageError(f"{mask_path} is not the size of {image_path}; the run's files were changed")
    img[mask] = MASK_SHADE
    return upscale_nearest(img, min_side)


def pair_arrays(ws: Workspace, generation_path: str, training_path: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A generation and a training image at one resolution (the working-resolution rule), float32 in [0, 1].

    ``size`` defaults to the generation's short side."""
    from .images import load_image, to_working

    gen = load_image(ws.resolve(generation_path))
    size = size or min(gen.size)
    return to_working(gen, size), to_working(load_image(ws.resolve(training_path)), size)


def difference_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel |a - b| averaged over channels: (H, W) float32 in [0, 1]. Shapes must match."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean(axis=2)


# Anchors of the magma colour map (black -> purple -> orange -> pale yellow), evenly spaced.
MAGMA = np.array([[0, 0, 4], [24, 15, 61], [68, 15, 118], [114, 31, 129], [158, 47, 127], [205, 64, 113],
                  [241, 96, 93], [253, 150, 104], [254, 202, 141], [252, 253, 191]], dtype=np.float32)


def colour_map(values: np.ndarray, vmax: float) -> np.ndarray:
    """(H, W) values in [0, vmax] -> (H, W, 3) uint8 through MAGMA, linear between anchors; above vmax saturates."""
    if vmax <= 0:
        raise ValueError(f"vmax must be positive, got {vmax}")
    t = np.clip(np.asarray(values, np.float32) / vmax, 0.0, 1.0) * (len(MAGMA) - 1)
    lo = np.minimum(t.astype(np.int64), len(MAGMA) - 2)
    frac = (t - lo)[..., None]
    return np.round(MAGMA[lo] * (1 - frac) + MAGMA[lo + 1] * frac).astype(np.uint8)


DIFFERENCE_VMAX = 0.25  # one fixed scale, so that colours compare across candidates


def difference_image(a: np.ndarray, b: np.ndarray, vmax: float = DIFFERENCE_VMAX) -> tuple[np.ndarray, float]:
    """The per-pixel |a - b| as a colour image on a fixed scale (black 0, pale yellow >= ``vmax``), and ``vmax``."""
    return colour_map(difference_map(a, b), vmax), float(vmax)


def blend(a: np.ndarray, b: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(1 - alpha) * a + alpha * b, for an overlay of a generation on its training image."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return (1.0 - alpha) * np.asarray(a, np.float32) + alpha * np.asarray(b, np.float32)


def data_uri(array: np.ndarray) -> str:
    """A PNG data URI (for HTML that must not reference any file or URL)."""
    from .images import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode("ascii")


def file_data_uri(ws: Workspace, relpath: str, min_side: int = 0) -> str:
    """A workspace image as a PNG data URI, enlarged with nearest neighbour to ``min_side`` when smaller."""
    return data_uri(display_image(ws, relpath, min_side))


def distinct_neighbours(neighbours: list) -> list:
    """Neighbours with identical files (same SHA-256, e.g. the 100 copies of a duplicated image)
    kept once, at their best rank; their duplicate count still says how many there are."""
    seen: set[str] = set()
    out = []
    for n in neighbours:
        if n.training.sha256 not in seen:
            seen.add(n.training.sha256)
            out.append(n)
    return out
