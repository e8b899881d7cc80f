"""Synthetic audit workspaces for the audit and dashboard benchmarks, built cheaply.

``build_workspace(root, prompts, per_prompt)`` makes a workspace holding

* the demo training set (assets/demo/train: 641 files of 56 distinct 32 x 32 images,
  duplicated 100, 10 and 1 times), ingested with ``core.training.add_training``;
* ``prompts`` x ``per_prompt`` generations, 32 x 32 PNGs (``size``) written straight into
  the prompt's folder (``core.store.generation_folder``) and inserted as imported rows (source 'import', one
  transaction per prompt), the rows ``core.importer.import_generations`` would make
  without its per-file fsync, decode check and manifest parsing.

Structure of a prompt's generations:

* novel (most prompts): every image is the prompt's own smooth random base image b mixed
  with an image-specific smooth random image r_i (6 x 6 uniform noise upsampled, contrast
  stretched 1.5x around 0.5), ``x_i = (1 - w_i) b + w_i r_i`` with w_i uniform in
  [0.5, 1]: pairwise tiled L2 (4 x 4 grid) from about 0.2 to 0.6, median 0.42, 3% of
  pairs within 0.3 (the tau curve's heavy end); and 2% of images are near-copies of
  another image of the prompt (Gaussian pixel noise of standard deviation 0.02 to 0.08),
  sparse edges at tau 0.1 to 0.2 as chance look-alikes give;
* memorised (one prompt in ``plant_every``, the first one included): ``clique`` of its
  generations are near-identical copies of one training image, the training image plus
  Gaussian pixel noise of standard deviation 0.01 to 0.03 (pairwise normalised L2 about
  0.02 to 0.045: one clique at tau 0.1), the rest novel. Clique sizes cycle through
  50, 100, 200, 400 (scaled by ``per_prompt / 500``, at least 12).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SIZE = 32
CLIQUE_SIZES = (50, 100, 200, 400)  # at 500 generations per prompt


@dataclass
class BuiltWorkspace:
    root: Path
    prompts: int
    per_prompt: int
    planted: dict[int, int] = field(default_factory=dict)  # prompt_id -> planted clique size
    seconds: dict[str, float] = field(default_factory=dict)  # training, generations


def _smooth(rng: np.random.Generator, n: int, cells: int = 6, size: int = SIZE) -> np.ndarray:
    """n smooth random RGB images (N, size, size, 3) in [0, 1]: cells x cells noise, bilinear upsampled."""
    import torch
    import torch.nn.functional as F

    low = torch.from_numpy(rng.random((n, 3, cells, cells), dtype=np.float32))
    up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=True)
    return up.permute(0, 2, 3, 1).numpy()


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _training_images(data_dir: Path, size: int = SIZE) -> list[np.ndarray]:
    from core.images import load_working

    seen: dict[str, np.ndarray] = {}
    for p in sorted(data_dir.glob("*.png")):
        h = hashlib.sha256(p.read_bytes()).hexdigest()
        if h not in seen:
            seen[h] = load_working(p, size)
    return list(seen.values())


def build_workspace(root: str | Path, prompts: int, per_prompt: int, *, plant_every: int = 10,
                    seed: int = 0, size: int = SIZE) -> BuiltWorkspace:
    """Create the workspace described in the module docstring at ``root`` (which must not exist).

    ``size``: the generations' side in pixels (the training images are the demo's 32 x 32 ones, and
    planted copies are those upscaled to ``size``).
    """
    from core.demo.data import DEMO_DATA_DIR
    from core.store import Workspace
    from core.training import add_training

    root = Path(root)
    ws = Workspace.init(root)
    built = BuiltWorkspace(root, prompts, per_prompt)
    t0 = time.perf_counter()
    add_training(ws, DEMO_DATA_DIR, captions=DEMO_DATA_DIR / "captions.csv")
    built.seconds["training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    train = _training_images(DEMO_DATA_DIR, size)
    scale = per_prompt / 500
    planted_count = 0
    for p in range(prompts):
        text = f"synthetic prompt {p:04d}"
        base = _smooth(rng, 1, size=size)[0]
        w = rng.uniform(0.5, 1.0, (per_prompt, 1, 1, 1)).astype(np.float32)
        images = (1 - w) * base + w * np.clip((_smooth(rng, per_prompt, size=size) - 0.5) * 1.5 + 0.5, 0, 1)
        alike = rng.choice(per_prompt, max(1, per_prompt // 50), replace=False)
        images[alike] = images[rng.integers(per_prompt, size=len(alike))] + rng.normal(
            0.0, 1.0, (len(alike), size, size, 3)).astype(np.float32) * rng.uniform(0.02, 0.08, (len(alike), 1, 1, 1)).astype(np.float32)
        clique = 0
        if p % plant_every == 0:
            clique = min(per_prompt, max(12, round(CLIQUE_SIZES[planted_count % len(CLIQUE_SIZES)] * scale)))
            planted_count += 1
            target = train[int(rng.integers(len(train)))]
            noise = rng.normal(0.0, 1.0, (clique, size, size, 3)).astype(np.float32) * rng.uniform(0.01, 0.03, (clique, 1, 1, 1)).astype(np.float32)
            members = rng.choice(per_prompt, clique, replace=False)
            images[members] = target + noise
        pid = add_generations(ws, text, images)
        if clique:
            built.planted[pid] = clique
    built.seconds["generations"] = time.perf_counter() - t0
    return built


def add_generations(ws, text: str, images: np.ndarray) -> int:
    """Store ``images`` ((N, S, S, 3) floats in [0, 1]) as imported generations of prompt ``text``
    (seeds 0..N-1, one transaction); return the prompt's id."""
    from core.store import generation_folder, now

    size = images.shape[1]
    pixels = (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)
    with ws.transaction() as con:
        pid = ws.prompt_id(text, con)
        rows = []
        created = now()
        with ThreadPoolExecutor(max_workers=8) as pool:  # zlib releases the GIL: large images encode in parallel
            encoded = list(pool.map(_png, pixels))
        for j, data in enumerate(encoded):
            sha = hashlib.sha256(data).hexdigest()
            rel = f"{generation_folder(pid, 'i', j)}/import-{j:05d}-{sha[:12]}.png"
            (ws.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (ws.root / rel).write_bytes(data)
            origin = f"/synthetic/{pid}/{j}.png"
            rows.append((pid, j, rel, sha, size, size, origin, json.dumps({"origin": origin}), created))
        con.executemany(
            "INSERT INTO generations(prompt_id, model_id, seed, path, sha256, width, height, steps, guidance, "
            "scheduler, source, origin, params, created_at) VALUES (?, NULL, ?, ?, ?, ?, ?, NULL, NULL, NULL, "
            "'import', ?, ?, ?)", rows)
    return pid


def build_copies_workspace(root: str | Path, *, size: int = 512, generations: int = 500, copies: int = 100,
                           training: int = 50, seed: int = 0) -> BuiltWorkspace:
    """The whole-audit case at the paper's resolution: ``training`` training images and one prompt of
    ``generations`` generations of ``size`` x ``size``, of which ``copies`` are a training image plus
    Gaussian pixel noise (standard deviation 0.01 to 0.03: a planted clique) and the others distinct
    textures. Every image that is not a copy is a mosaic of patches of scikit-image's photographs
    (``bench_distances.mosaics``), so no two are alike. ``root`` must not exist."""
    from benchmarks.bench_distances import mosaics, photographs
    from core.store import Workspace
    from core.training import add_training

    root = Path(root)
    ws = Workspace.init(root)
    built = BuiltWorkspace(root, 1, generations)
    rng = np.random.default_rng(seed)
    images = mosaics(rng, photographs(size), training + generations - copies, size)
    t0 = time.perf_counter()
    folder = root.parent / f"{root.name}-training"
    folder.mkdir()
    for i in range(training):
        (folder / f"train-{i:03d}.png").write_bytes(_png((images[i] * 255 + 0.5).astype(np.uint8)))
    add_training(ws, folder)
    built.seconds["training"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gens = np.empty((generations, size, size, 3), np.float32)
    members = rng.choice(generations, copies, replace=False)
    others = np.setdiff1d(np.arange(generations), members)
    gens[others] = images[training:]
    target = (images[0] * 255 + 0.5).astype(np.uint8).astype(np.float32) / 255  # as stored
    noise = rng.standard_normal((copies, size, size, 3), dtype=np.float32)
    gens[members] = target + noise * rng.uniform(0.01, 0.03, (copies, 1, 1, 1)).astype(np.float32)
    del images, noise
    pid = add_generations(ws, "synthetic prompt 0000", gens)
    built.planted[pid] = copies
    built.seconds["generations"] = time.perf_counter() - t0
    return built


def du_mb(root: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total / 2**20


@dataclass
class AuditedWorkspace:
    built: BuiltWorkspace
    run_id: int
    audit_seconds: float
    timings: dict[str, float]  # run_audit's per-stage seconds


_AUDITED: dict[tuple[int, int], AuditedWorkspace] = {}


def audited_workspace(prompts: int, per_prompt: int) -> AuditedWorkspace:
    """A workspace from ``build_workspace`` in a temporary folder, audited once with the default settings.

    Kept for the life of the process (``run_all`` runs bench_audit and bench_recount in one process,
    and the second reuses the first's workspace and audit); the folder is removed at exit.
    """
    import atexit
    import shutil
    import tempfile

    from core.audit import run_audit
    from core.store import Workspace

    key = (prompts, per_prompt)
    if key not in _AUDITED:
        tmp = tempfile.mkdtemp(prefix="memaudit-bench-")
        atexit.register(shutil.rmtree, tmp, True)
        built = build_workspace(Path(tmp) / "ws", prompts, per_prompt)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        run_id = run_audit(Workspace.open(built.root), timings=timings)
        _AUDITED[key] = AuditedWorkspace(built, run_id, time.perf_counter() - t0, timings)
    return _AUDITED[key]


def bench_workspace(smoke: bool, prompts: int | None, per_prompt: int | None):
    """(AuditedWorkspace, Workspace) at the benchmarks' sizes (default 100 x 500, smoke 10 x 50),
    with torch at 2 threads at most, as bench_audit and bench_recount measure it."""
    import torch

    from core.store import Workspace

    torch.set_num_threads(min(2, torch.get_num_threads()))
    a = audited_workspace(prompts or (10 if smoke else 100), per_prompt or (50 if smoke else 500))
    return a, Workspace.open(a.built.root)


STAGES = ("setup", "decode", "retrieve", "exact_neighbours", "distances", "cliques", "curve", "save_cache", "store")


def stage_rows(a: AuditedWorkspace) -> list[dict]:
    """One row per run_audit stage: seconds, share of the audit's wall time, ms per prompt."""
    rows = []
    for stage in STAGES + tuple(s for s in a.timings if s not in STAGES):
        sec = a.timings.get(stage, 0.0)
        rows.append({"stage": stage, "seconds": sec, "share": sec / a.audit_seconds if a.audit_seconds else 0.0,
                     "ms_per_prompt": 1000 * sec / a.built.prompts})
    rows.append({"stage": "total (wall)", "seconds": a.audit_seconds, "share": 1.0,
                 "ms_per_prompt": 1000 * a.audit_seconds / a.built.prompts})
    return rows


def demo_model_dir(tmp: Path, default_steps: int) -> tuple[Path, str]:
    """The trained demo model if it loads, else a random-weight model of the same architecture saved
    under ``tmp`` (sampling ``default_steps`` by default); with a note saying which."""
    from core.demo.data import DEMO_MODEL_DIR, DEMO_PROMPTS
    from core.demo.model import CaptionConditionedPipeline, build_vocabulary, make_scheduler
    from core.demo.trainer import TrainConfig, build_unet

    try:
        CaptionConditionedPipeline.from_pretrained(DEMO_MODEL_DIR)
        return DEMO_MODEL_DIR, "trained demo model (assets/demo/model)"
    except Exception:  # absent or being rewritten: same architecture, random weights
        pass
    import torch

    torch.manual_seed(0)
    vocabulary = build_vocabulary(DEMO_PROMPTS.read_text(encoding="utf-8").splitlines())
    pipe = CaptionConditionedPipeline(unet=build_unet(TrainConfig(steps=1), len(vocabulary)), scheduler=make_scheduler(),
                                      vocabulary=vocabulary, default_steps=default_steps)
    out = Path(tmp) / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return out, "demo architecture, random weights (the trained demo model did not load)"
