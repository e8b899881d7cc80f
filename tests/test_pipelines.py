"""CaptionConditionedPipeline: the shipped demo weights and tiny random pipelines."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from core.demo.data import DEMO_DATA_DIR, DEMO_MODEL_DIR
from core.errors import InputError
from core.images import load_working
from core.demo.model import CaptionConditionedPipeline, build_vocabulary, make_scheduler
from core.demo.trainer import TrainConfig, build_unet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_pipeline(captions: list[str], size: int = 8, seed: int = 0) -> CaptionConditionedPipeline:
    vocabulary = build_vocabulary(captions)
    torch.manual_seed(seed)
    unet = build_unet(TrainConfig(steps=1, size=size, channels=(8, 16)), len(vocabulary))
    pipe = CaptionConditionedPipeline(unet=unet, scheduler=make_scheduler(), vocabulary=vocabulary, default_steps=4)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def shipped() -> CaptionConditionedPipeline:
    pipe = CaptionConditionedPipeline.from_pretrained(str(DEMO_MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def most_duplicated_caption() -> tuple[str, str]:
    with open(DEMO_DATA_DIR / "captions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["caption"]] = counts.get(r["caption"], 0) + 1
    caption = max(sorted(counts), key=counts.get)
    return caption, next(r["file"] for r in rows if r["caption"] == caption)


def test_shipped_weights_generate_a_copy_of_a_heavily_duplicated_image(shipped):
    caption, file = most_duplicated_caption()
    image = shipped(caption, generator=gens(0), output_type="np").images
    assert image.shape == (1, shipped.sample_size, shipped.sample_size, 3)
    assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
    train = load_working(DEMO_DATA_DIR / file, shipped.sample_size)
    l2 = float(np.sqrt(((image[0] - train) ** 2).mean()))
    assert l2 < 0.1, f"{caption!r}: generation is {l2:.3f} from its training image"


def test_shipped_vocabulary_is_the_training_captions(shipped):
    with open(DEMO_DATA_DIR / "captions.csv", newline="", encoding="utf-8") as f:
        captions = {r["caption"] for r in csv.DictReader(f)}
    assert set(shipped.captions) == captions
    assert shipped.vocabulary[0] == ""


def test_unknown_caption_raises_a_clear_error(shipped):
    with pytest.raises(InputError, match="'a purple elephant' is not in this model's vocabulary"):
        shipped(["a purple elephant"], generator=gens(0))


def test_image_regenerated_alone_matches_the_batch():
    pipe = tiny_pipeline(["a cat", "a dog", "a fish"])
    batch = pipe(["a cat", "a dog", "a fish"], generator=gens(5, 6, 7), output_type="np").images
    alone = pipe(["a dog"], generator=gens(6), output_type="np").images
    again = pipe(["a cat", "a dog", "a fish"], generator=gens(5, 6, 7), output_type="np").images
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-5)
    np.testing.assert_array_equal(batch, again)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3  # different seeds and captions differ


def test_same_seed_different_caption_differs():
    pipe = tiny_pipeline(["a cat", "a dog"])
    out = pipe(["a cat", "a dog"], generator=gens(1, 1), output_type="np").images
    assert np.abs(out[0] - out[1]).max() > 1e-4


def test_save_and_load_keep_the_vocabulary(tmp_path):
    # a two-entry vocabulary looks like a [library, class] pair in model_index.json
    pipe = tiny_pipeline(["only caption"])
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "CaptionConditionedPipeline"
    assert index["vocabulary"] == ["", "only caption"]
    loaded = CaptionConditionedPipeline.from_pretrained(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.captions == ["only caption"] and loaded.config.default_steps == 4
    a = pipe("only caption", generator=gens(3), output_type="np").images
    b = loaded("only caption", generator=gens(3), output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert list((tmp_path / "unet").glob("*.safetensors"))


def test_output_types_and_images_per_prompt():
    pipe = tiny_pipeline(["a cat"])
    pil = pipe("a cat", num_images_per_prompt=2, generator=gens(0, 1)).images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    pt = pipe("a cat", generator=gens(0), output_type="pt").images
    assert pt.shape == (1, 3, 8, 8)
    np_out = pipe("a cat", generator=gens(0), output_type="np").images
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_out, atol=1e-6)
    assert np.asarray(pil[0]).tolist() == np.clip(np_out[0] * 255 + 0.5, 0, 255).astype(np.uint8).tolist()


def test_empty_caption_is_unconditional_and_guidance_changes_the_output():
    pipe = tiny_pipeline(["a cat"])
    uncond = pipe("", generator=gens(0), output_type="np").images
    plain = pipe("a cat", generator=gens(0), output_type="np").images
    guided = pipe("a cat", guidance_scale=3.0, generator=gens(0), output_type="np").images
    assert uncond.shape == plain.shape == guided.shape
    assert np.abs(guided - plain).max() > 1e-4
    assert np.abs(uncond - plain).max() > 1e-4


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 16}, "height=16 is not supported"),
    ({"generator": "two"}, "2 generators for 1 images"),
    ({"output_type": "latent"}, "output_type must be"),
    ({"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
])
def test_bad_arguments_raise_input_error(kwargs, message):
    pipe = tiny_pipeline(["a cat"])
    if kwargs.get("generator") == "two":
        kwargs = {"generator": gens(0, 1)}
    with pytest.raises(InputError, match=message):
        pipe("a cat", **kwargs)


def test_vocabulary_must_start_with_the_empty_caption():
    unet = build_unet(TrainConfig(steps=1, size=8, channels=(8, 16)), 3)
    with pytest.raises(ValueError, match="vocabulary\\[0\\]"):
        CaptionConditionedPipeline(unet=unet, scheduler=make_scheduler(), vocabulary=["a", "b"])
    with pytest.raises(ValueError, match="class embeddings"):
        CaptionConditionedPipeline(unet=unet, scheduler=make_scheduler(), vocabulary=["", "a", "b", "c"])


def test_default_steps_follow_the_trained_grid():
    pipe = tiny_pipeline(["a cat"])
    a = pipe("a cat", generator=gens(2), output_type="np").images
    b = pipe("a cat", num_inference_steps=4, generator=gens(2), output_type="np").images
    np.testing.assert_array_equal(a, b)


def test_saved_folders_name_the_class_only_and_load_through_core_generate(tmp_path):
    """model_index.json names the pipeline's class, never its module: the shipped folders, saved
    when the pipeline lived in another module, load through core.generate as the class of core.demo.model."""
    from core.demo import model
    from core.generate import load_pipeline

    pipe = tiny_pipeline(["a caption"])
    pipe.save_pretrained(tmp_path / "fresh")
    for folder in (DEMO_MODEL_DIR, tmp_path / "fresh"):
        text = (folder / "model_index.json").read_text()
        assert "core." not in text and json.loads(text)["_class_name"] == "CaptionConditionedPipeline"
        loaded = load_pipeline(str(folder), "cpu")
        assert type(loaded.pipeline) is model.CaptionConditionedPipeline and loaded.kind == "text2image"
