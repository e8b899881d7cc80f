"""The inpainting attack (core.inpaint, core.repaint): RePaint keeps what is known, a model trained
here completes its members far better than held-out images, the CLI end to end, and bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import inpaint
from core.errors import ImageError, InputError, ModelError
from core.store import Workspace
from test_bad_input import assert_one_line_error, run, snapshot


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_images(folder: Path, n: int, size: int = 16, seed: int = 0, mode: str = "RGB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode).save(folder / f"img-{i}.png")
    return folder


# ---------------------------------------------------------------------------- masks and distance
def test_named_masks_cover_the_stated_region():
    left = inpaint.named_mask("left", 8)
    assert left[:, :4].all() and not left[:, 4:].any()
    assert (inpaint.named_mask("right", 8) == left[:, ::-1]).all()
    assert (inpaint.named_mask("top", 8) == left.T).all()
    assert (inpaint.named_mask("bottom", 8) == left.T[::-1]).all()
    center = inpaint.named_mask("center", 8)
    assert center.sum() == 16 and center[2:6, 2:6].all()


def test_masked_l2_against_a_hand_computation():
    a = np.zeros((2, 2, 3))
    b = np.zeros((2, 2, 3))
    a[0, 0] = 0.5        # inside the mask
    a[1, 1] = 1.0        # outside: must not count
    mask = np.array([[True, False], [True, False]])
    # masked values: 2 pixels x 3 channels = 6, squared differences 3 x 0.25
    assert inpaint.masked_l2(a, b, mask) == pytest.approx(np.sqrt(0.75 / 6))
    assert inpaint.masked_l2(np.stack([a, b]), b, mask).tolist() == pytest.approx([np.sqrt(0.75 / 6), 0.0])


def test_mask_files_are_read_white_as_reconstruct_and_checked(tmp_path):
    arr = np.zeros((16, 16), dtype=np.uint8)
    arr[:, 10:] = 255
    Image.fromarray(arr).save(tmp_path / "m.png")
    assert (inpaint.load_mask(str(tmp_path / "m.png"), 16) == (arr > 0)).all()
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "all.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "none.png")
    Image.fromarray(arr[:8, :8]).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="covers the whole image"):
        inpaint.load_mask(str(tmp_path / "all.png"), 16)
    with pytest.raises(InputError, match="covers nothing"):
        inpaint.load_mask(str(tmp_path / "none.png"), 16)
    with pytest.raises(InputError, match="8 x 8 but the model works at 16 x 16"):
        inpaint.load_mask(str(tmp_path / "small.png"), 16)
    with pytest.raises(InputError, match="not one of left, right"):
        inpaint.load_mask("diagonal", 16)


# ---------------------------------------------------------------------------- RePaint
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_repaint_keeps_the_known_region_exactly(tmp_path, kind):
    from diffusers import DiffusionPipeline

    from core.repaint import repaint
    from tiny_models import build_unconditional

    pipe = DiffusionPipeline.from_pretrained(build_unconditional(tmp_path / kind, scheduler=kind))
    g = torch.Generator().manual_seed(0)
    known = torch.rand((3, 3, 16, 16), generator=g) * 2 - 1
    mask = torch.from_numpy(inpaint.named_mask("center", 16)[None, None].astype(np.float32))
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    out = repaint(pipe.unet, pipe.scheduler, known, mask, gens, steps=6)
    keep = mask.expand_as(known) == 0
    assert torch.equal(out[keep], known[keep])
    assert not torch.allclose(out[~keep], known[~keep])           # the masked part was really redrawn
    assert (out.abs() <= 1).all()
    # each completion depends on its own generator only: sample 1 drawn alone equals sample 1 of the batch
    alone = repaint(pipe.unet, pipe.scheduler, known[1:2], mask, [torch.Generator().manual_seed(6)], steps=6)
    assert torch.allclose(alone, out[1:2], atol=1e-5)
    assert pipe.scheduler.num_inference_steps is None              # the pipeline's own scheduler was not touched


def test_a_stored_run_keeps_known_pixels_and_records_every_completion(tmp_path, tiny_unconditional):
    ws = Workspace.init(tmp_path / "ws")
    random_images(tmp_path / "m", 2, seed=1)
    random_images(tmp_path / "n", 2, size=32, seed=2)   # square, twice the size: resized
    report = inpaint.run_inpainting(ws, str(tiny_unconditional), tmp_path / "m", tmp_path / "n", mask="left",
                                    samples=3, steps=4, seed=10, device="cpu")
    images = inpaint.run_images(ws, report.run_id)
    assert [i.member for i in images] == [True, True, False, False]
    mask = inpaint.named_mask("left", 16)
    for im in images:
        original = np.asarray(Image.open(ws.resolve(im.path)))
        assert len(im.samples) == 3 and [s["seed"] for s in im.samples] == [10, 11, 12]
        dists = []
        for s in im.samples:
            done = np.asarray(Image.open(ws.resolve(s["path"])))
            assert (done[~mask] == original[~mask]).all()
            dists.append(inpaint.masked_l2(done / 255.0, original / 255.0, mask))
            assert s["distance"] == pytest.approx(dists[-1]) and s["loss"] > 0
        assert im.distance_best == pytest.approx(min(dists)) and im.distance_mean == pytest.approx(np.mean(dists))
        losses = [s["loss"] for s in im.samples]
        assert im.chosen_sample == int(np.argmin(losses)) and im.distance_chosen == pytest.approx(dists[im.chosen_sample])
    run = inpaint.get_run(ws)
    assert (run.members, run.nonmembers, run.samples, run.params["method"]) == (2, 2, 3, "repaint")
    # the same run again draws the same completions
    again = inpaint.run_inpainting(ws, str(tiny_unconditional), tmp_path / "m", tmp_path / "n", mask="left",
                                   samples=3, steps=4, seed=10, device="cpu")
    assert [i.distance_best for i in inpaint.run_images(ws, again.run_id)] == [i.distance_best for i in images]


def test_a_model_saved_with_another_scheduler_is_sampled_with_ddim_on_its_schedule(tmp_path, tiny_unconditional):
    from diffusers import DDPMPipeline, PNDMScheduler

    pipe = DDPMPipeline.from_pretrained(tiny_unconditional)
    DDPMPipeline(unet=pipe.unet, scheduler=PNDMScheduler.from_config(pipe.scheduler.config)).save_pretrained(tmp_path / "pndm")
    ws = Workspace.init(tmp_path / "ws")
    report = inpaint.run_inpainting(ws, str(tmp_path / "pndm"), random_images(tmp_path / "m", 1), samples=2, steps=3,
                                    device="cpu")
    run = inpaint.get_run(ws, report.run_id)
    assert (run.params["scheduler"], run.params["sampler"]) == ("PNDMScheduler", "DDIMScheduler")
    assert all(len(i.samples) == 2 for i in inpaint.run_images(ws, report.run_id))


def test_a_cancelled_run_keeps_nothing(tmp_path, tiny_unconditional):
    ws = Workspace.init(tmp_path / "ws")
    random_images(tmp_path / "m", 3)
    before = snapshot(ws.root)[1]
    calls = []
    report = inpaint.run_inpainting(ws, str(tiny_unconditional), tmp_path / "m", samples=2, steps=2, batch_size=2,
                                    device="cpu", should_stop=lambda: bool(calls.append(1)) or len(calls) > 1)
    assert report.stopped and report.run_id is None
    assert inpaint.list_runs(ws) == [] and snapshot(ws.root)[1] == before


@pytest.fixture(scope="module")
def tiny_inpainting(tmp_path_factory):
    from tiny_models import build_text2image

    return build_text2image(tmp_path_factory.mktemp("sd-inpaint") / "model", inpainting=True)


def test_a_diffusers_inpainting_pipeline_is_called_as_it_is(tmp_path, tiny_inpainting):
    model = tiny_inpainting
    ws = Workspace.init(tmp_path / "ws")
    random_images(tmp_path / "m", 2)
    report = inpaint.run_inpainting(ws, str(model), tmp_path / "m", samples=2, steps=2, device="cpu")
    images = inpaint.run_images(ws, report.run_id)
    assert inpaint.get_run(ws).params["method"] == "pipeline"
    assert all(i.distance_chosen is None and len(i.samples) == 2 and 0 <= i.distance_best <= 1 for i in images)


# ---------------------------------------------------------------------------- the attack works
def test_a_tiny_trained_model_completes_its_members_far_better_than_held_out_images(tmp_path):
    """8 real images at 16 x 16 (the fast memorisation recipe, about 40 s): their masked left halves are
    reconstructed much closer than those of 8 other real images the model never saw."""
    from core.images import load_working, save_png_atomic
    from core.demo.trainer import train
    from test_train import distinct_demo_images

    pool = distinct_demo_images(16)
    members, held_out = pool[0::2], pool[1::2]
    data = tmp_path / "train"
    data.mkdir()
    (tmp_path / "held-out").mkdir()
    # the photographs are not square: both sets are square crops at the model's size (the training rule)
    with open(data / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        for i, src in enumerate(members):
            save_png_atomic(load_working(src, 16), data / f"m{i}.png")
            w.writerow([f"m{i}.png", "an image"])   # one caption: an unconditional model in effect
    for i, src in enumerate(held_out):
        save_png_atomic(load_working(src, 16), tmp_path / "held-out" / f"h{i}.png")
    train(data, tmp_path / "model", steps=600, seed=0, size=16, channels=(16, 32), batch_size=32, grid_steps=10)
    ws = Workspace.init(tmp_path / "ws")
    report = inpaint.run_inpainting(ws, str(tmp_path / "model"), data, tmp_path / "held-out", mask="left", samples=4,
                                    device="cpu")
    s = inpaint.summary(ws, report.run_id)
    assert s["condition"] == "an image"
    chosen = s["chosen"]
    assert chosen["members"]["median"] * 2 < chosen["nonmembers"]["median"], chosen
    assert chosen["auc"] >= 0.9, chosen
    assert s["best"]["members"]["median"] <= chosen["members"]["median"]


# ---------------------------------------------------------------------------- the CLI
def test_cli_end_to_end_with_export(tmp_path, tiny_unconditional, capsys):
    ws = tmp_path / "ws"
    assert run(capsys, "init", ws)[0] == 0
    random_images(tmp_path / "a", 3, seed=3)
    random_images(tmp_path / "b", 2, seed=4, mode="L")        # grayscale: converted to the model's RGB
    code, out, err = run(capsys, "inpaint", ws, "--model", tiny_unconditional, "--images", tmp_path / "a",
                         "--nonmembers", tmp_path / "b", "--mask", "top", "--samples", "2", "--steps", "3", "--seed", "7",
                         "--device", "cpu", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert (data["members"], data["nonmembers"], data["mask"], data["samples"]) == (3, 2, "top", 2)
    code, out, _ = run(capsys, "inpaint", ws, "--model", tiny_unconditional, "--images", tmp_path / "a",
                       "--samples", "2", "--steps", "3", "--device", "cpu")
    assert code == 0 and "best of N (oracle bound)" in out and "model-chosen (lowest loss)" in out

    code, out, _ = run(capsys, "export", ws, "--format", "json", "--out", "-")
    assert code == 0
    runs = json.loads(out)["inpainting_runs"]
    assert [r["mask"] for r in runs] == ["top", "left"] and runs[0]["samples"] == 2
    image = runs[0]["images"][3]
    assert image["member"] is False and image["path"].endswith("img-0.png")
    for key in ("distance_best", "distance_mean", "distance_chosen"):
        assert 0 <= image[key] <= 1
    assert image["distance_best"] <= image["distance_chosen"] and len(image["reconstructions"]) == 2
    assert all((ws / r["path"]).is_file() for r in image["reconstructions"])
    assert run(capsys, "verify", ws)[0] == 0


def test_a_manifest_with_a_member_column_gives_both_sets(tmp_path, tiny_unconditional):
    random_images(tmp_path / "imgs", 4)
    with open(tmp_path / "split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "member", "label"])
        for i in range(4):
            w.writerow([f"imgs/img-{i}.png", i % 2, "x"])
    ws = Workspace.init(tmp_path / "ws")
    report = inpaint.run_inpainting(ws, str(tiny_unconditional), tmp_path / "split.csv", samples=1, steps=2, device="cpu")
    assert [i.member for i in inpaint.run_images(ws, report.run_id)] == [False, True, False, True]


# ---------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_and_stores_nothing(tmp_path, tiny_unconditional, tiny_text2image, capsys):
    ws = tmp_path / "ws"
    Workspace.init(ws)
    good = random_images(tmp_path / "good", 2)
    other = random_images(tmp_path / "other", 2, seed=9)
    overlap = tmp_path / "overlap"
    shutil.copytree(other, overlap)
    shutil.copyfile(good / "img-0.png", overlap / "same-pixels.png")
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.new("RGB", (32, 16), (9, 9, 9)).save(wide / "w.png")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "all.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "none.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "small.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["inpaint", ws, "--samples", "1", "--steps", "2", "--device", "cpu"]
    cases = [
        (["--model", tiny_text2image, "--images", good], "latent space"),
        (["--model", tmp_path / "nowhere", "--images", good], "no such model folder"),
        (["--model", tiny_unconditional, "--images", good, "--mask", tmp_path / "all.png"], "covers the whole image"),
        (["--model", tiny_unconditional, "--images", good, "--mask", tmp_path / "none.png"], "covers nothing"),
        (["--model", tiny_unconditional, "--images", good, "--mask", tmp_path / "small.png"], "8 x 8 but the model works at 16 x 16"),
        (["--model", tiny_unconditional, "--images", good, "--mask", "diagonal"], "not one of left"),
        (["--model", tiny_unconditional, "--images", good, "--nonmembers", overlap], "both members and non-members"),
        (["--model", tiny_unconditional, "--images", wide], "32 x 16, not square"),
        (["--model", tiny_unconditional, "--images", corrupt], "c.png"),
        (["--model", tiny_unconditional, "--images", empty], "holds no images"),
        (["--model", tiny_unconditional, "--images", tmp_path / "missing"], "no such folder or manifest"),
        (["--model", tiny_unconditional, "--images", good, "--samples", "0"], "inpaint_samples must be >= 1"),
    ]
    before = snapshot(ws)
    for extra, needle in cases:
        code, _, err = run(capsys, *base, *extra)
        assert_one_line_error(code, err, needle)
        assert snapshot(ws) == before, extra


def test_core_raises_user_errors_not_bugs(tmp_path, tiny_unconditional, tiny_class_conditional):
    ws = Workspace.init(tmp_path / "ws")
    good = random_images(tmp_path / "good", 1)
    with pytest.raises(ModelError, match="latent space"):
        inpaint.run_inpainting(ws, str(tiny_class_conditional), good, device="cpu")
    with pytest.raises(InputError, match="no inpainting run yet"):
        inpaint.get_run(ws)
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.new("RGB", (20, 16)).save(wide / "w.png")
    with pytest.raises(ImageError, match="not square"):
        inpaint.run_inpainting(ws, str(tiny_unconditional), wide, device="cpu")


# ---------------------------------------------------------------------------- the demo step
def test_the_demo_step_samples_members_and_non_members_and_skips_without_the_digits(tmp_path, tiny_unconditional):
    from core.demo.runner import demo_inpainting

    ws = Workspace.init(tmp_path / "ws")
    notes: list[str] = []
    assert demo_inpainting(ws, tmp_path / "digits", notes=notes) is None
    assert len(notes) == 1 and "inpainting skipped" in notes[0] and inpaint.list_runs(ws) == []

    digits = tmp_path / "digits"   # the layout the digits demo ships: members/, nonmembers/, split.csv, model/
    random_images(digits / "members", 4, seed=1)
    random_images(digits / "nonmembers", 4, seed=2)
    shutil.copytree(tiny_unconditional, digits / "model")
    with open(digits / "split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "member", "label"])
        for i in range(4):
            w.writerows([[f"members/img-{i}.png", 1, i], [f"nonmembers/img-{i}.png", 0, i]])
    s = demo_inpainting(ws, digits, per_group=3, steps=2)
    assert (s["members"], s["nonmembers"], s["mask"]) == (3, 3, "left")
    assert demo_inpainting(ws, digits, per_group=3, steps=2)["run_id"] == s["run_id"]   # a rerun reuses the run
