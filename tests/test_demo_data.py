"""The shipped demo training set: duplication design, captions, contrast and separation."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter

import numpy as np
import pytest

from core.demo.data import (DEMO_DATA_DIR, DEMO_PROMPTS, DEMO_SOURCES, IMAGES, MIN_CONTRAST, MIN_SEPARATION, SIZE,
                            build_dataset, check_images, contrast, separation)
from core.images import load_image


def shipped_rows() -> list[dict[str, str]]:
    with open(DEMO_DATA_DIR / "captions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_every_png_is_listed_once_with_a_caption():
    rows = shipped_rows()
    files = [r["file"] for r in rows]
    assert len(files) == len(set(files))
    assert set(files) == {p.name for p in DEMO_DATA_DIR.glob("*.png")}
    assert all(r["caption"] for r in rows)


def test_duplication_levels_are_exact_copies():
    rows = shipped_rows()
    by_hash: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        digest = hashlib.sha256((DEMO_DATA_DIR / r["file"]).read_bytes()).hexdigest()
        by_hash.setdefault(digest, []).append(r)
    assert len(by_hash) == len(IMAGES)
    copies = Counter(len(group) for group in by_hash.values())
    assert copies == Counter(im.copies for im in IMAGES)
    assert set(copies) == {1, 10, 100}
    for group in by_hash.values():
        assert len({r["caption"] for r in group}) == 1  # copies keep their caption


def test_shipped_images_are_real_sized_contrasted_and_far_apart():
    seen: dict[str, np.ndarray] = {}
    for f in sorted(DEMO_DATA_DIR.glob("*.png")):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if digest not in seen:
            img = load_image(f)
            assert img.size == (SIZE, SIZE)
            seen[digest] = np.asarray(img, dtype=np.float32) / 255.0
    x = np.stack(list(seen.values()))
    assert contrast(x).min() >= MIN_CONTRAST
    assert separation(x).min() >= MIN_SEPARATION


def test_prompts_file_lists_each_caption_once_most_duplicated_first():
    prompts = DEMO_PROMPTS.read_text(encoding="utf-8").splitlines()
    counts = Counter(r["caption"] for r in shipped_rows())
    assert sorted(prompts) == sorted(counts)
    assert counts[prompts[0]] == 100
    with open(DEMO_SOURCES, newline="", encoding="utf-8") as f:
        sources = list(csv.DictReader(f))
    assert len(sources) == len(IMAGES) and all(s["licence"] for s in sources)


def test_checks_reject_flat_and_near_identical_images():
    rng = np.random.default_rng(0)
    textured = (rng.random((2, SIZE, SIZE, 3)) * 255).astype(np.uint8)
    check_images(["a", "b"], textured)
    flat = np.full((1, SIZE, SIZE, 3), 128, np.uint8)
    with pytest.raises(ValueError, match="c: contrast"):
        check_images(["a", "c"], np.concatenate([textured[:1], flat]))
    near = np.clip(textured[:1].astype(int) + 3, 0, 255).astype(np.uint8)
    with pytest.raises(ValueError, match="a and d are"):
        check_images(["a", "d"], np.concatenate([textured[:1], near]))


def test_building_again_reproduces_the_shipped_files(tmp_path):
    pytest.importorskip("skimage")
    train_dir = build_dataset(tmp_path)
    assert (train_dir / "captions.csv").read_bytes() == (DEMO_DATA_DIR / "captions.csv").read_bytes()
    assert (tmp_path / "prompts.txt").read_bytes() == DEMO_PROMPTS.read_bytes()
    assert (tmp_path / "sources.csv").read_bytes() == DEMO_SOURCES.read_bytes()
    for f in sorted(DEMO_DATA_DIR.glob("*-000.png")):
        assert (train_dir / f.name).read_bytes() == f.read_bytes(), f.name
