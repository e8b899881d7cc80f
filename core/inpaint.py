"""The inpainting attack (PAPER.md, Figure 12): how well does a model complete images it was trained on?

An adversary who knows part of a training image asks the model to fill in the rest. For each
image, the region given by the mask is reconstructed ``samples`` times (sample j from its own
generator seeded ``seed + j``), and each completion is compared with the original by the
normalised L2 distance on the masked region only, on 8-bit pixels scaled to [0, 1]:

    d(x_hat, x) = sqrt( sum_{masked pixels p, channels c} (x_hat_pc - x_pc)^2 / (n_masked * C) )

Per image the run records three distances:

- ``distance_chosen``: the completion the model itself finds most likely, the one with the
  lowest denoising loss (core.repaint.denoising_loss over the sampling grid's timesteps up to
  ``inpaint_score_max_t`` of the schedule, ``inpaint_score_draws`` noise draws shared by the
  image's completions). This is what an attacker who does not know the original would pick:
  the attack's result.
- ``distance_best``: the smallest distance over the completions. The attacker cannot pick it
  without the original, so it is an oracle bound (how close the model can come), shown beside
  the chosen one and labelled as such.
- ``distance_mean``: the mean over the completions.

Members (``--images``, or a manifest's ``member`` column) are compared with non-members: the
paper's finding is that members are reconstructed far better.

Models: a pixel-space UNet with a DDPM or DDIM scheduler (DDPMPipeline, DDIMPipeline,
memaudit's CaptionConditionedPipeline) goes through RePaint (core.repaint); with another
scheduler (PNDM, DPM-Solver...) RePaint samples with DDIM on the model's own noise schedule and
prediction type, recorded as the run's ``sampler``; a diffusers
inpainting pipeline (one taking ``image`` and ``mask_image``) is called as it is, and its
completions get no model-chosen distance (its loss would need its latent space and masked-input
UNet; the run says so). A latent model that is not an inpainting pipeline is refused.
CaptionConditionedPipeline is conditioned on its single training caption when it has exactly
one (a model trained on one caption for everything), else on the empty caption (its
unconditional mode); the run records which.

Storage: an ``inpainting_runs`` row, one ``inpainting_images`` row per image (the original at
the model's resolution copied to the workspace) and one ``inpainting_samples`` row per
completion, whose PNG lies under ``inpainting/run-<id>/``. Every input is checked before
anything is written; a run that fails or is cancelled is removed with its files.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import config
from .errors import ImageError, InputError, ModelError
from .images import IMAGE_SUFFIXES, is_image_name, load_image, save_png_atomic, sha256_file, to_uint8
from .store import Workspace, now

NAMED_MASKS = ("left", "right", "top", "bottom", "center")
FOLDER = "inpainting"
DEFAULT_STEPS = 50  # when a model states no step grid of its own
INPAINT_SETTINGS = ("inpaint_mask", "inpaint_samples", "inpaint_steps", "inpaint_score_draws", "inpaint_score_max_t",
                    "seed", "batch_size", "device")


# ---------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class InpaintRun:
    id: int
    created_at: str
    model_ref: str
    mask: str
    samples: int
    steps: int
    seed: int
    images: int
    members: int
    nonmembers: int
    params: dict[str, Any] = field(default_factory=dict)
    mask_path: str = ""


@dataclass(frozen=True)
class InpaintImage:
    id: int
    position: int
    source_path: str          # the file as given
    path: str                 # the original at the model's resolution, in the workspace
    member: bool
    distance_best: float      # oracle bound: min over completions
    distance_mean: float
    distance_chosen: float | None   # the completion with the lowest denoising loss (None: no loss for this model)
    chosen_sample: int | None
    samples: tuple[dict[str, Any], ...] = ()  # sample, seed, path, distance, loss


@dataclass(frozen=True)
class InpaintReport:
    run_id: int | None        # None when stopped before the end (nothing is kept)
    images: int
    samples: int
    seconds: float
    stopped: bool = False


# ---------------------------------------------------------------------------------- masks
def named_mask(name: str, size: int) -> np.ndarray:
    """Boolean (size, size), True where the model must reconstruct."""
    m = np.zeros((size, size), dtype=bool)
    h = size // 2
    if name == "left":
        m[:, :h] = True
    elif name == "right":
        m[:, size - h:] = True
    elif name == "top":
        m[:h, :] = True
    elif name == "bottom":
        m[size - h:, :] = True
    elif name == "center":
        q = size // 4
        m[q:q + h, q:q + h] = True
    else:
        raise InputError(f"mask {name!r} is not one of {', '.join(NAMED_MASKS)} and not a file; give one of those or a PNG mask")
    return m


def load_mask(spec: str, size: int) -> np.ndarray:
    """A named mask or a mask file (white, >= 128, = reconstruct) at ``size`` x ``size``; refuses all or nothing."""
    spec = str(spec).strip()
    if spec in NAMED_MASKS:
        m = named_mask(spec, size)
    elif Path(spec).suffix.lower() in IMAGE_SUFFIXES or Path(spec).exists():
        img = load_image(spec)
        if img.size != (size, size):
            raise InputError(f"mask file {spec} is {img.size[0]} x {img.size[1]} but the model works at {size} x {size}; "
                             f"give a {size} x {size} mask (white = reconstruct)")
        m = np.asarray(img.convert("L")) >= 128
    else:
        named_mask(spec, size)  # raises the one-line error
        raise AssertionError("unreachable")
    if m.all():
        raise InputError(f"mask {spec} covers the whole image: nothing is left to condition on; mask part of it")
    if not m.any():
        raise InputError(f"mask {spec} covers nothing: there is nothing to reconstruct; mask part of the image (white = reconstruct)")
    return m


def masked_l2(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Normalised L2 on the masked region. ``a`` (N, H, W, C) or (H, W, C), ``b`` (H, W, C), floats in [0, 1]."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if b.ndim != 3 or a.shape[-3:] != b.shape or mask.shape != b.shape[:2]:
        raise ValueError(f"shapes do not match: a {a.shape}, b {b.shape}, mask {mask.shape}")
    diff = (a - b)[..., mask, :]
    return np.sqrt((diff ** 2).mean(axis=(-2, -1)))


# ---------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class _Item:
    source: Path
    member: bool
    sha256: str


def read_image_set(spec: str | Path, member: bool | None) -> list[tuple[Path, bool]]:
    """Images of a folder (recursive, sorted) or a CSV manifest (column ``path``, relative to the manifest;
    optional ``member`` column 1/0 when ``member`` is None). Returns (file, member)."""
    spec = Path(spec)
    if spec.is_dir():
        files = sorted(p for p in spec.rglob("*") if p.is_file() and is_image_name(p) and not p.name.startswith("."))
        if not files:
            raise InputError(f"{spec} holds no images (png, jpg, webp...); pass a folder of images or a CSV manifest")
        return [(f, True if member is None else member) for f in files]
    if not spec.is_file():
        raise InputError(f"{spec}: no such folder or manifest")
    if spec.suffix.lower() != ".csv":
        raise InputError(f"{spec} is neither a folder nor a CSV manifest (columns path[,member]); pass one of those")
    try:
        with open(spec, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if "path" not in fields:
                raise InputError(f"{spec} needs a header with a path column (and optionally member), got {fields}")
            rows = list(reader)
    except UnicodeDecodeError:
        raise InputError(f"{spec} is not UTF-8 text; save the manifest as UTF-8") from None
    if not rows:
        raise InputError(f"{spec} lists no images")
    out = []
    for i, r in enumerate(rows, start=2):
        rel = (r.get("path") or "").strip()
        if not rel:
            raise InputError(f"{spec} line {i}: empty path")
        if member is None and "member" in fields:
            flag = (r.get("member") or "").strip().lower()
            if flag not in ("0", "1", "true", "false", "yes", "no"):
                raise InputError(f"{spec} line {i}: member must be 1 or 0, got {r.get('member')!r}")
            is_member = flag in ("1", "true", "yes")
        else:
            is_member = True if member is None else member
        out.append((spec.parent / rel, is_member))
    return out


def _collect(images: str | Path, nonmembers: str | Path | None) -> list[_Item]:
    first = read_image_set(images, None)
    second = read_image_set(nonmembers, False) if nonmembers is not None else []
    items = []
    seen: dict[str, Path] = {}
    for f, member in first + second:
        if not f.is_file():
            raise InputError(f"{f}: no such image file")
        digest = sha256_file(f)
        items.append(_Item(f, member, digest))
    groups: dict[str, set[bool]] = {}
    for it in items:
        groups.setdefault(it.sha256, set()).add(it.member)
        seen.setdefault(it.sha256, it.source)
    both = [seen[d] for d, flags in groups.items() if flags == {True, False}]
    if both:
        raise InputError(f"{len(both)} image(s) are both members and non-members (for one, {both[0]}); "
                         "the two sets must not overlap")
    return items


def _prepare(path: Path, size: int, channels: int) -> np.ndarray:
    """uint8 (size, size, channels): converted to the model's mode, resized when square; otherwise refused."""
    from PIL import Image

    img = load_image(path)  # RGB: palette, alpha (over white), 16-bit and grayscale converted
    w, h = img.size
    if w != h:
        raise ImageError(f"{path} is {w} x {h}, not square; the model works at {size} x {size}, and cropping would move "
                         "the masked region, so crop it to a square yourself")
    if w != size:
        img = img.resize((size, size), Image.Resampling.BOX if w > size else Image.Resampling.BICUBIC)
    if channels == 1:
        return np.asarray(img.convert("L"), dtype=np.uint8)[:, :, None]
    return np.asarray(img, dtype=np.uint8)


