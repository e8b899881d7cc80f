"""Membership inference: the loss against a hand computation, LiRA against a known answer, the
metrics against hand-counted ROCs, a model trained here that is told apart from held-out
images, and the workspace runs (stored, read back, exported)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import membership, membership_runs
from core.errors import InputError
from core.generate import load_pipeline
from core.store import Workspace
from tiny_models import build_text2image, build_unconditional


def write_images(folder: Path, arrays: np.ndarray, prefix: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray((a * 255).round().astype(np.uint8)).save(folder / f"{prefix}-{i:03d}.png")
    return folder


def quantised(rng: np.random.Generator, n: int, size: int = 16) -> np.ndarray:
    """Random images whose values survive a PNG round trip exactly."""
    return rng.integers(0, 256, (n, size, size, 3)).astype(np.float32) / 255.0


def set_prediction_type(model: Path, prediction: str) -> Path:
    cfg_file = model / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = prediction
    cfg_file.write_text(json.dumps(cfg))
    return model


# ---------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_loss_at_a_timestep_matches_a_hand_computation(tmp_path, prediction):
    from diffusers import UNet2DModel

    model = set_prediction_type(build_unconditional(tmp_path / "m"), prediction)
    loaded = load_pipeline(str(model), "cpu")
    d = membership.denoiser(loaded)
    assert d.prediction_type == prediction and d.kind == "unconditional" and d.vae is None
    pixels = quantised(np.random.default_rng(0), 3)
    t, draws, seed = 37, 2, 5
    got = membership.losses(d, loaded, pixels, [None] * 3, timestep=t, draws=draws, seed=seed, batch_size=4)

    # by hand: DDIMScheduler's default linear betas over its 100 training timesteps
    a = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 100, dtype=np.float64))[t])
    unet = UNet2DModel.from_pretrained(model / "unet").eval()
    want = []
    for img in pixels:
        x0 = torch.from_numpy(img).permute(2, 0, 1)[None] * 2 - 1
        per_draw = []
        for k in range(draws):
            eps = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(seed + k))[None]
            xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
            with torch.no_grad():
                pred = unet(xt, torch.tensor([t])).sample
            target = {"epsilon": eps, "sample": x0, "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * x0}[prediction]
            per_draw.append(float(((pred - target) ** 2).mean()))
        want.append(np.mean(per_draw))
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_loss_of_a_latent_text_conditioned_model_uses_the_caption(tmp_path):
    loaded = load_pipeline(str(build_text2image(tmp_path / "sd")), "cpu")
    d = membership.denoiser(loaded)
    assert d.kind == "text" and d.vae is not None and d.size == 16
    pixels = quantised(np.random.default_rng(1), 2)
    a = membership.losses(d, loaded, pixels, ["a red fox", "a red fox"], timestep=10, draws=2, seed=0)
    b = membership.losses(d, loaded, pixels, ["a blue car", "a blue car"], timestep=10, draws=2, seed=0)
    assert np.isfinite(a).all() and not np.allclose(a, b)
    with pytest.raises(InputError, match="has no condition"):
        membership.losses(d, loaded, pixels, [None, "x"], timestep=10, draws=1, seed=0)


def test_loss_of_a_class_conditional_latent_model_uses_the_label(tmp_path):
    from tiny_models import build_class_conditional

    loaded = load_pipeline(str(build_class_conditional(tmp_path / "dit")), "cpu")
    d = membership.denoiser(loaded)
    assert d.kind == "class" and d.vae is not None
    pixels = quantised(np.random.default_rng(2), 2)
    by_name = membership.losses(d, loaded, pixels, ["red fox", "red fox"], timestep=10, draws=2, seed=0)
    by_id = membership.losses(d, loaded, pixels, ["2", "2"], timestep=10, draws=2, seed=0)
    other = membership.losses(d, loaded, pixels, ["0", "0"], timestep=10, draws=2, seed=0)
    np.testing.assert_allclose(by_name, by_id)
    assert not np.allclose(by_id, other)
    with pytest.raises(InputError, match="is not a class"):
        membership.losses(d, loaded, pixels, ["a unicorn", "2"], timestep=10, draws=1, seed=0)


def test_unknown_prediction_type_is_refused(tmp_path):
    loaded = load_pipeline(str(set_prediction_type(build_unconditional(tmp_path / "m"), "flow")), "cpu")
    with pytest.raises(InputError, match="prediction_type is 'flow'"):
        membership.denoiser(loaded)


# ---------------------------------------------------------------------------- LiRA
def test_lira_on_synthetic_gaussians_recovers_the_known_answer():
    """Per image j: OUT losses ~ N(m_j + 1, 0.5), IN losses ~ N(m_j, 0.5), m_j spread over [0, 4].

    The optimal test is the exact log-likelihood ratio; with equal variances its AUC is
    Phi(d / (sd sqrt 2)) = Phi(1.414) = 0.921. A single global loss threshold does far worse,
    because an image's difficulty m_j varies more than membership moves it.
    """
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    n, k, sd = 4000, 64, 0.5
    m = rng.uniform(0, 4, n)
    inside = membership_runs_assign(n, k)
    shadow = np.where(inside, rng.normal(m, sd, (k, n)), rng.normal(m + 1, sd, (k, n)))
    member = rng.random(n) < 0.5
    target = np.where(member, rng.normal(m, sd), rng.normal(m + 1, sd))
    result = membership.lira(target, shadow, inside)
    assert result.sd_in == pytest.approx(sd, rel=0.03) and result.sd_out == pytest.approx(sd, rel=0.03)
    np.testing.assert_allclose(result.mu_in, m, atol=4 * sd / math.sqrt(k / 2))
    exact = norm.logpdf(target, m, sd) - norm.logpdf(target, m + 1, sd)
    assert np.corrcoef(result.online, exact)[0, 1] > 0.98  # the fitted means carry sd / sqrt(32) of noise
    online = membership.roc_metrics(result.online, member)
    assert online.auc == pytest.approx(norm.cdf(1 / (sd * math.sqrt(2))), abs=0.015)
    assert online.auc >= membership.roc_metrics(exact, member).auc - 0.01
    offline = membership.roc_metrics(result.offline, member)
    assert offline.auc == pytest.approx(online.auc, abs=0.01)  # equal variances: one-sided test is as good
    global_threshold = membership.roc_metrics(-target, member)
    assert global_threshold.auc < online.auc - 0.1


def membership_runs_assign(n: int, k: int) -> np.ndarray:
    from core.shadows import assign

    inside = assign(n, k, seed=3)
    assert (inside.sum(0) == k // 2).all()
    return inside


def test_lira_needs_in_and_out_models_for_every_image():
    inside = np.array([[True, True], [True, False]])
    with pytest.raises(InputError, match="at least one shadow"):
        membership.lira(np.zeros(2), np.zeros((2, 2)), inside)


# ---------------------------------------------------------------------------- metrics
def test_roc_metrics_against_hand_counts():
    # members score 5, 4, 2; non-members 3, 1, 0: thresholds give (FPR, TPR) up to (0, 2/3) then (1/3, 2/3)
    scores = np.array([5, 4, 2, 3, 1, 0], dtype=float)
    member = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    m = membership.roc_metrics(scores, member)
    assert m.auc == pytest.approx(8 / 9)  # 8 of the 9 member/non-member pairs are ordered right
    assert m.tpr_at[0.01] == pytest.approx(2 / 3) and m.bounded[0.01] and m.notes
    assert m.balanced_accuracy == pytest.approx((1 + 2 / 3) / 2)  # threshold 3.5: TPR 2/3, TNR 1
    perfect = membership.roc_metrics(np.arange(2000.0), np.arange(2000) >= 1000)
    assert perfect.auc == 1.0 and perfect.tpr_at[0.001] == 1.0 and not perfect.bounded[0.001]
    with pytest.raises(InputError, match="one member and one non-member"):
        membership.roc_metrics(np.ones(3), np.ones(3, dtype=bool))


# ---------------------------------------------------------------------------- a model that memorises
@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A tiny unconditional model trained here on 8 digits; 8 other digits held out."""
    from core.demo.digits import digit_pixels
    from core.demo.trainer import train

    root = tmp_path_factory.mktemp("overfit")
    pixels, _ = digit_pixels()
    pool = pixels[:16].astype(np.float32) / 255.0
    members = write_images(root / "members", pool[:8], "m")
    nonmembers = write_images(root / "nonmembers", pool[8:], "n")
    train(members, root / "model", steps=300, seed=0, size=16, batch_size=8, channels=(16, 32), grid_steps=20,
          unconditional=True, threads=1, checkpoint_every=1000, snapshot_steps=(20,), snapshot_dir=root / "checkpoints")
    return root


