"""Shadow models for LiRA: K models trained by ``core.demo.trainer`` on random halves of one pool.

Which shadow sees which image: with ``numpy.random.default_rng(seed)``, for every pool image
in order a permutation of the K shadows is drawn and the image is IN for the first K/2 of
them, so each image is IN for exactly half the shadows and OUT for the other half (K even).
Shadow i trains with seed ``seed * 1000 + i`` on the images IN for it, listed in
``shadow-<i>/examples.csv``; everything is recorded in ``shadows.json``: the pool (relative
paths and sha256 of every image), the IN matrix, the seeds and the training recipe.

Resumable: a rerun skips finished shadows and continues an interrupted one from its last
checkpoint (``core.demo.trainer`` resumes). A rerun with another pool, K, seed or recipe into the
same folder is refused rather than mixed.

``compact`` stores each finished shadow's weights in float16 (halving the shipped demo's
size); they are read back as float32. The rounding moves a weight by at most 2^-11 of its
value, well below the difference training on an image makes.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import InputError
from .imagesets import file_digests, read_image_set

MANIFEST = "shadows.json"


@dataclass(frozen=True)
class ShadowSet:
    root: Path
    pool: Path  # the pool folder or manifest
    rel: tuple[str, ...]  # pool images, relative to the pool's root
    sha256: tuple[str, ...]
    inside: np.ndarray  # K x N bool: image j was IN for shadow i
    seeds: tuple[int, ...]
    recipe: dict[str, Any]
    models: tuple[Path, ...]  # finished shadow model folders, in shadow order

    @property
    def count(self) -> int:
        return len(self.seeds)


def assign(n: int, count: int, seed: int) -> np.ndarray:
    """K x N bool, each column with exactly K/2 True (module docstring)."""
    if count < 2 or count % 2:
        raise InputError(f"the number of shadow models must be even and >= 2 (each image IN for half of them), got {count}")
    rng = np.random.default_rng(seed)
    inside = np.zeros((count, n), dtype=bool)
    for j in range(n):
        inside[rng.permutation(count)[: count // 2], j] = True
    return inside


def _finished(folder: Path) -> bool:
    return (folder / "training.json").is_file() and (folder / "model_index.json").is_file() and not (folder / "train_state.pt").exists()


def halve_weights(model_dir: str | Path) -> None:
    """Rewrite every safetensors file under ``model_dir`` in float16 (atomically, file by file)."""
    import os

    from safetensors.torch import load_file, save_file

    for f in Path(model_dir).rglob("*.safetensors"):
        tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(f).items()}
        tmp = f.with_name(f.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, f)


def train_shadows(pool: str | Path, out_dir: str | Path, *, count: int, seed: int, recipe: dict[str, Any],
                  threads: int | None = 1, compact: bool = False,
                  progress: Callable[[int, int, float], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> ShadowSet:
    """Train (or finish training) ``count`` shadows on random halves of ``pool`` into ``out_dir``.

    ``recipe`` holds ``core.demo.trainer.train`` keywords (steps, size, channels, unconditional, ...);
    its ``seed`` is replaced per shadow. ``progress(i, count, seconds)`` after each shadow.
    """
    from .demo.trainer import train

    images = read_image_set(pool, what="shadow pool")
    recipe = {k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe.items() if k != "seed"}
    if "steps" not in recipe:
        raise InputError("the shadow recipe needs a number of training steps")
    unconditional = bool(recipe.get("unconditional", False))
    if not unconditional:
        missing = [r for r, c in zip(images.rel, images.conditions) if not c]
        if missing:
            raise InputError(f"shadow pool {pool}: {missing[0]!r} has no caption, and the recipe trains a caption-conditioned "
                             "model; give captions or train unconditional shadows")
    out_dir = Path(out_dir)
    digests = file_digests(images.files)
    inside = assign(len(images), count, seed)
    seeds = [seed * 1000 + i for i in range(count)]
    record = {"pool": str(Path(pool).resolve()), "count": count, "seed": seed, "seeds": seeds, "recipe": recipe,
              "compact": compact, "images": [{"path": r, "sha256": d} for r, d in zip(images.rel, digests)],
              "inside": ["".join("1" if v else "0" for v in row) for row in inside]}
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text(encoding="utf-8"))
        if {k: old.get(k) for k in record if k != "pool"} != {k: v for k, v in record.items() if k != "pool"}:
            raise InputError(f"{out_dir} holds shadows of another pool, count, seed or recipe; use another folder")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = manifest.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        tmp.replace(manifest)
    for i in range(count):
        folder = out_dir / f"shadow-{i:02d}"
        if _finished(folder):
            continue
        if should_stop is not None and should_stop():
            break
        folder.mkdir(parents=True, exist_ok=True)
        examples = folder / "examples.csv"
        with open(examples, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(("file", "caption"))
            w.writerows((r, c or "") for r, c, v in zip(images.rel, images.conditions, inside[i]) if v)
        started = time.perf_counter()
        train(images.root, folder, manifest=examples, seed=seeds[i], threads=threads, **recipe)
        if compact:
            halve_weights(folder)
        if progress is not None:
            progress(i, count, time.perf_counter() - started)
    return load_shadows(out_dir, require_all=False)


def load_shadows(out_dir: str | Path, *, require_all: bool = True) -> ShadowSet:
    """The shadow set recorded in ``out_dir``; InputError when there is none (or, with
    ``require_all``, when some shadow is unfinished)."""
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise InputError(f"{out_dir} holds no shadow models ({MANIFEST} missing); train them with `memaudit train-shadows`")
    record = json.loads(manifest.read_text(encoding="utf-8"))
    folders = [out_dir / f"shadow-{i:02d}" for i in range(record["count"])]
    done = [f for f in folders if _finished(f)]
    if require_all and len(done) < len(folders):
        raise InputError(f"{out_dir}: {len(done)} of {len(folders)} shadow models are trained; rerun "
                         "`memaudit train-shadows` with the same arguments to finish them")
    inside = np.array([[c == "1" for c in row] for row in record["inside"]], dtype=bool)
    return ShadowSet(out_dir, Path(record["pool"]), tuple(im["path"] for im in record["images"]),
                     tuple(im["sha256"] for im in record["images"]), inside, tuple(record["seeds"]), record["recipe"],
                     tuple(done))


def recipe_of(model_dir: str | Path) -> dict[str, Any]:
    """The training recipe recorded by ``core.demo.trainer`` in ``model_dir/training.json`` (for shadows trained alike)."""
    log = Path(model_dir) / "training.json"
    if not log.is_file():
        raise InputError(f"{model_dir} has no training.json (it was not trained by memaudit); give the recipe "
                         "with --steps and the other training flags instead of --like")
    config = json.loads(log.read_text(encoding="utf-8"))["config"]
    return {k: v for k, v in config.items() if k != "seed"}
