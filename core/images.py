"""Reading, normalising and writing images, with one clear error for every bad file.

The working-resolution rule (used wherever two images of different sizes are
compared): centre-crop to a square on the short side, then resize to S x S with
PIL's area-averaging filter (``Image.BOX``) when shrinking and bicubic when
enlarging. Pixels are then scaled to [0, 1]. Alpha is composited over white,
palette and grayscale images become RGB, 16-bit images are scaled to 8 bits.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import tempfiles
from .errors import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Images over this many pixels are refused before decoding (a decompression bomb
# declares a huge size in a tiny file). 8192 x 8192 is far above any diffusion output.
MAX_PIXELS = 8192 * 8192


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully decoded as RGB, or raise ImageError with one sentence naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{path}: declares {w} x {h} pixels, over the {MAX_PIXELS} limit (refused as a possible decompression bomb)")
                img.load()
                return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: declared size is too large (refused as a possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from None


def to_working(img: Image.Image, size: int) -> np.ndarray:
    """Apply the working-resolution rule; return float32 H x W x 3 in [0, 1]."""
    w, h = img.size
    s = min(w, h)
    if w != h:
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BOX if s > size else Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def load_working(path: str | Path, size: int) -> np.ndarray:
    return to_working(load_image(path), size)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """float [0, 1] H x W x C (or uint8) -> uint8 H x W x 3."""
    if array.dtype != np.uint8:
        array = np.clip(np.asarray(array, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return array


def png_bytes(array_or_image: np.ndarray | Image.Image) -> bytes:
    """The PNG encoding of an image (float [0, 1] or uint8 pixels, or a PIL image): memaudit's one PNG encoder."""
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(to_uint8(array_or_image))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_png_atomic(image: np.ndarray | Image.Image | bytes, path: str | Path) -> None:
    """Write a PNG so that the file is either absent or complete, even if the process is killed.

    ``image`` is pixels or a PIL image, or bytes ``png_bytes`` returned (written as they are,
    so a caller that hashes the encoding stores exactly the bytes it hashed).
    """
    tempfiles.write_bytes_atomic(path, image if isinstance(image, bytes) else png_bytes(image))
