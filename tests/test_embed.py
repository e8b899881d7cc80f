"""Embedders: the pixel embedder's exact lower bound, and the open_clip image tower on real (random-weight) models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from core.embed import (ClipEmbedder, PixelEmbedder, area_downsample, area_matrix, embedder_params, get_embedder,
                        require_finite)
from core.errors import InputError, ModelError
from core.images import to_working

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def l2(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised L2 of two same-shape arrays in [0, 1] (PAPER.md)."""
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3]


# ---------------------------------------------------------------------------- area averaging

def test_area_matrix_rows_are_means_and_columns_spread_evenly():
    for n_in, n_out in [(64, 16), (50, 16), (16, 16), (7, 3), (5, 9)]:
        a = area_matrix(n_in, n_out)
        assert a.shape == (n_out, n_in)
        np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_allclose(a.sum(axis=0), n_out / n_in, atol=1e-12)
        assert (a >= 0).all()


def test_integer_ratio_is_the_block_mean():
    x = photo("astronaut")[None].astype(np.float64) / 255.0  # 512 x 512
    pooled = area_downsample(x, 16)
    block = x.reshape(1, 16, 32, 16, 32, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(pooled, block, atol=1e-12)


def test_embedding_distance_is_normalised_l2_of_the_downsampled_images():
    e = PixelEmbedder(16)
    a, b = photo("astronaut"), photo("coffee")
    ea, eb = e.embed([Image.fromarray(a), Image.fromarray(b)])
    assert ea.shape == (768,) and ea.dtype == np.float32
    sa, sb = (area_downsample(to_square(x)[None].astype(np.float64) / 255.0, 16)[0] for x in (a, b))
    assert float(np.linalg.norm(ea - eb)) == pytest.approx(l2(sa, sb), abs=1e-6)


def to_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def test_pil_and_array_inputs_agree_and_follow_the_centre_crop():
    e = PixelEmbedder(8)
    coffee = photo("coffee")  # 400 x 600: cropped to the centre 400 x 400
    from_pil = e.embed([Image.fromarray(coffee)])
    from_array = e.embed(coffee[None])  # uint8 arrays are scaled by 1/255
    from_float = e.embed(coffee[None].astype(np.float32) / 255.0)
    from_crop = e.embed([Image.fromarray(to_square(coffee))])
    np.testing.assert_allclose(from_pil, from_array, atol=1e-6)
    np.testing.assert_allclose(from_pil, from_float, atol=1e-6)
    np.testing.assert_allclose(from_pil, from_crop, atol=1e-6)
    # gray and RGBA images become RGB first
    gray = Image.fromarray(photo("camera")[..., 0])
    assert e.embed([gray]).shape == (1, 192)
    rgba = Image.fromarray(np.dstack([coffee, np.full(coffee.shape[:2], 255, np.uint8)]))
    np.testing.assert_allclose(e.embed([rgba]), from_pil, atol=1e-6)


def test_matches_the_working_resolution_rule_up_to_8_bit_rounding():
    """Where the crop side is a multiple of s, PIL's BOX filter is the same block mean, rounded to 8 bits."""
    e = PixelEmbedder(16)
    for name in ("astronaut", "coffee"):  # 512 and 400 (centre crop of 400 x 600)
        img = Image.fromarray(photo(name))
        working = to_working(img, 16)  # PIL's BOX resize, rounded to 8 bits
        assert np.abs(e.embed([img])[0] * np.sqrt(768) - working.reshape(-1)).max() <= 1.0 / 255 + 1e-6


# ---------------------------------------------------------------------------- the lower bound

@st.composite
def image_pairs(draw):
    h = draw(st.integers(4, 40))
    w = draw(st.integers(4, 40))
    shape = (h, w, 3)
    floats = st.floats(0.0, 1.0, allow_nan=False, width=32)
    a = draw(hnp.arrays(np.float32, shape, elements=floats))
    kind = draw(st.sampled_from(["independent", "near", "shifted"]))
    if kind == "independent":
        b = draw(hnp.arrays(np.float32, shape, elements=floats))
    elif kind == "near":
        noise = draw(hnp.arrays(np.float32, shape, elements=st.floats(-0.0625, 0.0625, width=32)))
        b = np.clip(a + noise, 0, 1)
    else:
        b = np.roll(a, draw(st.integers(1, 3)), axis=draw(st.integers(0, 1)))
    size = draw(st.integers(1, min(h, w)))
    return a, b, size


@settings(max_examples=200, deadline=None)
@given(image_pairs())
def test_pixel_distance_never_exceeds_full_resolution_l2(pair):
    a, b, size = pair
    e = PixelEmbedder(size)
    ea, eb = e.embed(np.stack([a, b]))
    full = l2(to_square(a), to_square(b))
    assert float(np.linalg.norm(ea.astype(np.float64) - eb)) <= full + 1e-6


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(8, 33), st.floats(-0.5, 0.5))
def test_pixel_distance_equals_l2_when_the_difference_is_constant(size, side, shift):
    """Equality case of the bound: a difference that is constant on every cell survives pooling unchanged."""
    rng = np.random.default_rng(side)
    a = rng.uniform(0.25, 0.75, (side, side, 3))
    b = a + shift * 0.5
    ea, eb = PixelEmbedder(size).embed(np.stack([a, b]))
    assert float(np.linalg.norm(ea.astype(np.float64) - eb)) == pytest.approx(l2(a, b), abs=1e-6)


