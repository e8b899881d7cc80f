"""core.demo.trainer: the training loop, its resume guarantee, and that it really memorises real images."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.demo.data import DEMO_DATA_DIR
from core.errors import InputError
from core.demo.model import CaptionConditionedPipeline
from core.demo.trainer import STATE_FILE, main, measure_copies, read_training_set, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def distinct_demo_images(n: int) -> list[Path]:
    """The first copy of n different shipped demo images (real photographs and scans)."""
    seen, out = set(), []
    for f in sorted(DEMO_DATA_DIR.glob("*.png")):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(f)
    assert len(out) >= n
    # spread the pick over the whole set rather than one kind of image
    return [out[i] for i in np.linspace(0, len(out) - 1, n).round().astype(int)]


def make_set(folder: Path, images: list[Path], copies: list[int] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    copies = copies or [1] * len(images)
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        for i, (src, k) in enumerate(zip(images, copies)):
            for j in range(k):
                name = f"img{i}-{j}.png"
                shutil.copyfile(src, folder / name)
                w.writerow([name, f"caption {i}"])
    return folder


TINY = dict(size=8, channels=(8, 16), batch_size=4, grid_steps=4)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_training_writes_a_loadable_pipeline_and_log(tmp_path):
    data = make_set(tmp_path / "data", distinct_demo_images(3), copies=[2, 1, 1])
    report = train(data, tmp_path / "model", steps=20, seed=1, **TINY)
    assert report.steps == 20 and report.examples == 4 and report.captions == 3 and report.resumed_from == 0
    assert np.isfinite(report.final_loss)
    pipe = CaptionConditionedPipeline.from_pretrained(str(tmp_path / "model"))
    assert pipe.captions == ["caption 0", "caption 1", "caption 2"]
    assert pipe.sample_size == 8 and pipe.config.default_steps == 4
    log = json.loads((tmp_path / "model" / "training.json").read_text())
    assert log["config"]["steps"] == 20 and log["config"]["seed"] == 1
    assert log["data"]["examples"] == 4 and log["parameters"] == report.parameters
    assert not (tmp_path / "model" / STATE_FILE).exists()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    data = make_set(tmp_path / "data", distinct_demo_images(2))
    train(data, tmp_path / "a", steps=6, seed=3, **TINY)
    train(data, tmp_path / "b", steps=6, seed=3, **TINY)
    train(data, tmp_path / "c", steps=6, seed=4, **TINY)
    a, b, c = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    data = make_set(tmp_path / "data", distinct_demo_images(3), copies=[3, 1, 1])
    train(data, tmp_path / "whole", steps=12, seed=0, checkpoint_every=5, **TINY)

    def crash(step: int, total: int, loss: float) -> None:
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "cut", steps=12, seed=0, checkpoint_every=5, progress=crash, **TINY)
    assert (tmp_path / "cut" / STATE_FILE).exists()
    report = train(data, tmp_path / "cut", steps=12, seed=0, checkpoint_every=5, **TINY)
    assert report.resumed_from == 5
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_a_shorter_run_equals_the_checkpoint_of_a_longer_one(tmp_path):
    # constant learning rate: `--steps N` gives the weights a longer run had at step N
    data = make_set(tmp_path / "data", distinct_demo_images(2))
    seen = {}

    def grab(step: int, total: int, loss: float) -> None:
        if step == 7:  # the checkpoint of step 6 has just been written
            seen.update({k: v.clone() for k, v in weights(tmp_path / "long").items()})

    train(data, tmp_path / "long", steps=10, seed=0, checkpoint_every=6, progress=grab, **TINY)
    train(data, tmp_path / "short", steps=6, seed=0, **TINY)
    short = weights(tmp_path / "short")
    assert seen and all(torch.equal(seen[k], short[k]) for k in short)


def test_resume_refuses_an_unfinished_run_with_other_settings(tmp_path):
    data = make_set(tmp_path / "data", distinct_demo_images(2))

    def crash(step: int, total: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "m", steps=6, seed=0, checkpoint_every=2, progress=crash, **TINY)
    with pytest.raises(InputError, match="unfinished run with other settings"):
        train(data, tmp_path / "m", steps=6, seed=1, checkpoint_every=2, **TINY)
    report = train(data, tmp_path / "m", steps=6, seed=1, resume=False, **TINY)
    assert report.resumed_from == 0


def test_training_set_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="captions.csv"):
        read_training_set(tmp_path)
    (tmp_path / "captions.csv").write_text("file,caption\nmissing.png,a cat\n")
    with pytest.raises(InputError, match="'missing.png', which is not a file"):
        read_training_set(tmp_path)
    shutil.copyfile(distinct_demo_images(1)[0], tmp_path / "x.png")
    (tmp_path / "captions.csv").write_text("file,caption\nx.png,\n")
    with pytest.raises(InputError, match="empty caption"):
        read_training_set(tmp_path)
    (tmp_path / "captions.csv").write_text("name,text\nx.png,a cat\n")
    with pytest.raises(InputError, match="columns file,caption"):
        read_training_set(tmp_path)


def test_bad_settings_raise_input_error(tmp_path):
    data = make_set(tmp_path / "data", distinct_demo_images(1))
    with pytest.raises(InputError, match="divisible"):
        train(data, tmp_path / "m", steps=1, size=10, channels=(8, 16, 16))
    with pytest.raises(InputError, match="steps must be >= 1"):
        train(data, tmp_path / "m", steps=0)


def test_command_line_entry(tmp_path, capsys):
    data = make_set(tmp_path / "data", distinct_demo_images(2))
    rc = main(["--data", str(data), "--out", str(tmp_path / "m"), "--steps", "3", "--seed", "2", "--size", "8",
               "--channels", "8,16", "--batch-size", "2", "--grid-steps", "4", "--threads", "1"])
    assert rc == 0
    assert "saved" in capsys.readouterr().out
    assert (tmp_path / "m" / "model_index.json").exists()
    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2"), "--steps", "3"]) == 1
    assert "captions.csv" in capsys.readouterr().err


def test_a_tiny_model_memorises_eight_real_images(tmp_path):
    """8 real images at 16 x 16, one caption each: after 600 steps most generations are copies."""
    data = make_set(tmp_path / "data", distinct_demo_images(8))
    train(data, tmp_path / "m", steps=600, seed=0, size=16, channels=(16, 32), batch_size=32, grid_steps=10)
    results = measure_copies(tmp_path / "m", data, per_prompt=8, tau=0.1)
    fractions = [r.copy_fraction for r in results]
    assert np.mean(fractions) >= 0.75, fractions
    assert sum(f >= 0.5 for f in fractions) >= 6, fractions
    assert all(r.duplicates == 1 and r.images == 1 for r in results)


def test_unconditional_training_from_a_manifest_with_checkpoints_along_the_way(tmp_path):
    """No captions needed; the manifest picks the examples; snapshots are loadable pipelines."""
    from diffusers import DDIMPipeline

    data = tmp_path / "data"
    data.mkdir()
    for i, f in enumerate(distinct_demo_images(3)):
        shutil.copyfile(f, data / f"{i}.png")
    (tmp_path / "half.csv").write_text("file\n0.png\n2.png\n")
    assert len(read_training_set(data, unconditional=True).files) == 3  # a folder without captions.csv: every image
    assert [p.name for p in read_training_set(data, tmp_path / "half.csv", unconditional=True).files] == ["0.png", "2.png"]
    report = train(data, tmp_path / "m", steps=4, seed=0, unconditional=True, manifest=tmp_path / "half.csv",
                   snapshot_steps=(2,), snapshot_dir=tmp_path / "ckpt", **TINY)
    assert report.examples == 2
    pipe = DDIMPipeline.from_pretrained(tmp_path / "m")
    assert pipe.unet.config.num_class_embeds is None
    snap = DDIMPipeline.from_pretrained(tmp_path / "ckpt" / "step-2")
    assert any((a != b).any() for a, b in zip(snap.unet.parameters(), pipe.unet.parameters()))
