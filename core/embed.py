"""Embedders: images -> float32 vectors for the training index.

Two embedders share one interface (``name``, ``dim``, ``metric``, ``params``,
``embed(images) -> float32 (N, dim)``), built by ``get_embedder(name, settings)``.

``pixel`` (metric ``l2``)
    Centre-crop each image to a square on its short side (the working-resolution
    rule of ``core.images``), area-average it to ``s x s`` (``s`` = setting
    ``pixel_size``) and flatten the ``d = 3 s^2`` values in [0, 1], divided by
    ``sqrt(d)``. The Euclidean distance between two embeddings is then exactly the
    normalised L2 of the two downsampled images::

        ||e(a) - e(b)||_2 = sqrt( sum_i (A a - A b)_i^2 / d ) = l2(A a, A b)

    Area averaging is the linear map ``A`` in which output pixel ``j`` is the mean
    of the input over the cell ``[j r, (j + 1) r)`` (``r`` = input side / ``s``),
    fractional pixels weighted by their overlap, applied along rows and columns.
    Every row of ``A`` sums to 1 and every input pixel's weights sum to ``s / n``,
    so by Jensen's inequality ``(A v)_j^2 <= (A v^2)_j`` and summing::

        l2(A a, A b) <= l2(a, b)          (equality iff a - b is constant on each cell)

    The embedding distance is therefore an exact lower bound of the normalised L2
    of the two (centre-cropped, same-size) images it was computed from: a training
    image farther than ``delta`` in embedding space is farther than ``delta`` in
    pixels. Arrays passed to ``embed`` are used as they are (float, no 8-bit
    rounding); PIL images are pooled from their full-resolution centre crop. Arrays
    made by ``to_working`` at a size S (PIL's BOX filter, rounded to 8 bits) pool to
    the same values up to that rounding (at most 1/255 per value) when the crop side
    is a multiple of S and S a multiple of s; for other ratios PIL's BOX filter
    assigns whole pixels to cells and the two agree only approximately.

``clip`` (metric ``cosine``)
    The image tower of an open_clip model (setting ``clip_model``) with weights from
    ``clip_pretrained``: a local checkpoint file (what ``torch.save(model.state_dict())``
    writes) or an open_clip pretrained tag (needs network the first time).
    Embeddings are L2-normalised, so the inner product is the cosine similarity.

Non-finite embeddings (NaN or inf, e.g. from a broken checkpoint) raise ModelError;
they are never indexed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, Sequence, Union, runtime_checkable

import numpy as np
from PIL import Image

from . import config
from .errors import InputError, ModelError

ImageBatch = Union[Sequence[Image.Image], np.ndarray]
EMBEDDERS = ("pixel", "clip")


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int
    metric: str  # 'l2' (scores are Euclidean distances) | 'cosine' (scores are cosine similarities)

    @property
    def params(self) -> dict[str, Any]:
        """What determines the vectors; an index built with other params is rebuilt."""
        ...

    def embed(self, images: ImageBatch) -> np.ndarray:
        ...


def require_finite(vectors: np.ndarray, what: str, chunk: int = 65_536) -> np.ndarray:
    """Return ``vectors`` unchanged, or raise ModelError when any value is NaN or inf (checked by rows, in chunks)."""
    if vectors.size == 0:
        return vectors
    flat = vectors.reshape(len(vectors), -1) if vectors.ndim > 1 else vectors.reshape(-1, 1)
    bad = sum(int((~np.isfinite(flat[s:s + chunk]).all(axis=1)).sum()) for s in range(0, len(flat), chunk))
    if bad:
        raise ModelError(f"{what} produced NaN or inf embeddings for {bad} of {len(vectors)} images; "
                         "check the model weights (nothing was indexed)")
    return vectors


# ---------------------------------------------------------------------------- pixel

def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centre square crop of the working-resolution rule: (left, top, right, bottom)."""
    s = min(width, height)
    left, top = (width - s) // 2, (height - s) // 2
    return left, top, left + s, top + s


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """A (n_out, n_in) float64: A[j, i] = |[i, i+1) & [j r, (j+1) r)| / r with r = n_in / n_out.

    Rows sum to 1 (each output is a weighted mean); columns sum to n_out / n_in.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"area_matrix needs positive sizes, got n_in={n_in}, n_out={n_out}")
    r = n_in / n_out
    start = np.arange(n_out, dtype=np.float64)[:, None] * r
    end = start + r
    i = np.arange(n_in, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(i + 1.0, end) - np.maximum(i, start), 0.0, None)
    return overlap / r


def area_downsample(batch: np.ndarray, size: int) -> np.ndarray:
    """Area-average float (N, H, W, C) to float64 (N, size, size, C) after the centre-square crop."""
    if batch.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {batch.shape}")
    n, h, w, c = batch.shape
    left, top, right, bottom = center_square_box(w, h)
    batch = batch[:, top:bottom, left:right, :]
    a = area_matrix(right - left, size)
    # out[n, o, p, c] = sum_h sum_w A[o, h] A[p, w] x[n, h, w, c]  (rows, then columns)
    rows = np.tensordot(a, batch, axes=([1], [1]))  # (o, n, w, c)
    out = np.tensordot(rows, a, axes=([2], [1]))  # (o, n, c, p)
    return out.transpose(1, 0, 3, 2)


def _area_downsample_uint8(img: np.ndarray, size: int, strip: int = 256) -> np.ndarray:
    """Area-average one uint8 (H, W, C) image (already square) to float64 (size, size, C) in [0, 1].

    Rows are reduced strip by strip so a large image is never held in floating point at once.
    """
    s = img.shape[0]
    a = area_matrix(s, size)
    rows = np.zeros((size, img.shape[1], img.shape[2]), dtype=np.float64)
    for start in range(0, s, strip):
        block = img[start:start + strip].astype(np.float64) / 255.0
        rows += np.tensordot(a[:, start:start + strip], block, axes=([1], [0]))
    return np.tensordot(rows, a, axes=([1], [1])).transpose(0, 2, 1)  # (o, c, p) -> (o, p, c)


class PixelEmbedder:
    """Downsampled pixels scaled by 1/sqrt(d): embedding distance = normalised L2 at size x size."""

    name = "pixel"
    metric = "l2"

    def __init__(self, size: int = 16):
        size = int(size)
        if size < 1:
            raise InputError(f"pixel_size must be at least 1, got {size}")
        self.size = size
        self.dim = 3 * size * size

    @property
    def params(self) -> dict[str, Any]:
        return {"pixel_size": self.size}

    def _from_array(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim == 3:
            batch = batch[..., None]
        if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
            raise ValueError(f"pixel embedder expects images of shape (N, H, W, C) with C in 1, 3, got {batch.shape}")
        if batch.dtype == np.uint8:
            batch = batch.astype(np.float64) / 255.0
        else:
            batch = np.asarray(batch, dtype=np.float64)
            if not np.isfinite(batch).all():
                raise ValueError(f"pixel embedder input of shape {batch.shape} contains NaN or inf")
        if batch.shape[-1] == 4:
            raise ValueError(f"pixel embedder expects RGB images, got 4 channels (shape {batch.shape}); composite alpha first")
        if batch.shape[-1] == 1:
            batch = np.repeat(batch, 3, axis=-1)
        pooled = area_downsample(batch, self.size)
        return pooled.reshape(len(batch), self.dim)

    def embed(self, images: ImageBatch) -> np.ndarray:
        if isinstance(images, np.ndarray):
            out = self._from_array(images)
        else:
            rows = []
            for img in images:
                if img.mode != "RGB":
                    img = img.convert("RGB")
                crop = np.asarray(img.crop(center_square_box(*img.size)), dtype=np.uint8)
                rows.append(_area_downsample_uint8(crop, self.size).reshape(1, self.dim))
            out = np.concatenate(rows) if rows else np.zeros((0, self.dim))
        out = (out / np.sqrt(self.dim)).astype(np.float32)
        return require_finite(out, "the pixel embedder")


# ---------------------------------------------------------------------------- clip

def _looks_like_path(value: str) -> bool:
    return (os.sep in value or "/" in value or value.startswith(("~", "."))
            or Path(value).suffix.lower() in (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"))


def _clip_weights(model_name: str, pretrained: str) -> tuple[str, str]:
    """Classify clip_pretrained: ('file', absolute path) or ('tag', tag). Raises ModelError early."""
    pretrained = (pretrained or "").strip()
    if not pretrained:
        raise ModelError("the clip embedder needs weights: set clip_pretrained to a local checkpoint file "
                         "(or an open_clip pretrained tag, which needs network once)")
    path = Path(pretrained).expanduser()
    if path.is_file():
        return "file", str(path.resolve())
    if path.is_dir():
        raise ModelError(f"clip_pretrained {pretrained!r} is a folder; pass a local checkpoint file")
    if _looks_like_path(pretrained):
        raise ModelError(f"clip_pretrained {pretrained!r}: no such file; pass a local checkpoint file")
    return "tag", pretrained


def embedder_params(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The params an embedder built from ``settings`` will report, computed without loading a model."""
    get = lambda key: settings.get(key, config.default(key))  # noqa: E731
    if name == "pixel":
        return {"pixel_size": int(get("pixel_size"))}
    if name == "clip":
        kind, ref = _clip_weights(str(get("clip_model")), str(get("clip_pretrained")))
        return _clip_params(str(get("clip_model")), kind, ref)
    raise InputError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")


