"""FID with a local Inception checkpoint, for the membership-against-quality trend (Figure 11).

The paper measures model quality by FID: the Frechet distance between Gaussians fitted to
Inception-v3 pool features (2048-d) of generated and real images,
``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. The Inception weights cannot be
downloaded here, so FID runs only with a checkpoint file the user gives: a state dict of
``torchvision.models.inception_v3`` (``aux_logits`` either way; the classifier is dropped).
Images are resized bilinearly to 299 x 299 and normalised with ImageNet's mean and standard
deviation, as torchvision's Inception expects. Without a checkpoint, memaudit uses the
held-out denoising loss (``core.membership.held_out_loss``) instead.

FID from a few hundred images is biased upwards and noisy; compare checkpoints at one sample
count, never against published figures (computed on 50,000).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows ``a`` (N, D) and ``b`` (M, D)."""
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"features must be (N, D) and (M, D) with N, M >= 2, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    if not np.isfinite(root).all():  # nearly singular product: offset both covariances, as is usual for FID
        eps = np.eye(len(s_a)) * 1e-6
        root = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root))


def load_inception(checkpoint: str | Path) -> Any:
    """torchvision's Inception-v3 with the weights in ``checkpoint``, its classifier replaced by identity."""
    import torch
    from torchvision.models import inception_v3

    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(f"{path}: no such Inception checkpoint; give a local state-dict file of torchvision's inception_v3")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: say which
        raise InputError(f"{path} is not a torch state dict ({type(e).__name__}); give torchvision inception_v3 weights") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    aux = any(k.startswith("AuxLogits.") for k in state)
    model = inception_v3(weights=None, aux_logits=aux, init_weights=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{path} does not hold inception_v3 weights ({len(missing)} missing, {len(unexpected)} unexpected "
                         f"tensors, e.g. {(missing or unexpected)[0]})")
    model.fc = torch.nn.Identity()
    return model.eval()


def inception_features(model: Any, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """2048-d pool features of (N, H, W, 3) images in [0, 1]."""
    import torch
    import torch.nn.functional as F

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for s in range(0, len(pixels), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(pixels[s:s + batch_size], dtype=np.float32)).permute(0, 3, 1, 2)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(model((x - mean) / std).double().numpy())
    return np.concatenate(out)


def fid(loaded: Any, reference: np.ndarray, inception: Any, *, samples: int, seed: int, steps: int,
        batch_size: int = 64) -> float:
    """FID between ``samples`` unconditional generations of ``loaded`` (seeds seed..seed+samples-1) and ``reference``."""
    from .generate import sample

    if loaded.kind != "unconditional":
        raise InputError(f"FID along training samples unconditionally; {loaded.ref} is a {loaded.kind} model")
    gens = [sample(loaded, [("", None)] * len(seeds), seeds, steps=steps, guidance=None)
            for seeds in (list(range(seed + s, seed + min(samples, s + batch_size))) for s in range(0, samples, batch_size))]
    return frechet_distance(inception_features(inception, np.concatenate(gens)), inception_features(inception, reference))