def test_a_model_that_memorised_tells_its_training_images_from_held_out_ones(overfit, tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    run_id = membership_runs.run_membership(ws, str(overfit / "model"), overfit / "members", overfit / "nonmembers",
                                            attack="loss", timestep=99, noise_draws=4, seed=0)
    view = membership_runs.run_view(ws, run_id)
    assert view.run.metrics["auc"] >= 0.9, view.run.metrics
    assert view.run.metrics["members"] == 8 and view.run.metrics["nonmembers"] == 8
    assert view.run.params["prediction_type"] == "sample"
    assert max(view.member_scores) > max(view.nonmember_scores)
    assert [h["idx"] for h in view.hardest] == [e["idx"] for e in view.easiest][::-1]
    for h in view.hardest:  # the images were copied into the workspace
        assert ws.resolve(h["image"]).is_file() and h["duplicates"] == 1
    from core.maintenance import backup, verify

    report = verify(ws)
    assert report.ok and report.checked_files == 16 and not report.orphans
    copy = Workspace.open(backup(ws, tmp_path / "backup"))
    assert all(copy.resolve(r["image"]).is_file() for r in membership_runs.scores(copy, run_id))


def test_checkpoints_form_a_trend_with_the_held_out_loss(overfit, tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    runs = membership_runs.run_checkpoints(ws, overfit / "checkpoints", overfit / "members", overfit / "nonmembers",
                                           final_model=overfit / "model", timestep=99, noise_draws=2)
    view = membership_runs.run_view(ws, runs[-1])
    assert [t["step"] for t in view.trend] == [20, 300]
    assert all(t["quality_measure"] == "held_out_loss" and t["quality"] > 0 for t in view.trend)
    assert view.trend[1]["auc"] > view.trend[0]["auc"]


def test_bad_sets_are_refused_before_anything_is_written(overfit, tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    model = str(overfit / "model")
    before = sorted(p.name for p in ws.root.rglob("*"))
    with pytest.raises(InputError, match="both members and non-members"):
        membership_runs.run_membership(ws, model, overfit / "members", overfit / "members")
    copy = tmp_path / "copy"
    shutil.copytree(overfit / "members", copy)
    with pytest.raises(InputError, match="same bytes as a member"):
        membership_runs.run_membership(ws, model, overfit / "members", copy)
    big = write_images(tmp_path / "big", np.zeros((2, 32, 32, 3)))
    with pytest.raises(InputError, match="is 32 x 32; this model takes 16 x 16"):
        membership_runs.run_membership(ws, model, overfit / "members", big)
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    Image.new("RGBA", (16, 16), (1, 2, 3, 128)).save(rgba / "a.png")
    with pytest.raises(InputError, match="mode RGBA"):
        membership_runs.run_membership(ws, model, overfit / "members", rgba)
    with pytest.raises(InputError, match="needs --shadow-dir"):
        membership_runs.run_membership(ws, model, overfit / "members", overfit / "nonmembers", attack="lira")
    assert sorted(p.name for p in ws.root.rglob("*")) == before
    assert membership_runs.list_runs(ws) == []


# ---------------------------------------------------------------------------- FID with a local Inception checkpoint
def test_frechet_distance_of_gaussians_matches_the_closed_form():
    from core.quality import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 4))
    b = rng.normal([1, 0, 2, 0], [1, 1, 1, 2], (20000, 4))
    # |mu_a - mu_b|^2 = 5; covariances I and diag(1, 1, 1, 4): tr = 4 + 7 - 2 (1 + 1 + 1 + 2) = 1
    assert frechet_distance(a, b) == pytest.approx(6.0, abs=0.1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow  # Inception-v3 at 299 x 299 on the CPU
def test_trend_uses_fid_when_an_inception_checkpoint_is_given(overfit, tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    ckpt = tmp_path / "inception.pt"
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=True).state_dict(), ckpt)
    ws = Workspace.init(tmp_path / "ws")
    runs = membership_runs.run_checkpoints(ws, overfit / "checkpoints", overfit / "members", overfit / "nonmembers",
                                           timestep=99, noise_draws=1, inception=ckpt, fid_samples=8, fid_steps=5)
    info = membership_runs.get_run(ws, runs[0])
    assert info.quality_measure == "fid" and info.quality > 0
    with pytest.raises(InputError, match="no such Inception checkpoint"):
        membership_runs.run_checkpoints(ws, overfit / "checkpoints", overfit / "members", overfit / "nonmembers",
                                        inception=tmp_path / "missing.pt")