def _clip_params(model_name: str, kind: str, ref: str) -> dict[str, Any]:
    params: dict[str, Any] = {"clip_model": model_name, "clip_pretrained": ref}
    if kind == "file":
        st = os.stat(ref)
        params["checkpoint_bytes"] = st.st_size
        params["checkpoint_mtime_ns"] = st.st_mtime_ns
    return params


def _resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class ClipEmbedder:
    """open_clip image tower; L2-normalised embeddings compared by cosine similarity."""

    name = "clip"
    metric = "cosine"

    def __init__(self, model_name: str, pretrained: str, *, device: str = "cpu", batch_size: int = 32):
        kind, ref = _clip_weights(model_name, pretrained)
        import open_clip  # heavy: imported only where a CLIP model is built

        if model_name not in open_clip.list_models():
            raise ModelError(f"unknown open_clip model {model_name!r}; set clip_model to one of open_clip.list_models(), e.g. ViT-B-32")
        if kind == "tag" and ref not in open_clip.list_pretrained_tags_by_model(model_name):
            raise ModelError(f"clip_pretrained {ref!r} is neither a file nor a pretrained tag of {model_name}; "
                             "pass a local checkpoint file")
        self.model_name = model_name
        self.device = _resolve_device(device)
        self.batch_size = int(batch_size)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=ref, device=self.device)
        except ModelError:
            raise
        except Exception as e:  # open_clip raises RuntimeError/OSError/pickle errors alike
            if kind == "tag":
                raise ModelError(f"cannot fetch the {model_name} weights {ref!r} (no network here?); "
                                 "pass a local checkpoint file as clip_pretrained") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{ref}: not a usable {model_name} checkpoint ({first[:200]}); "
                             f"pass a local checkpoint file saved from a {model_name} model") from None
        model.eval()
        self.model = model
        self.preprocess = preprocess
        self._params = _clip_params(model_name, kind, ref)
        cfg = open_clip.get_model_config(model_name) or {}
        self.dim = int(cfg.get("embed_dim") or self._probe_dim())

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def _probe_dim(self) -> int:
        return int(self.embed([Image.new("RGB", (32, 32))]).shape[1])

    def _to_pil(self, images: ImageBatch) -> list[Image.Image]:
        if isinstance(images, np.ndarray):
            from .images import to_uint8

            if images.ndim != 4:
                raise ValueError(f"clip embedder expects images of shape (N, H, W, C), got {images.shape}")
            return [Image.fromarray(to_uint8(a)) for a in images]
        return [img if img.mode == "RGB" else img.convert("RGB") for img in images]

    def embed(self, images: ImageBatch) -> np.ndarray:
        import torch

        pils = self._to_pil(images)
        out: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(pils), self.batch_size):
                chunk = pils[start:start + self.batch_size]
                x = torch.stack([self.preprocess(img) for img in chunk]).to(self.device)
                feats = self.model.encode_image(x).float()
                feats = feats / feats.norm(dim=-1, keepdim=True)
                out.append(feats.cpu().numpy().astype(np.float32))
        if not out:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        return require_finite(np.concatenate(out), f"the clip model {self.model_name}")


# ---------------------------------------------------------------------------- factory

def get_embedder(name: str, settings: dict[str, Any] | None = None) -> Embedder:
    """Build the embedder ``name`` ('pixel' | 'clip') from workspace settings (missing keys take defaults)."""
    settings = settings or {}
    get = lambda key: settings.get(key, config.default(key))  # noqa: E731
    if name == "pixel":
        return PixelEmbedder(int(get("pixel_size")))
    if name == "clip":
        return ClipEmbedder(str(get("clip_model")), str(get("clip_pretrained")), device=str(get("device")))
    raise InputError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")
