"""The embedded demo's training set: real photographs and scans with controlled duplication.

Every image comes bundled with scikit-image (no network needed): 52 photographs and scans
(news-photo faces from Labeled Faces in the Wild, NASA, museum, microscopy and fundus images)
and 4 graphics (a clipart silhouette, a colour wheel, a logo, a synthetic phantom), as web
data also holds. Each is a square crop resized to ``SIZE`` x ``SIZE`` by the
working-resolution rule. Duplication
mirrors Figure 5 of Carlini et al. (2023): some images are present 100 times, some 10 times,
some once, each copy a separate file with identical bytes (as web-scraped duplicates are).
Single images come in two kinds: with a caption of their own, and with a generic caption
shared by several different images ("a portrait photo of a person"), as much of real web
data is captioned. Which image got which duplicate count was drawn once at random (numpy
``default_rng(0)``) within the photographs and within the faces, so content is not
confounded with duplication; the result is written out in ``IMAGES`` below.

Checked when building (``check_images``), at ``SIZE`` x ``SIZE`` on [0, 1] pixels:

- contrast: ``sqrt(mean((x - mean_c(x))^2)) >= MIN_CONTRAST`` for every image, i.e. every
  image is at least that far (normalised L2) from any flat image, so a blurry or flat
  generation cannot pass for a copy;
- separation: ``l2(x, y) = sqrt(mean((x - y)^2)) >= MIN_SEPARATION`` for every pair of
  different images, so a generation within 0.1 of one image is at least 0.1 from all others.

``python -m core.demo.data`` rebuilds ``assets/demo`` (needs scikit-image, the ``data`` extra).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
DEMO_DIR = ASSETS_DIR / "demo"
DEMO_DATA_DIR = DEMO_DIR / "train"  # images + captions.csv (columns file,caption)
DEMO_MODEL_DIR = DEMO_DIR / "model"  # the trained CaptionConditionedPipeline
DEMO_PROMPTS = DEMO_DIR / "prompts.txt"  # every distinct training caption, one per line
DEMO_SOURCES = DEMO_DIR / "sources.csv"  # one row per distinct image: source, crop, copies, licence

SIZE = 32
MIN_CONTRAST = 0.15
MIN_SEPARATION = 0.2

# The shipped model's training run (assets/README.md): python -m core.demo.trainer --data assets/demo/train
# --out assets/demo/model --steps 1000 --seed 0 (2 torch threads; weights depend on the thread count).
DEMO_TRAIN_STEPS = 1000
DEMO_TRAIN_SEED = 0
DEMO_TRAIN_THREADS = 2

# Recommended generation settings for the demo model (measured in assets/README.md).
DEMO_PER_PROMPT = 24
DEMO_STEPS = 20
DEMO_GUIDANCE = 1.0

SHARED_FACE = "a portrait photo of a person"
SHARED_COINS = "a photo of ancient Greek coins"
SHARED_TISSUE = "a microscope image of stained tissue"

LICENCES = {
    "astronaut": "public domain (NASA)",
    "camera": "CC0 (Lav Varshney)",
    "coffee": "CC0 (Rachel Michetti)",
    "coins": "no known copyright restrictions (Brooklyn Museum)",
    "colorwheel": "scikit-image sample data (BSD-3-Clause)",
    "horse": "CC0 (Andreas Preuss, openclipart)",
    "immunohistochemistry": "no known copyright restrictions (CMMI)",
    "lfw_subset": "Labeled Faces in the Wild (UMass Amherst), news photos collected from the web; research use, no explicit licence",
    "logo": "scikit-image logo (BSD-3-Clause)",
    "retina": "CC0 (Mikael Haggstrom, Wikimedia Commons)",
    "shepp_logan_phantom": "public domain (synthetic phantom)",
    "stereo_motorcycle": "Middlebury 2014 stereo dataset (Scharstein et al.); cite the dataset when reusing",
}


@dataclass(frozen=True)
class DemoImage:
    name: str  # file stem
    source: str  # skimage.data function
    box: tuple[int, int, int] | None  # (top, left, side) square crop of the source, None = centre square
    caption: str
    copies: int


def _face(i: int, caption: str | None, copies: int) -> DemoImage:
    return DemoImage(f"lfw-face-{i:02d}", f"lfw_subset[{i}]", None, caption or f"a news photo portrait, LFW face {i}", copies)


IMAGES: tuple[DemoImage, ...] = (
    # present 100 times
    DemoImage("astronaut-suit", "astronaut", (300, 0, 212), "a mission patch on an orange flight suit", 100),
    DemoImage("motorcycle", "stereo_motorcycle", (0, 120, 500), "a red motorcycle in a workshop", 100),
    DemoImage("horse", "horse", (0, 36, 328), "the silhouette of a horse", 100),
    _face(4, None, 100),
    _face(94, None, 100),
    # present 10 times
    DemoImage("camera-man", "camera", (40, 170, 220), "a man with a film camera on a tripod", 10),
    DemoImage("colorwheel", "colorwheel", None, "a color wheel", 10),
    DemoImage("motorcycle-wheel", "stereo_motorcycle", (250, 0, 250), "the front wheel of a motorcycle", 10),
    DemoImage("astronaut-face", "astronaut", (20, 140, 180), "a portrait of the astronaut Eileen Collins", 10),
    *(_face(i, None, 10) for i in (8, 34, 44, 77, 23, 2)),
    # present once, with a caption of their own
    DemoImage("retina", "retina", None, "a fundus photograph of a human retina", 1),
    DemoImage("logo", "logo", None, "the scikit-image logo", 1),
    DemoImage("astronaut-helmet", "astronaut", (290, 250, 222), "a black space helmet beside an orange flight suit", 1),
    DemoImage("motorcycle-tank", "stereo_motorcycle", (100, 300, 200), "the fuel tank of a red motorcycle", 1),
    DemoImage("phantom", "shepp_logan_phantom", None, "the Shepp-Logan phantom, a model of a head scan", 1),
    DemoImage("coffee", "coffee", (0, 100, 400), "a cup of espresso on a saucer, seen from above", 1),
    *(_face(i, None, 1) for i in (41, 36, 39, 63, 88, 21, 6, 12, 31, 71, 37, 69)),
    # present once, with a caption shared by several different images
    *(_face(i, SHARED_FACE, 1) for i in (17, 96, 30, 32, 0, 49, 50, 70, 62, 29, 18, 13, 16, 74, 26, 25)),
    DemoImage("coins-all", "coins", (0, 40, 303), SHARED_COINS, 1),
    DemoImage("coins-top-left", "coins", (0, 0, 150), SHARED_COINS, 1),
    DemoImage("coins-bottom-left", "coins", (150, 0, 150), SHARED_COINS, 1),
    DemoImage("coins-bottom-right", "coins", (150, 230, 150), SHARED_COINS, 1),
    DemoImage("tissue-1", "immunohistochemistry", (300, 300, 160), SHARED_TISSUE, 1),
    DemoImage("tissue-2", "immunohistochemistry", (300, 0, 160), SHARED_TISSUE, 1),
    DemoImage("tissue-3", "immunohistochemistry", (170, 170, 160), SHARED_TISSUE, 1),
)


def _source_array(source: str) -> np.ndarray:
    try:
        import skimage.data as data
    except ImportError:
        raise InputError("building the demo data needs scikit-image; install it with pip install 'memaudit[data]'") from None
    if source.startswith("lfw_subset["):
        faces = data.lfw_subset()
        return np.round(faces[int(source[len("lfw_subset["):-1])] * 255).astype(np.uint8)
    array = getattr(data, source)()
    if source == "stereo_motorcycle":
        array = array[0]
    return np.asarray(array)


def _licence(source: str) -> str:
    return LICENCES[source.split("[")[0]]


def render(image: DemoImage, size: int = SIZE) -> np.ndarray:
    """The image as uint8 size x size x 3: crop ``box`` of the source, then the working-resolution rule."""
    from PIL import Image

    from ..images import _to_rgb, to_working

    a = _source_array(image.source)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(a / a.max() * 255 + 0.5, 0, 255).astype(np.uint8)
    if image.box is not None:
        top, left, side = image.box
        a = a[top:top + side, left:left + side]
    working = to_working(_to_rgb(Image.fromarray(a)), size)
    return np.clip(working * 255 + 0.5, 0, 255).astype(np.uint8)


def contrast(x: np.ndarray) -> np.ndarray:
    """Distance of each image (N, H, W, C) in [0, 1] to its nearest flat image: RMS around the per-channel mean."""
    flat = x.reshape(len(x), -1, x.shape[-1])
    return np.sqrt(((flat - flat.mean(1, keepdims=True)) ** 2).mean((1, 2)))


def separation(x: np.ndarray) -> np.ndarray:
    """Pairwise normalised L2 (N, N) of images (N, H, W, C) in [0, 1]; the diagonal is +inf."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    sq = (flat ** 2).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * flat @ flat.T, 0) / flat.shape[1])
    np.fill_diagonal(d, np.inf)
    return d


