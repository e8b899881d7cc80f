"""Seeded builders of test data: real photographs from scikit-image, planted copies among novel images.

``planted_files(root)`` writes a training folder (with captions.csv) and a folder of
"generations" with a manifest, where the ground truth is known:

    prompt               generations                              truth
    "copy astronaut"     12 noisy copies of training astronaut    flagged, extracted
    "copy coffee"        12 noisy copies of training coffee       flagged, extracted
    "two copies"         10 of chelsea + 10 of rocket             flagged, two groups, both extracted
    "six copies"         6 of camera + 6 novel                    not flagged (clique 6 < 10)
    "novel faces"        12 different LFW faces                   not flagged
    "novel crops"        12 crops of hubble / retina / coins      not flagged
    "flat trap"          12 images equal but for one corner tile  not flagged (plain L2 would link them)

Training images are 64 x 64; generations are 64 x 64 PNGs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64
TRAINING = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "coins", "hubble_deep_field")
FLAGGED = {"copy astronaut": ["astronaut"], "copy coffee": ["coffee"], "two copies": ["chelsea", "rocket"]}
NOT_FLAGGED = ("six copies", "novel faces", "novel crops", "flat trap")


def _square(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    pil = Image.fromarray(img.astype(np.uint8)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(pil)


def training_arrays(size: int = SIZE) -> dict[str, np.ndarray]:
    from skimage import data

    return {name: _square(getattr(data, name)(), size) for name in TRAINING}


def _noisy(img: np.ndarray, rng: np.random.Generator, sigma: float = 4.0) -> np.ndarray:
    return np.clip(img.astype(np.float64) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def _faces(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    from skimage import data

    lfw = data.lfw_subset()[:100]  # the first 100 are faces
    picks = rng.choice(len(lfw), size=n, replace=False)
    return [_square((lfw[i] * 255).astype(np.uint8)) for i in picks]


def _crops(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    from skimage import data

    sources = [data.hubble_deep_field(), data.retina(), data.coins(), data.immunohistochemistry(), data.astronaut()]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        s = int(min(h, w) * rng.uniform(0.25, 0.45))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        out.append(_square(src[y:y + s, x:x + s]))
    return out


def _trap(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    tile = SIZE // 4
    out = []
    for _ in range(n):
        img = np.full((SIZE, SIZE, 3), 128, np.uint8)
        img[:tile, :tile] = np.clip(128 + rng.uniform(-64, 64, (tile, tile, 3)), 0, 255).astype(np.uint8)
        out.append(img)
    return out


def planted_files(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write train/ (+ captions.csv) and gens/ (+ manifest.csv) under ``root``; return their paths."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    train_dir, gen_dir = root / "train", root / "gens"
    train_dir.mkdir(parents=True, exist_ok=True)
    gen_dir.mkdir(parents=True, exist_ok=True)
    train = training_arrays()
    with open(train_dir / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        for name, arr in train.items():
            Image.fromarray(arr).save(train_dir / f"{name}.png")
            w.writerow([f"{name}.png", f"a photo of {name}"])

    prompts: dict[str, list[np.ndarray]] = {
        "copy astronaut": [_noisy(train["astronaut"], rng) for _ in range(12)],
        "copy coffee": [_noisy(train["coffee"], rng) for _ in range(12)],
        "two copies": [_noisy(train["chelsea"], rng) for _ in range(10)] + [_noisy(train["rocket"], rng) for _ in range(10)],
        "six copies": [_noisy(train["camera"], rng) for _ in range(6)] + _faces(6, rng),
        "novel faces": _faces(12, rng),
        "novel crops": _crops(12, rng),
        "flat trap": _trap(12, rng),
    }
    with open(gen_dir / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "prompt", "seed"])
        for p_index, (prompt, images) in enumerate(prompts.items()):
            for seed_j, arr in enumerate(images):
                name = f"p{p_index}-{seed_j}.png"
                Image.fromarray(arr).save(gen_dir / name)
                w.writerow([name, prompt, seed_j])
    return {"train": train_dir, "captions": train_dir / "captions.csv", "gens": gen_dir, "manifest": gen_dir / "manifest.csv"}


def planted_workspace(root: Path, seed: int = 0, audit: bool = True):
    """A workspace with the planted data ingested, imported and (optionally) audited; returns (ws, run_id)."""
    from core.audit import run_audit
    from core.importer import import_generations
    from core.store import Workspace
    from core.training import add_training

    files = planted_files(Path(root) / "data", seed)
    ws = Workspace.init(Path(root) / "ws")
    add_training(ws, files["train"], captions=files["captions"])
    import_generations(ws, files["manifest"])
    return ws, (run_audit(ws) if audit else None)


# ---------------------------------------------------------------------------- templated training sets
TEMPLATED_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "coins",
                    "hubble_deep_field", "retina", "moon", "page", "clock")
TEXTURES = ("grass", "gravel", "brick", "text", "cell", "coins")


def _high_pass(img: np.ndarray, block: int) -> np.ndarray:
    """``img`` minus its block x block means: detail that pooling at that block size cannot see."""
    h, w = img.shape[:2]
    means = img.reshape(h // block, block, w // block, block, -1).mean(axis=(1, 3), keepdims=True)
    return (img.reshape(h // block, block, w // block, block, -1) - means).reshape(img.shape)


def templated_files(root: Path, prompts: int = 12, lookalikes: int = 20, seed: int = 0, size: int = SIZE,
                    shift: float = 0.06, amplitude: float = 0.15) -> dict[str, Path]:
    """A training set of templates (same layout and colours, different fine detail) and generations that
    copy one image of each template, so that pooled pixels rank the true copy below its look-alikes.

    Per prompt p, from a real photograph (the template's layout and colours):
      train/p{p}-copy.png       layout + detail_0                   the image the generations copy
      train/p{p}-look{i}.png    layout + shift + detail_i, i >= 1   look-alikes (detail from real textures)
      gens: 12 x (copy + shift + small noise)
    Details are high-pass (zero mean over every 4 x 4 block), so pooled at 1/4 of the size or coarser the
    look-alikes equal the generations while the copy is ``shift`` away; in pixels the copy is about
    ``shift`` away and the look-alikes far beyond delta. Returns the paths as ``planted_files`` does, and
    ``truth``: prompt -> the copied file's name.
    """
    from skimage import data

    rng = np.random.default_rng(seed)
    root = Path(root)
    train_dir, gen_dir = root / "train", root / "gens"
    train_dir.mkdir(parents=True, exist_ok=True)
    gen_dir.mkdir(parents=True, exist_ok=True)
    textures = [_square(getattr(data, name)(), 4 * size).astype(np.float64) / 255.0 for name in TEXTURES]

    def detail() -> np.ndarray:
        tex = textures[int(rng.integers(len(textures)))]
        y, x = (int(v) for v in rng.integers(0, 3 * size, 2))
        crop = tex[y:y + size, x:x + size]
        hp = _high_pass(crop, 4)
        return amplitude * hp / max(1e-6, float(hp.std()))  # the same strength of detail everywhere

    captions, manifest, truth = [], [], {}
    for p in range(prompts):
        photo = _square(getattr(data, TEMPLATED_PHOTOS[p % len(TEMPLATED_PHOTOS)])(), size).astype(np.float64) / 255.0
        layout = 0.3 + 0.4 * photo  # room for most of the detail and the shift without clipping
        copy = np.clip(layout + detail(), 0, 1)
        name = f"p{p}-copy.png"
        Image.fromarray((copy * 255 + 0.5).astype(np.uint8)).save(train_dir / name)
        captions.append((name, f"template {p}"))
        truth[f"template {p}"] = name
        for i in range(1, lookalikes + 1):
            look = np.clip(layout + shift + detail(), 0, 1)
            look_name = f"p{p}-look{i}.png"
            Image.fromarray((look * 255 + 0.5).astype(np.uint8)).save(train_dir / look_name)
            captions.append((look_name, f"template {p}"))
        for j in range(12):
            gen = np.clip(copy + shift + rng.normal(0, 0.01, copy.shape), 0, 1)
            gen_name = f"t{p}-{j}.png"
            Image.fromarray((gen * 255 + 0.5).astype(np.uint8)).save(gen_dir / gen_name)
            manifest.append((gen_name, f"template {p}", j))
    with open(train_dir / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        w.writerows(captions)
    with open(gen_dir / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "prompt", "seed"])
        w.writerows(manifest)
    return {"train": train_dir, "captions": train_dir / "captions.csv", "gens": gen_dir,
            "manifest": gen_dir / "manifest.csv", "truth": truth}