def test_lower_bound_on_real_photographs_and_their_noisy_copies():
    rng = np.random.default_rng(0)
    e = PixelEmbedder(16)
    names = ("astronaut", "coffee", "chelsea", "rocket", "camera")
    imgs = {n: to_square(photo(n)).astype(np.float64) / 255.0 for n in names}
    for n in names:
        x = imgs[n]
        noisy = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
        ex, en = e.embed(np.stack([x, noisy]))
        full = l2(x, noisy)
        # pooling averages the independent noise away: far below, never above
        assert float(np.linalg.norm(ex - en)) <= full
        assert float(np.linalg.norm(ex - en)) < full / 4


def test_pixel_input_errors():
    e = PixelEmbedder(4)
    with pytest.raises(ValueError, match="NaN"):
        e.embed(np.full((1, 8, 8, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="shape"):
        e.embed(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="4 channels"):
        e.embed(np.zeros((1, 8, 8, 4), np.float32))
    assert e.embed([]).shape == (0, 48)


def test_require_finite_names_the_count():
    v = np.ones((3, 4), np.float32)
    assert require_finite(v, "x") is v
    v[1, 2] = np.inf
    with pytest.raises(ModelError, match="1 of 3"):
        require_finite(v, "x")


def test_get_embedder_and_params():
    e = get_embedder("pixel", {"pixel_size": 8})
    assert (e.name, e.dim, e.metric, e.params) == ("pixel", 192, "l2", {"pixel_size": 8})
    assert embedder_params("pixel", {"pixel_size": 8}) == e.params
    assert get_embedder("pixel", {}).dim == 3 * 16 * 16  # the default pixel_size
    with pytest.raises(InputError, match="unknown embedder"):
        get_embedder("dino", {})
    with pytest.raises(ModelError, match="clip_pretrained"):
        get_embedder("clip", {"clip_pretrained": ""})


# ---------------------------------------------------------------------------- clip

TINY = "memaudit-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real open_clip architecture, tiny, with random weights saved as a local checkpoint file."""
    import open_clip
    import torch

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("clip")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / f"{TINY}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{TINY}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    ckpt = folder / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return ckpt


def test_clip_loads_a_local_checkpoint_and_embeds(tiny_clip: Path):
    import open_clip
    import torch

    e = ClipEmbedder(TINY, str(tiny_clip))
    assert (e.name, e.metric, e.dim) == ("clip", "cosine", 32)
    photos = [Image.fromarray(photo(n)) for n in ("astronaut", "coffee", "chelsea")]
    v = e.embed(photos)
    assert v.shape == (3, 32) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(v[0], v[1])
    # the checkpoint's weights are what is used: a model built from it directly agrees ...
    model = open_clip.create_model(TINY)
    model.load_state_dict(torch.load(tiny_clip))
    model.eval()
    with torch.no_grad():
        ref = model.encode_image(torch.stack([e.preprocess(p) for p in photos]))
    ref = (ref / ref.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(v, ref, atol=1e-5)
    # ... and a differently seeded random model does not
    torch.manual_seed(1)
    other = open_clip.create_model(TINY).eval()
    with torch.no_grad():
        o = other.encode_image(torch.stack([e.preprocess(p) for p in photos]))
    assert not np.allclose(v, (o / o.norm(dim=-1, keepdim=True)).numpy(), atol=1e-3)
    # arrays in [0, 1] give the same embeddings as the 8-bit images they round to
    arr = np.stack([to_square(photo("astronaut"))]).astype(np.float32) / 255.0
    np.testing.assert_allclose(e.embed(arr), e.embed([Image.fromarray(to_square(photo("astronaut")))]), atol=1e-5)
    assert e.params["clip_pretrained"] == str(tiny_clip.resolve())
    assert embedder_params("clip", {"clip_model": TINY, "clip_pretrained": str(tiny_clip)}) == e.params


def test_clip_real_architecture_round_trip(tmp_path: Path):
    """ViT-S-32-alt, the smallest stock open_clip model, saved and reloaded through the same path."""
    import open_clip
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32-alt")
    ckpt = tmp_path / "vit-s-32-alt.pt"
    torch.save(model.state_dict(), ckpt)
    del model
    e = get_embedder("clip", {"clip_model": "ViT-S-32-alt", "clip_pretrained": str(ckpt), "device": "cpu"})
    v = e.embed(np.stack([to_square(photo("rocket"))[:64, :64]]).astype(np.float32) / 255.0)
    assert v.shape == (1, 256)
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5


def test_clip_weight_errors(tiny_clip: Path, tmp_path: Path):
    with pytest.raises(ModelError, match="needs weights"):
        ClipEmbedder(TINY, "")
    with pytest.raises(ModelError, match="no such file; pass a local checkpoint file"):
        ClipEmbedder(TINY, str(tmp_path / "missing.pt"))
    with pytest.raises(ModelError, match="is a folder"):
        ClipEmbedder(TINY, str(tmp_path))
    with pytest.raises(ModelError, match="neither a file nor a pretrained tag"):
        ClipEmbedder("ViT-B-32", "no-such-tag")
    with pytest.raises(ModelError, match="unknown open_clip model"):
        ClipEmbedder("ViT-Nope", str(tiny_clip))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ModelError, match="not a usable"):
        ClipEmbedder(TINY, str(junk))
    with pytest.raises(ModelError, match="not a usable ViT-S-32-alt checkpoint"):
        ClipEmbedder("ViT-S-32-alt", str(tiny_clip))  # weights of another architecture


def test_clip_pretrained_tag_offline_fails_at_once(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as info:
        ClipEmbedder("ViT-B-32", "laion2b_s34b_b79k")
    message = str(info.value)
    assert message.endswith("pass a local checkpoint file as clip_pretrained")
    assert "\n" not in message


def test_clip_nan_weights_raise_instead_of_embedding(tiny_clip: Path, tmp_path: Path):
    import torch

    state = torch.load(tiny_clip)
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    broken = tmp_path / "nan.pt"
    torch.save(state, broken)
    e = ClipEmbedder(TINY, str(broken))
    with pytest.raises(ModelError, match="NaN or inf embeddings for 2 of 2"):
        e.embed([Image.fromarray(photo("astronaut")), Image.fromarray(photo("coffee"))])