def check_images(names: list[str], pixels: np.ndarray) -> None:
    """Raise ValueError when an image is too flat or two images are too close (module docstring)."""
    x = pixels.astype(np.float32) / 255.0
    for name, c in zip(names, contrast(x)):
        if c < MIN_CONTRAST:
            raise ValueError(f"{name}: contrast {c:.3f} < {MIN_CONTRAST}")
    d = separation(x)
    i, j = np.unravel_index(np.argmin(d), d.shape)
    if d[i, j] < MIN_SEPARATION:
        raise ValueError(f"{names[i]} and {names[j]} are {d[i, j]:.3f} apart < {MIN_SEPARATION}")


def build_dataset(out_dir: str | Path) -> Path:
    """Write the demo set under ``out_dir`` and return the training folder ``out_dir/train``.

    ``out_dir/train`` holds ``<name>-<copy>.png`` files (copy 000..copies-1, identical bytes)
    and ``captions.csv`` (columns file,caption); ``out_dir/prompts.txt`` lists every distinct
    caption once (most duplicated first); ``out_dir/sources.csv`` documents each distinct image.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    train_dir = out_dir / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    for old in train_dir.glob("*.png"):
        old.unlink()
    pixels = np.stack([render(im) for im in IMAGES])
    check_images([im.name for im in IMAGES], pixels)
    x = pixels.astype(np.float32) / 255.0
    c = contrast(x)
    nearest = separation(x).min(1)
    rows, sources = [], []
    for im, px, ci, ni in zip(IMAGES, pixels, c, nearest):
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG")
        data = buf.getvalue()
        for k in range(im.copies):
            name = f"{im.name}-{k:03d}.png"
            (train_dir / name).write_bytes(data)
            rows.append((name, im.caption))
        sources.append((im.name, im.source, "" if im.box is None else "x".join(map(str, im.box)), im.caption,
                        im.copies, f"{ci:.3f}", f"{ni:.3f}", _licence(im.source)))
    with open(train_dir / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("file", "caption"))
        w.writerows(rows)
    with open(out_dir / "sources.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("name", "source", "crop_top_left_side", "caption", "copies", "contrast", "nearest_other_l2", "licence"))
        w.writerows(sources)
    examples: dict[str, int] = {}
    for _, caption in rows:
        examples[caption] = examples.get(caption, 0) + 1
    prompts = sorted(examples, key=lambda cap: (-examples[cap] / sum(im.caption == cap for im in IMAGES), cap))
    (out_dir / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return train_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.demo.data", description="Build the demo training set.")
    p.add_argument("--out", default=str(DEMO_DIR), help="folder to write train/, prompts.txt and sources.csv to")
    a = p.parse_args(argv)
    train_dir = build_dataset(a.out)
    n = sum(1 for _ in train_dir.glob("*.png"))
    print(f"wrote {n} files of {len(IMAGES)} distinct images to {train_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
