"""Membership inference against a diffusion model: was this image in its training set?

Two attacks (Carlini et al. 2023, section 6), both on the diffusion training loss.

**Loss at a timestep.** For an image ``x0`` (pixels in [-1, 1]; for a latent model the VAE
encoding's mean times the VAE's scaling factor), a timestep ``t`` with cumulative alpha
``a = alphas_cumprod[t]`` of the model's own scheduler, and noise draws ``eps_k``::

    x_t    = sqrt(a) x0 + sqrt(1 - a) eps_k
    target = eps_k                             (prediction_type "epsilon")
           = x0                                ("sample")
           = sqrt(a) eps_k - sqrt(1 - a) x0    ("v_prediction")
    loss   = mean_k mean_pixels (model(x_t, t, c) - target)^2

``eps_k`` is drawn from ``torch.Generator().manual_seed(seed + k)``, the same K draws for
every image (common random numbers: two images' losses differ by the model, not by luck). The
condition ``c`` is the image's caption (text-to-image models), its class id or name (class-
conditional), or nothing (unconditional). Lower loss suggests membership: the score is
``-loss``.

**LiRA** (Carlini et al. 2022). K shadow models (``core.shadows``) were trained on random
halves of a pool holding the images, so each image was IN for half of them. Per image, the
shadows' losses fit a Gaussian IN (mean ``mu_in``) and a Gaussian OUT (mean ``mu_out``); with
few shadows (the usual case) one standard deviation per side is pooled over all images, as
the LiRA paper advises (with one IN and one OUT model per image, around the per-image mean of
both). For the target model's loss ``l``:

    online  = log N(l; mu_in, sd_in) - log N(l; mu_out, sd_out)
    offline = -log P[L_out <= l] = -log Phi((l - mu_out) / sd_out)      (OUT models only)

Both are larger for members. Offline needs no model trained on the image, so it is what an
auditor can run when retraining with the image is impossible.

**Metrics** (scikit-learn's ``roc_curve`` and ``auc``): the ROC, its area, the TPR at 1% and
0.1% FPR (the largest TPR at an FPR at or below the target), and balanced accuracy (the best
threshold's mean of TPR and TNR). With fewer than 1/f non-members no threshold has FPR exactly
f > 0; the TPR then is the one at FPR 0, a lower bound of the TPR at f, and the result says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError, ModelError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
FPR_POINTS = (0.01, 0.001)


# ---------------------------------------------------------------------------- the loss
@dataclass(frozen=True)
class Denoiser:
    """What the loss needs from a loaded pipeline."""
    model: Any  # UNet2DModel, UNet2DConditionModel or DiTTransformer2DModel
    alphas_cumprod: Any  # torch float tensor, T
    prediction_type: str
    vae: Any | None
    scaling_factor: float
    shift_factor: float
    kind: str  # unconditional | caption | text | class
    pipeline: Any
    size: int  # pixel side the model takes
    channels: int  # channels of x0 as the denoiser sees it

    @property
    def timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def denoiser(loaded: Any) -> Denoiser:
    """The parts of a ``core.generate.LoadedPipeline`` the loss needs; ModelError/InputError when unsupported."""
    pipe = loaded.pipeline
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    scheduler = getattr(pipe, "scheduler", None)
    if model is None or scheduler is None:
        raise ModelError(f"{loaded.ref} has no unet/transformer and scheduler; the loss attack needs a diffusion denoiser")
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise InputError(f"{loaded.ref}: the scheduler's prediction_type is {prediction!r}; the loss attack knows "
                         f"{', '.join(PREDICTION_TYPES)}")
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ModelError(f"{loaded.ref}: scheduler {type(scheduler).__name__} has no alphas_cumprod; the loss attack "
                         "needs a DDPM-style noise schedule (DDPM, DDIM, PNDM, Euler, ...)")
    vae = getattr(pipe, "vae", None)
    if loaded.kind == "unconditional":
        kind = "unconditional"
    elif loaded.kind == "class":
        kind = "class"
    elif callable(getattr(pipe, "caption_ids", None)):
        kind = "caption"  # core.demo.model.CaptionConditionedPipeline: captions are class ids
    elif callable(getattr(pipe, "encode_prompt", None)):
        kind = "text"
    else:
        raise ModelError(f"{loaded.ref}: {type(pipe).__name__} takes prompts in a way the loss attack does not know; "
                         "use an unconditional, class-conditional or Stable-Diffusion-style model")
    latent_size = model.config.get("sample_size")
    if isinstance(latent_size, (list, tuple)):
        latent_size = latent_size[0]
    factor = 1
    if vae is not None:
        factor = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(vae.config.get("block_out_channels", [0])) - 1)
    channels = int(model.config.get("in_channels"))
    import torch

    return Denoiser(model=model, alphas_cumprod=torch.as_tensor(alphas, dtype=torch.float32), prediction_type=prediction,
                    vae=vae, scaling_factor=float(vae.config.get("scaling_factor", 1.0) or 1.0) if vae is not None else 1.0,
                    shift_factor=float(vae.config.get("shift_factor", 0.0) or 0.0) if vae is not None else 0.0,
                    kind=kind, pipeline=pipe, size=int(latent_size) * int(factor), channels=channels)


def noise_draws(shape: Sequence[int], draws: int, seed: int) -> Any:
    """K noise tensors of ``shape`` (K x shape), draw k from its own generator seeded ``seed + k``."""
    import torch

    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed) + k))
                        for k in range(draws)])


def _conditioning(d: Denoiser, loaded: Any, conditions: Sequence[str | None], device: Any) -> dict[str, Any]:
    import torch

    if d.kind == "unconditional":
        return {}
    missing = [i for i, c in enumerate(conditions) if c is None]
    if missing:
        what = "a class id or name" if d.kind == "class" else "a caption"
        raise InputError(f"{loaded.ref} is a conditional model and image {missing[0] + 1} of the set has no condition; "
                         f"give each image {what} (captions.csv in a folder, or a caption/label column in a manifest)")
    if d.kind == "caption":
        return {"class_labels": torch.tensor(d.pipeline.caption_ids(list(conditions)), dtype=torch.long, device=device)}
    if d.kind == "class":
        from .generate import class_label

        return {"class_labels": torch.tensor([class_label(loaded, str(c)) for c in conditions], dtype=torch.long, device=device)}
    embeds = d.pipeline.encode_prompt(list(conditions), device, 1, False)
    embeds = embeds[0] if isinstance(embeds, tuple) else embeds
    return {"encoder_hidden_states": embeds}


def to_model_input(d: Denoiser, pixels: np.ndarray) -> Any:
    """(N, H, W, 3) float [0, 1] -> what the denoiser sees at t = 0: pixels in [-1, 1] or VAE latents."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).permute(0, 3, 1, 2) * 2.0 - 1.0
    x = x.to(device=d.model.device, dtype=d.model.dtype)
    if d.vae is None:
        return x
    with torch.no_grad():
        z = d.vae.encode(x.to(d.vae.dtype)).latent_dist.mean
    return ((z - d.shift_factor) * d.scaling_factor).to(d.model.dtype)


