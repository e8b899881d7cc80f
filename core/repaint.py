"""RePaint-style inpainting with a pixel-space diffusion model, and the denoising loss that ranks completions.

``repaint`` reconstructs the unknown region of images with a UNet and a DDPM or DDIM scheduler
and no training for the task (Lugmayr et al. 2022, without resampling jumps). With ``m`` the
mask (1 where the pixel is unknown), ``x0`` the known image in [-1, 1] and ``abar_t`` the
scheduler's cumulative alpha, each step at timestep t does

    known_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps      (eps fresh from the sample's generator)
    x_t     = m * x_t + (1 - m) * known_t                      (the known region, correctly noised)
    x_prev  = scheduler.step(unet(x_t, t), t, x_t)

so the model always sees a sample whose known part has exactly the noise level of t, and the
result is ``m * x + (1 - m) * x0``: the known region is the original, bit for bit.

Sample i draws its starting noise, the known region's noise at every step and (DDPM) the
scheduler's noise from ``generators[i]`` alone, so a completion does not depend on the batch it
was drawn in.

``denoising_loss`` is the model's training loss on a finished image, averaged over given
timesteps and noise draws (PAPER.md's L(x, t, eps), with the target the scheduler's
``prediction_type`` names): the lower, the more likely the model finds the image. Passing one
image's completions with the same noise draws compares them on common random numbers.

Importing this module imports torch: import it where a model runs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import InputError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _abar(scheduler: Any, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    a = scheduler.alphas_cumprod.to(device=like.device)[t]
    return a.to(like.dtype)


def _noise(shape: Sequence[int], generators: Sequence[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """One draw per generator (on the CPU, so a seed means the same noise on every device)."""
    draws = [torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(draws).to(device=like.device, dtype=like.dtype)


def check_prediction_type(scheduler: Any) -> str:
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise InputError(f"the scheduler's prediction_type {kind!r} is not one memaudit knows ({', '.join(PREDICTION_TYPES)})")
    return kind


@torch.no_grad()
def repaint(unet: Any, scheduler: Any, known: torch.Tensor, mask: torch.Tensor, generators: Sequence[torch.Generator],
            steps: int, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Inpaint ``known`` (N, C, H, W) in [-1, 1] where ``mask`` (N or 1, 1, H, W) is 1; returns (N, C, H, W).

    ``scheduler`` is a DDPM/DDIM-style scheduler (``set_timesteps``, ``step``, ``alphas_cumprod``);
    it is copied, so the caller's one keeps its state. One generator per image.
    """
    if known.ndim != 4:
        raise ValueError(f"known must be (N, C, H, W), got shape {tuple(known.shape)}")
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != known.shape[-2:]:
        raise ValueError(f"mask must be (N or 1, 1, {known.shape[-2]}, {known.shape[-1]}), got shape {tuple(mask.shape)}")
    if len(generators) != known.shape[0]:
        raise ValueError(f"{len(generators)} generators for {known.shape[0]} images")
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(int(steps), device=known.device)
    m = mask.to(device=known.device, dtype=known.dtype)
    x = _noise(known.shape, generators, known) * float(sched.init_noise_sigma)
    for t in sched.timesteps:
        a = _abar(sched, t, known)
        known_t = a.sqrt() * known + (1 - a).sqrt() * _noise(known.shape, generators, known)
        x = m * x + (1 - m) * known_t
        model_in = sched.scale_model_input(x, t)
        pred = unet(model_in, t, class_labels=class_labels).sample if class_labels is not None else unet(model_in, t).sample
        x = sched.step(pred, t, x, generator=list(generators)).prev_sample
    return m * x.clamp(-1, 1) + (1 - m) * known


@torch.no_grad()
def denoising_loss(unet: Any, scheduler: Any, images: torch.Tensor, timesteps: Sequence[int], noises: torch.Tensor,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the model's prediction on ``images`` (N, C, H, W) in [-1, 1], per image (N,).

    Averaged over ``timesteps`` and the draws in ``noises`` (D, C, H, W) (each draw shared by all N
    images); the target is eps, x0 or v as the scheduler's ``prediction_type`` says.
    """
    kind = check_prediction_type(scheduler)
    if noises.ndim != 4 or noises.shape[1:] != images.shape[1:]:
        raise ValueError(f"noises must be (D, {', '.join(map(str, images.shape[1:]))}), got shape {tuple(noises.shape)}")
    total = torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
    for t in timesteps:
        a = _abar(scheduler, int(t), images)
        tt = torch.full((images.shape[0],), int(t), dtype=torch.long, device=images.device)
        for eps in noises.to(device=images.device, dtype=images.dtype):
            eps = eps.expand_as(images)
            xt = a.sqrt() * images + (1 - a).sqrt() * eps
            pred = unet(xt, tt, class_labels=class_labels).sample if class_labels is not None else unet(xt, tt).sample
            target = eps if kind == "epsilon" else images if kind == "sample" else a.sqrt() * eps - (1 - a).sqrt() * images
            total += ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).double()
    return total / (len(timesteps) * noises.shape[0])
