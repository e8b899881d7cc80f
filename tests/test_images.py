"""core.images: the audit's 8-bit levels are the same whichever decoder reads a file."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from core import images
from core.errors import ImageError


def _pixels(size: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16", "RGB-transparent"])
def test_levels_are_pil_s_levels_for_every_kind_of_png(tmp_path, mode):
    arr = _pixels()
    path = tmp_path / "x.png"
    if mode == "RGBA":
        Image.fromarray(np.concatenate([arr, arr[..., :1]], axis=2), "RGBA").save(path)
    elif mode == "P":
        Image.fromarray(arr).convert("P").save(path)
    elif mode == "L":
        Image.fromarray(arr[..., 0]).save(path)
    elif mode == "I;16":
        Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(path)
    elif mode == "RGB-transparent":
        Image.fromarray(arr).save(path, transparency=(int(arr[0, 0, 0]), int(arr[0, 0, 1]), int(arr[0, 0, 2])))
    else:
        Image.fromarray(arr).save(path)
    want = images.to_levels(images.load_image(path), 24)
    assert np.array_equal(images.load_levels(path, 24), want)
    assert np.array_equal(images.load_levels(path, 12), images.to_levels(images.load_image(path), 12))
    assert np.array_equal(images.load_working(path, 24), want.astype(np.float32) / 255.0)
    fast = images._png_levels(path, 24)
    assert (fast is not None) == (mode == "RGB") and (fast is None or np.array_equal(fast, want))


def test_a_png_libpng_refuses_is_reported_by_pil_in_one_sentence(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(_pixels()).save(path)
    path.write_bytes(path.read_bytes()[:200])  # truncated inside the image data
    assert images._png_levels(path, 24) is None
    with pytest.raises(ImageError, match="cut.png"):
        images.load_levels(path, 24)


def test_without_imagecodecs_pil_decodes(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    Image.fromarray(_pixels()).save(path)
    want = images.load_levels(path, 24)
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # import fails
    assert images._png_levels(path, 24) is None
    assert np.array_equal(images.load_levels(path, 24), want)