# ---------------------------------------------------------------------------------- the model
@dataclass
class _Model:
    loaded: Any
    mode: str                  # repaint | pipeline
    size: int
    channels: int
    steps: int
    class_label: int | None
    condition: str | None      # caption used (CaptionConditionedPipeline), None otherwise
    scheduler: Any = None      # the RePaint sampler: the model's DDPM/DDIM scheduler, else DDIM on its noise schedule


def _load_model(ref: str, device: str, steps: int) -> _Model:
    from .generate import load_pipeline

    loaded = load_pipeline(ref, device, accept=frozenset({"image", "mask_image"}))
    pipe = loaded.pipeline
    if "mask_image" in loaded.call_params:
        if loaded.size is None or loaded.size[0] != loaded.size[1]:
            raise ModelError(f"{ref} does not state a square output size; memaudit cannot tell which size to inpaint at")
        return _Model(loaded, "pipeline", loaded.size[0], 3, steps or DEFAULT_STEPS, None, "")
    unet = getattr(pipe, "unet", None)
    scheduler = getattr(pipe, "scheduler", None)
    if getattr(pipe, "vae", None) is not None or getattr(pipe, "vqvae", None) is not None:
        raise ModelError(f"{loaded.pipeline_class} in {ref} works in a latent space; the RePaint path needs a pixel-space "
                         "DDPM/DDIM model, or pass a diffusers inpainting pipeline (one taking image and mask_image)")
    if unet is None or scheduler is None or not hasattr(scheduler, "alphas_cumprod") or type(unet).__name__ != "UNet2DModel":
        raise ModelError(f"{loaded.pipeline_class} in {ref} is not a pixel-space DDPM/DDIM model (a UNet2DModel with a "
                         "DDPM or DDIM scheduler); the RePaint path cannot run it")
    cfg = unet.config
    if cfg.in_channels != cfg.out_channels or cfg.in_channels not in (1, 3):
        raise ModelError(f"{ref}: the UNet maps {cfg.in_channels} to {cfg.out_channels} channels; RePaint needs an image "
                         "model with 1 or 3 channels in and out")
    from .repaint import check_prediction_type

    check_prediction_type(scheduler)
    if type(scheduler).__name__ not in ("DDPMScheduler", "DDIMScheduler"):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler.config)  # same betas and prediction type, the DDIM update
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    class_label, condition = None, None
    if cfg.num_class_embeds is not None:
        vocabulary = getattr(pipe.config, "vocabulary", None)
        if vocabulary is None:
            raise ModelError(f"{ref} is class-conditional; the inpainting attack runs pixel-space unconditional models "
                             "and memaudit's caption-conditioned ones")
        condition = vocabulary[1] if len(vocabulary) == 2 else ""
        class_label = vocabulary.index(condition)
    default_steps = int(getattr(pipe.config, "default_steps", 0) or DEFAULT_STEPS)
    return _Model(loaded, "repaint", int(size), int(cfg.in_channels), steps or default_steps, class_label, condition,
                  scheduler)