def losses(d: Denoiser, loaded: Any, pixels: np.ndarray, conditions: Sequence[str | None], *, timestep: int,
           draws: int, seed: int, batch_size: int = 64,
           progress: Callable[[int, int], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> np.ndarray | None:
    """The loss at ``timestep`` of every image (module docstring), float64 (N,); None when stopped."""
    import torch

    if not 0 <= timestep < d.timesteps:
        raise InputError(f"timestep {timestep} is outside the model's schedule 0..{d.timesteps - 1}")
    if draws < 1:
        raise InputError(f"noise draws must be >= 1, got {draws}")
    n = len(pixels)
    a = d.alphas_cumprod[timestep].double()
    sa, sn = float(a.sqrt()), float((1 - a).sqrt())
    out = np.empty(n, dtype=np.float64)
    eps_all = None
    device = d.model.device
    per_call = max(1, batch_size // draws)
    for start in range(0, n, per_call):
        if should_stop is not None and should_stop():
            return None
        stop = min(n, start + per_call)
        with torch.no_grad():
            x0 = to_model_input(d, pixels[start:stop]).float()
            b = len(x0)
            if eps_all is None:
                eps_all = noise_draws(x0.shape[1:], draws, seed).to(device)
            x0r = x0.repeat_interleave(draws, 0)
            eps = eps_all.repeat(b, 1, 1, 1)
            xt = sa * x0r + sn * eps
            cond = _conditioning(d, loaded, list(conditions[start:stop]), device)
            cond = {k: (v.repeat_interleave(draws, 0) if hasattr(v, "repeat_interleave") else v) for k, v in cond.items()}
            t = torch.full((len(xt),), int(timestep), dtype=torch.long, device=device)
            pred = d.model(xt.to(d.model.dtype), t, **cond).sample.float()[:, : x0.shape[1]]
            target = eps if d.prediction_type == "epsilon" else x0r if d.prediction_type == "sample" else sa * eps - sn * x0r
            per = ((pred - target) ** 2).flatten(1).mean(1).double().view(b, draws).mean(1)
        out[start:stop] = per.cpu().numpy()
        if progress is not None:
            progress(stop, n)
    return out


def quality_timesteps(num_train_timesteps: int, n: int = 10) -> list[int]:
    """The n-step trailing grid ``round(T - k T / n) - 1``, k = 0..n-1 (999, 899, ..., 99 for T = 1000, n = 10)."""
    return sorted({int(round(num_train_timesteps - k * num_train_timesteps / n)) - 1 for k in range(n)})


def held_out_loss(d: Denoiser, loaded: Any, pixels: np.ndarray, conditions: Sequence[str | None], *, seed: int,
                  draws: int = 1, batch_size: int = 64) -> float:
    """Quality without Inception weights: mean denoising loss of held-out images over the 10-step grid.

    Lower is better. The same images, timesteps and noise for every checkpoint, so the trend
    across training is comparable; absolute values are not comparable across models.
    """
    per_t = [losses(d, loaded, pixels, conditions, timestep=t, draws=draws, seed=seed, batch_size=batch_size)
             for t in quality_timesteps(d.timesteps)]
    return float(np.mean([p.mean() for p in per_t if p is not None]))


# ---------------------------------------------------------------------------- LiRA
@dataclass(frozen=True)
class LiraScores:
    online: np.ndarray
    offline: np.ndarray
    mu_in: np.ndarray
    mu_out: np.ndarray
    sd_in: float
    sd_out: float


def lira(target: np.ndarray, shadow: np.ndarray, inside: np.ndarray, *, min_sd: float = 1e-12) -> LiraScores:
    """LiRA scores (module docstring) from the target's losses (N,), the shadows' (K, N) and IN (K, N)."""
    from scipy.stats import norm

    target = np.asarray(target, dtype=np.float64)
    shadow = np.asarray(shadow, dtype=np.float64)
    inside = np.asarray(inside, dtype=bool)
    if shadow.ndim != 2 or shadow.shape != inside.shape or shadow.shape[1] != target.shape[0]:
        raise ValueError(f"shapes differ: target {target.shape}, shadow {shadow.shape}, inside {inside.shape}")
    n_in, n_out = inside.sum(0), (~inside).sum(0)
    if (n_in < 1).any() or (n_out < 1).any():
        raise InputError("every image needs at least one shadow model trained with it and one without; "
                         "train more shadows")
    mu_in = np.where(inside, shadow, 0).sum(0) / n_in
    mu_out = np.where(~inside, shadow, 0).sum(0) / n_out
    res_in = (shadow - mu_in)[inside]
    res_out = (shadow - mu_out)[~inside]
    # pooled over images; with one IN (or OUT) model per image the residuals are all 0, so fall back to the other side
    dof_in, dof_out = inside.sum() - len(target), (~inside).sum() - len(target)
    sd_in = math.sqrt((res_in ** 2).sum() / dof_in) if dof_in > 0 else float("nan")
    sd_out = math.sqrt((res_out ** 2).sum() / dof_out) if dof_out > 0 else float("nan")
    if not (math.isfinite(sd_in) or math.isfinite(sd_out)):  # one IN and one OUT model per image: pool around their mean
        spread = ((shadow - shadow.mean(0)) ** 2).sum() / max(1, shadow.size - len(target))
        sd_in = sd_out = math.sqrt(spread)
    sd_in = sd_in if math.isfinite(sd_in) and sd_in > 0 else sd_out
    sd_out = sd_out if math.isfinite(sd_out) and sd_out > 0 else sd_in
    sd_in = sd_in if math.isfinite(sd_in) and sd_in > min_sd else min_sd
    sd_out = sd_out if math.isfinite(sd_out) and sd_out > min_sd else min_sd
    online = norm.logpdf(target, mu_in, sd_in) - norm.logpdf(target, mu_out, sd_out)
    offline = -norm.logcdf((target - mu_out) / sd_out)
    return LiraScores(online, offline, mu_in, mu_out, sd_in, sd_out)


# ---------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class RocMetrics:
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    tpr_at: dict[float, float]  # target FPR -> TPR
    bounded: dict[float, bool]  # True: fewer than 1/f non-members, the TPR is the one at FPR 0 (a lower bound)
    balanced_accuracy: float
    members: int
    nonmembers: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"auc": self.auc, "tpr_at_1pct_fpr": self.tpr_at[0.01], "tpr_at_0_1pct_fpr": self.tpr_at[0.001],
                "balanced_accuracy": self.balanced_accuracy, "members": self.members, "nonmembers": self.nonmembers,
                "tpr_at_bounded": {str(k): v for k, v in self.bounded.items()}, "notes": self.notes}


def roc_metrics(scores: np.ndarray, member: np.ndarray, fpr_points: Sequence[float] = FPR_POINTS) -> RocMetrics:
    """ROC of ``scores`` (higher = member) against ``member`` (bool); see the module docstring."""
    from sklearn.metrics import auc, roc_curve

    scores = np.asarray(scores, dtype=np.float64)
    member = np.asarray(member, dtype=bool)
    if scores.shape != member.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and member {member.shape} must be equal 1-d shapes")
    if not member.any() or member.all():
        raise InputError("the ROC needs at least one member and one non-member")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinity")
    fpr, tpr, _ = roc_curve(member.astype(int), scores, drop_intermediate=False)
    nonmembers = int((~member).sum())
    tpr_at, bounded, notes = {}, {}, []
    for f in fpr_points:
        tpr_at[f] = float(tpr[fpr <= f + 1e-12].max())
        bounded[f] = 1.0 / nonmembers > f
        if bounded[f]:
            notes.append(f"TPR at {f * 100:g}% FPR is measured at FPR 0: with {nonmembers} non-members the smallest "
                         f"non-zero FPR is {1 / nonmembers:.2%}, so it is a lower bound")
    return RocMetrics(fpr=fpr, tpr=tpr, auc=float(auc(fpr, tpr)), tpr_at=tpr_at, bounded=bounded,
                      balanced_accuracy=float(((tpr + 1 - fpr) / 2).max()), members=int(member.sum()),
                      nonmembers=nonmembers, notes=notes)