def _score_timesteps(scheduler: Any, steps: int, max_t: float) -> list[int]:
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(steps)
    grid = sorted(int(t) for t in sched.timesteps)
    limit = max_t * int(scheduler.config.num_train_timesteps)
    chosen = [t for t in grid if 0 < t <= limit]
    return chosen or [grid[0] if grid[0] > 0 else grid[min(1, len(grid) - 1)]]


def _complete(model: _Model, originals: np.ndarray, mask: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
    """Completions of ``originals`` (B, H, W, C) uint8, one per seed: uint8 (B, H, W, C)."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    if model.mode == "pipeline":
        from PIL import Image

        pipe = model.loaded.pipeline
        mask_img = Image.fromarray((mask * 255).astype(np.uint8), "L")
        out = pipe(prompt=[""] * len(seeds), image=[Image.fromarray(to_uint8(o)) for o in originals],
                   mask_image=[mask_img] * len(seeds), num_inference_steps=model.steps, generator=gens,
                   height=model.size, width=model.size, output_type="np")
        arr = np.asarray(out.images, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ModelError("the inpainting pipeline produced non-finite pixels; its weights may be damaged (try --device cpu)")
        done = np.stack([to_uint8(a) for a in np.clip(arr, 0, 1)])
        return done[..., : model.channels]
    from .repaint import repaint

    pipe = model.loaded.pipeline
    device = model.loaded.device
    dtype = pipe.unet.dtype
    known = torch.from_numpy(originals).permute(0, 3, 1, 2).to(device=device, dtype=torch.float32) / 127.5 - 1
    m = torch.from_numpy(mask[None, None].astype(np.float32)).to(device)
    labels = None if model.class_label is None else torch.full((len(seeds),), model.class_label, dtype=torch.long, device=device)
    x = repaint(pipe.unet, model.scheduler, known.to(dtype), m.to(dtype), gens, model.steps, labels)
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _losses(model: _Model, completions: np.ndarray, timesteps: list[int], draws: int, seed: int) -> np.ndarray:
    import torch

    from .repaint import denoising_loss

    pipe = model.loaded.pipeline
    device = model.loaded.device
    g = torch.Generator("cpu").manual_seed(int(seed))
    c = model.channels
    noises = torch.randn((draws, c, model.size, model.size), generator=g)
    x = torch.from_numpy(completions).permute(0, 3, 1, 2).to(device=device, dtype=torch.float32) / 127.5 - 1
    labels = None if model.class_label is None else torch.full((len(x),), model.class_label, dtype=torch.long, device=device)
    return denoising_loss(pipe.unet, model.scheduler, x.to(pipe.unet.dtype), timesteps, noises.to(device, pipe.unet.dtype),
                          labels).cpu().numpy()


# ---------------------------------------------------------------------------------- the run
def run_inpainting(ws: Workspace, model_ref: str, images: str | Path, nonmembers: str | Path | None = None, *,
                   mask: str | None = None, samples: int | None = None, steps: int | None = None, seed: int | None = None,
                   batch_size: int | None = None, device: str | None = None, score_draws: int | None = None,
                   score_max_t: float | None = None, progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> InpaintReport:
    """Inpaint every image ``samples`` times, measure, store an inpainting run; see the module docstring.

    ``None`` for a setting means the workspace's value. ``progress(done, total)`` counts images;
    ``should_stop()`` is asked before every batch, and a stopped run keeps nothing.
    """
    t0 = time.perf_counter()
    s = ws.settings()
    given = dict(inpaint_mask=mask, inpaint_samples=samples, inpaint_steps=steps, seed=seed, batch_size=batch_size,
                 device=device, inpaint_score_draws=score_draws, inpaint_score_max_t=score_max_t)
    try:
        v = {k: s[k] if val is None else config.check(k, val) for k, val in given.items()}
    except ValueError as e:
        raise InputError(str(e)) from None
    n_samples = v["inpaint_samples"]
    if v["seed"] + n_samples - 1 > 2**63 - 1:
        raise InputError(f"seed {v['seed']} + {n_samples} samples passes 2**63 - 1; use a smaller seed")

    # every check before anything is written
    items = _collect(images, nonmembers)
    model = _load_model(model_ref, v["device"], v["inpaint_steps"])
    the_mask = load_mask(v["inpaint_mask"], model.size)
    originals = [_prepare(it.source, model.size, model.channels) for it in items]
    timesteps = (_score_timesteps(model.scheduler, model.steps, v["inpaint_score_max_t"])
                 if model.mode == "repaint" else [])
    mask_label = v["inpaint_mask"] if v["inpaint_mask"] in NAMED_MASKS else str(Path(v["inpaint_mask"]).resolve())

    import torch

    from . import __version__
    loaded = model.loaded
    params = {"model": loaded.ref, "weights_hash": loaded.weights_hash, "pipeline_class": loaded.pipeline_class,
              "scheduler": loaded.scheduler, "method": model.mode,
              "sampler": type(model.scheduler).__name__ if model.scheduler is not None else None,
              "mask": mask_label, "size": model.size,
              "samples": n_samples, "steps": model.steps, "seed": v["seed"], "condition": model.condition,
              "score": ({"timesteps": timesteps, "draws": v["inpaint_score_draws"], "seed": v["seed"]}
                        if model.mode == "repaint" else None),
              "device": loaded.device, "dtype": loaded.dtype, "batch_size": v["batch_size"],
              "versions": {"memaudit": __version__, "torch": torch.__version__, "diffusers": _version("diffusers")}}
    model_id = ws.model_id(loaded.ref, loaded.kind, loaded.pipeline_class, loaded.weights_hash, loaded.scheduler)
    with ws.transaction() as con:
        run_id = con.execute(
            "INSERT INTO inpainting_runs(created_at, status, model_id, mask, samples, steps, seed, mask_path, params) "
            "VALUES (?, 'running', ?, ?, ?, ?, ?, '', ?)",
            (now(), model_id, mask_label, n_samples, model.steps, v["seed"], json.dumps(params))).lastrowid
    folder = f"{FOLDER}/run-{run_id}"
    try:
        mask_rel = f"{folder}/mask.png"
        save_png_atomic(the_mask.astype(np.uint8) * 255, ws.resolve(mask_rel))
        stopped = _run_images(ws, run_id, folder, model, items, originals, the_mask, timesteps, v, progress, should_stop)
        if stopped:
            _discard(ws, run_id)
            return InpaintReport(None, 0, 0, time.perf_counter() - t0, stopped=True)
        with ws.transaction() as con:
            con.execute("UPDATE inpainting_runs SET status = 'done', finished_at = ?, mask_path = ? WHERE id = ?",
                        (now(), mask_rel, run_id))
    except BaseException:
        _discard(ws, run_id)
        raise
    return InpaintReport(run_id, len(items), n_samples, time.perf_counter() - t0)


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def _run_images(ws: Workspace, run_id: int, folder: str, model: _Model, items: list[_Item], originals: list[np.ndarray],
                mask: np.ndarray, timesteps: list[int], v: dict[str, Any], progress: Callable[[int, int], None] | None,
                should_stop: Callable[[], bool] | None) -> bool:
    n = v["inpaint_samples"]
    seeds = [v["seed"] + j for j in range(n)]
    per_batch = max(1, v["batch_size"] // n)  # images per model call: all samples of an image in one call
    total = len(items)
    if progress:
        progress(0, total)
    for start in range(0, total, per_batch):
        if should_stop is not None and should_stop():
            return True
        chunk = list(range(start, min(total, start + per_batch)))
        batch = np.stack([originals[i] for i in chunk for _ in seeds])
        done = np.concatenate([_complete(model, batch[k:k + v["batch_size"]], mask,
                                         (seeds * len(chunk))[k:k + v["batch_size"]])
                               for k in range(0, len(batch), v["batch_size"])])
        rows = []
        for c, i in enumerate(chunk):
            comps = done[c * n:(c + 1) * n]
            orig = originals[i]
            dist = masked_l2(comps.astype(np.float64) / 255.0, orig.astype(np.float64) / 255.0, mask)
            losses = _losses(model, comps, timesteps, v["inpaint_score_draws"], v["seed"]) if timesteps else None
            base = f"{folder}/{i:05d}"
            save_png_atomic(to_uint8(orig), ws.resolve(f"{base}/original.png"))
            sample_rows = []
            for j in range(n):
                rel = f"{base}/sample-{j:04d}.png"
                save_png_atomic(to_uint8(comps[j]), ws.resolve(rel))
                sample_rows.append((j, seeds[j], rel, float(dist[j]), None if losses is None else float(losses[j])))
            chosen = int(np.argmin(losses)) if losses is not None else None
            rows.append((i, str(items[i].source.resolve()), f"{base}/original.png", int(items[i].member), float(dist.min()),
                         float(dist.mean()), None if chosen is None else float(dist[chosen]), chosen, sample_rows))
        with ws.transaction() as con:
            for i, src, rel, member, best, mean, chosen_d, chosen, sample_rows in rows:
                image_id = con.execute(
                    "INSERT INTO inpainting_images(run_id, position, source_path, path, member, distance_best, distance_mean, "
                    "distance_chosen, chosen_sample) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, i, src, rel, member, best, mean, chosen_d, chosen)).lastrowid
                con.executemany("INSERT INTO inpainting_samples(image_id, sample, seed, path, distance, loss) VALUES (?, ?, ?, ?, ?, ?)",
                                [(image_id, *r) for r in sample_rows])
        if progress:
            progress(chunk[-1] + 1, total)
    return False


def _discard(ws: Workspace, run_id: int) -> None:
    """Remove a run that did not finish, rows and files."""
    with ws.transaction() as con:
        con.execute("DELETE FROM inpainting_runs WHERE id = ?", (run_id,))
    shutil.rmtree(ws.root / FOLDER / f"run-{run_id}", ignore_errors=True)


# ---------------------------------------------------------------------------------- reading runs
def list_runs(ws: Workspace) -> list[InpaintRun]:
    """Finished inpainting runs, oldest first."""
    with ws.connect() as con:
        rows = con.execute(
            "SELECT r.*, m.ref AS model_ref, COUNT(i.id) AS n, COALESCE(SUM(i.member), 0) AS members "
            "FROM inpainting_runs r LEFT JOIN models m ON m.id = r.model_id LEFT JOIN inpainting_images i ON i.run_id = r.id "
            "WHERE r.status = 'done' GROUP BY r.id ORDER BY r.id").fetchall()
    return [InpaintRun(r["id"], r["created_at"], r["model_ref"] or "", r["mask"], r["samples"], r["steps"], r["seed"],
                       r["n"], r["members"], r["n"] - r["members"], json.loads(r["params"]), r["mask_path"]) for r in rows]


def get_run(ws: Workspace, run_id: int | None = None) -> InpaintRun:
    runs = list_runs(ws)
    if not runs:
        raise InputError(f"{ws.root} has no inpainting run yet; run `memaudit inpaint {ws.root} --model M --images DIR`")
    if run_id is None:
        return runs[-1]
    for r in runs:
        if r.id == run_id:
            return r
    known = ", ".join(str(r.id) for r in runs)
    raise InputError(f"no finished inpainting run {run_id} in {ws.root}; it has runs {known}")


def run_images(ws: Workspace, run_id: int, with_samples: bool = True) -> list[InpaintImage]:
    with ws.connect() as con:
        rows = con.execute("SELECT * FROM inpainting_images WHERE run_id = ? ORDER BY position", (run_id,)).fetchall()
        samples: dict[int, list[dict[str, Any]]] = {}
        if with_samples:
            for r in con.execute("SELECT s.* FROM inpainting_samples s JOIN inpainting_images i ON i.id = s.image_id "
                                 "WHERE i.run_id = ? ORDER BY s.image_id, s.sample", (run_id,)):
                samples.setdefault(r["image_id"], []).append(
                    {"sample": r["sample"], "seed": r["seed"], "path": r["path"], "distance": r["distance"], "loss": r["loss"]})
    return [InpaintImage(r["id"], r["position"], r["source_path"], r["path"], bool(r["member"]), r["distance_best"],
                         r["distance_mean"], r["distance_chosen"], r["chosen_sample"], tuple(samples.get(r["id"], ())))
            for r in rows]


def _auc_lower_is_member(members: np.ndarray, nonmembers: np.ndarray) -> float | None:
    """P(a member's distance < a non-member's), ties counting half (the Mann-Whitney statistic)."""
    if len(members) == 0 or len(nonmembers) == 0:
        return None
    less = (members[:, None] < nonmembers[None, :]).mean()
    ties = (members[:, None] == nonmembers[None, :]).mean()
    return float(less + 0.5 * ties)


def summary(ws: Workspace, run_id: int | None = None) -> dict[str, Any]:
    """Per group (members, non-members) the median and mean of each distance, the gaps and the AUC."""
    run = get_run(ws, run_id)
    imgs = run_images(ws, run.id, with_samples=False)
    out: dict[str, Any] = {"run_id": run.id, "model": run.model_ref, "mask": run.mask, "samples": run.samples,
                           "steps": run.steps, "seed": run.seed, "members": run.members, "nonmembers": run.nonmembers,
                           "method": run.params.get("method"), "condition": run.params.get("condition")}
    for kind in ("chosen", "best", "mean"):
        vals = {g: np.array([getattr(i, f"distance_{kind}") for i in imgs if i.member == (g == "members")
                             and getattr(i, f"distance_{kind}") is not None], dtype=np.float64)
                for g in ("members", "nonmembers")}
        block: dict[str, Any] = {}
        for g, a in vals.items():
            block[g] = {"median": float(np.median(a)) if len(a) else None, "mean": float(a.mean()) if len(a) else None}
        m, nm = block["members"]["median"], block["nonmembers"]["median"]
        block["median_gap"] = None if m is None or nm is None else nm - m
        block["auc"] = _auc_lower_is_member(vals["members"], vals["nonmembers"])
        out[kind] = block
    return out


def ranked(images: Sequence[InpaintImage], order: str = "gap") -> list[tuple[InpaintImage, float | None]]:
    """Images with their gap: the non-members' median distance minus the image's (the model-chosen
    distance, else the oracle bound). ``order``: gap (largest first: reconstructed far better than a
    typical non-member), members, nonmembers (each by gap), position."""
    def dist(i: InpaintImage) -> float:
        return i.distance_chosen if i.distance_chosen is not None else i.distance_best

    ref = [dist(i) for i in images if not i.member] or [dist(i) for i in images]
    median = float(np.median(ref)) if ref else 0.0
    pairs = [(i, median - dist(i)) for i in images]
    if order == "position":
        return pairs
    if order in ("members", "nonmembers"):
        pairs = [p for p in pairs if p[0].member == (order == "members")]
    elif order != "gap":
        raise InputError(f"order must be gap, members, nonmembers or position, got {order!r}")
    return sorted(pairs, key=lambda p: -p[1])


def export_runs(ws: Workspace) -> list[dict[str, Any]]:
    """Every finished run, for ``memaudit export``: parameters, summary and per image distances and files."""
    out = []
    for run in list_runs(ws):
        images = []
        for i in run_images(ws, run.id):
            images.append({"path": i.source_path, "member": i.member, "distance_best": i.distance_best,
                           "distance_mean": i.distance_mean, "distance_chosen": i.distance_chosen,
                           "chosen_sample": i.chosen_sample, "original": i.path,
                           "reconstructions": [dict(s) for s in i.samples]})
        out.append({"id": run.id, "created_at": run.created_at, "model": run.model_ref, "mask": run.mask,
                    "mask_file": run.mask_path, "samples": run.samples, "steps": run.steps, "seed": run.seed,
                    "parameters": run.params, "summary": summary(ws, run.id), "images": images,
                    "distance_best_is": "oracle bound: the closest of the completions to the original, which an "
                                        "attacker cannot pick without the original"})
    return out


def run_paths(ws: Workspace) -> list[str]:
    """Every file the inpainting rows name (for backup and verify)."""
    with ws.connect() as con:
        return [r[0] for r in con.execute(
            "SELECT path FROM inpainting_images UNION SELECT path FROM inpainting_samples "
            "UNION SELECT mask_path FROM inpainting_runs WHERE mask_path != ''")]

