"""Train a small caption-conditioned diffusion model (``CaptionConditionedPipeline``) on a folder.

This is the demo's toy-model trainer; adding a training set to a workspace (ingestion) is
``core.training``.

The folder holds images and ``captions.csv`` (columns ``file,caption``; ``file`` relative to
the folder). Every listed file is one training example, so an image stored as 100 separate
files is seen 100 times as often as a single one, as duplicates are in scraped data.
``manifest`` names another CSV of the same columns (files still relative to the folder): the
shadow models of membership inference (``core.shadows``) each train on such a list, a random
half of one pool. With ``unconditional`` the model has no caption embedding and is saved as a
``diffusers.DDIMPipeline``; captions are then ignored (and may be absent or empty), and a
folder without ``captions.csv`` trains on every image in it (recursively, sorted by path).

Recipe (chosen because it memorises quickly on a CPU):

- images at ``size`` x ``size`` by the working-resolution rule (``core.images.to_working``),
  scaled to [-1, 1]; no augmentation;
- ``diffusers.UNet2DModel`` with one class embedding per caption (id 0 = ``""``, used for
  ``caption_dropout`` of the examples so that unconditional sampling and guidance work), or
  none with ``unconditional``;
- x0 prediction: with alpha-bar ``a_t`` of the cosine schedule, ``x_t = sqrt(a_t) x0 +
  sqrt(1 - a_t) eps`` and the loss is ``mean((unet(x_t, t, c) - x0)^2)``;
- ``t`` drawn uniformly from the ``grid_steps``-step DDIM grid used for sampling
  (``core.demo.model.make_scheduler``), not from all 1000 training timesteps;
- AdamW at a constant learning rate; examples visited in a fresh random order each epoch.

Runs are deterministic for a given data folder, settings, seed and thread count, and
resumable: every ``checkpoint_every`` steps the pipeline and a ``train_state.pt`` (weights,
optimiser, random state, data order) are written to ``out_dir``; rerunning the same command
continues from there, with results identical to an uninterrupted run. ``train_state.pt`` is
removed when the run completes. ``training.json`` in ``out_dir`` records the settings, the
data fingerprint, the seconds spent and the loss curve. ``snapshot_steps`` also saves the
pipeline as it was after those steps to ``snapshot_dir/step-<N>`` (checkpoints along training,
for the membership-against-quality trend of Figure 11).

Run as ``python -m core.demo.trainer --data DIR --out DIR --steps N --seed S``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import InputError
from ..images import load_image, to_working

if TYPE_CHECKING:
    import torch

CAPTIONS_FILE = "captions.csv"
STATE_FILE = "train_state.pt"
LOG_FILE = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (with the data and the thread count)."""
    steps: int
    seed: int = 0
    size: int = 32
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    grid_steps: int = 20
    caption_dropout: float = 0.1
    unconditional: bool = False

    def check(self) -> None:
        if self.steps < 1:
            raise InputError(f"steps must be >= 1, got {self.steps}")
        if self.size < 8 or self.size % (2 ** (len(self.channels) - 1)):
            raise InputError(f"size {self.size} must be >= 8 and divisible by {2 ** (len(self.channels) - 1)} for {len(self.channels)} UNet levels")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise InputError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if any(c % 8 for c in self.channels):
            raise InputError(f"channels must be multiples of 8 (group norm of 8 groups), got {self.channels}")


@dataclass(frozen=True)
class TrainReport:
    out_dir: Path
    steps: int
    seed: int
    examples: int  # training files (duplicates counted)
    captions: int  # distinct captions
    parameters: int
    seconds: float  # wall time of this invocation
    total_seconds: float  # wall time summed over all invocations of the run (resumes included)
    resumed_from: int  # step the run resumed from (0 for a fresh run)
    final_loss: float  # mean loss over the last 100 steps
    loss_curve: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class TrainingSet:
    files: list[Path]
    captions: list[str]
    fingerprint: str  # sha256 over (relative path, caption, file sha256), in order


def read_training_set(data_dir: str | Path, manifest: str | Path | None = None, *,
                      unconditional: bool = False) -> TrainingSet:
    """Read ``captions.csv`` of ``data_dir`` (or ``manifest``): one example per row, in file order.

    With ``unconditional`` captions are not needed (every caption is ``""``), and a folder with
    neither manifest nor ``captions.csv`` lists every image under it, sorted by relative path.
    """
    from ..images import is_image_name

    data_dir = Path(data_dir)
    path = Path(manifest) if manifest is not None else data_dir / CAPTIONS_FILE
    if not path.is_file() and unconditional and manifest is None:
        rows = [(p.relative_to(data_dir).as_posix(), "") for p in sorted(data_dir.rglob("*"))
                if p.is_file() and is_image_name(p)] if data_dir.is_dir() else []
        if not rows:
            raise InputError(f"{data_dir}: holds no images to train on")
        return _fingerprinted(data_dir, path, rows, unconditional)
    if not path.is_file():
        raise InputError(f"{path}: not found; a training folder needs a {CAPTIONS_FILE} with columns file,caption")
    needed = {"file"} if unconditional else {"file", "caption"}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            raise InputError(f"{path}: needs a header with columns {'file' if unconditional else 'file,caption'}, "
                             f"got {reader.fieldnames}")
        rows = [(r["file"], "" if unconditional else r["caption"]) for r in reader]
    return _fingerprinted(data_dir, path, rows, unconditional)


def _fingerprinted(data_dir: Path, path: Path, rows: list[tuple[str, str]], unconditional: bool) -> TrainingSet:
    if not rows:
        raise InputError(f"{path}: lists no training images; add rows file,caption")
    h = hashlib.sha256()
    files, captions = [], []
    for rel, caption in rows:
        file = data_dir / rel
        if not file.is_file():
            raise InputError(f"{path}: lists {rel!r}, which is not a file in {data_dir}")
        if not caption and not unconditional:
            raise InputError(f"{path}: {rel!r} has an empty caption; the empty caption is reserved for unconditional sampling")
        h.update(f"{rel}\0{caption}\0".encode())
        h.update(hashlib.sha256(file.read_bytes()).digest())
        files.append(file)
        captions.append(caption)
    return TrainingSet(files, captions, h.hexdigest())


def build_unet(config: TrainConfig, classes: int | None):
    from diffusers import UNet2DModel

    levels = len(config.channels)
    return UNet2DModel(
        sample_size=config.size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.channels),
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=8,
        num_class_embeds=classes,
    )


def _load_pixels(files: Sequence[Path], size: int) -> "torch.Tensor":
    import numpy as np
    import torch

    arrays = {}
    out = []
    for f in files:
        key = f.resolve()
        if key not in arrays:
            arrays[key] = to_working(load_image(f), size)
        out.append(arrays[key])
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    return x * 2.0 - 1.0


class _Order:
    """Examples in a fresh random permutation each epoch, drawn from a seeded generator."""

    def __init__(self, n: int, generator: "torch.Generator") -> None:
        self.n = n
        self.generator = generator
        self.queue: list[int] = []

    def take(self, k: int) -> list[int]:
        import torch

        while len(self.queue) < k:
            self.queue += torch.randperm(self.n, generator=self.generator).tolist()
        batch, self.queue = self.queue[:k], self.queue[k:]
        return batch


def _atomic_torch_save(obj: object, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _save_pipeline(unet, vocabulary: list[str], config: TrainConfig, out_dir: Path) -> None:
    from .model import CaptionConditionedPipeline, make_scheduler

    if config.unconditional:
        from diffusers import DDIMPipeline

        pipe = DDIMPipeline(unet=unet, scheduler=make_scheduler())
    else:
        pipe = CaptionConditionedPipeline(unet=unet, scheduler=make_scheduler(), vocabulary=vocabulary,
                                          default_steps=config.grid_steps)
    pipe.save_pretrained(out_dir, safe_serialization=True)


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int,
    seed: int = 0,
    size: int = 32,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    channels: Sequence[int] = (16, 32, 64),
    layers_per_block: int = 1,
    grid_steps: int = 20,
    caption_dropout: float = 0.1,
    unconditional: bool = False,
    manifest: str | Path | None = None,
    checkpoint_every: int = 250,
    snapshot_steps: Sequence[int] = (),
    snapshot_dir: str | Path | None = None,
    threads: int | None = None,
    resume: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainReport:
    """Train a CaptionConditionedPipeline on ``data_dir`` and save it to ``out_dir``.

    ``progress(step, steps, loss)`` is called after every step. With ``resume`` (the default)
    an unfinished run of the same settings and data in ``out_dir`` is continued; one with
    other settings raises InputError. ``threads`` sets torch's intra-op threads.
    """
    import torch
    import torch.nn.functional as F

    from .model import build_vocabulary, make_scheduler

    config = TrainConfig(steps=int(steps), seed=int(seed), size=int(size), batch_size=int(batch_size), lr=float(lr),
                         weight_decay=float(weight_decay), channels=tuple(int(c) for c in channels),
                         layers_per_block=int(layers_per_block), grid_steps=int(grid_steps),
                         caption_dropout=float(caption_dropout), unconditional=bool(unconditional))
    config.check()
    snapshot_steps = sorted({int(s) for s in snapshot_steps})
    if snapshot_steps and snapshot_dir is None:
        raise InputError("snapshot_steps needs a snapshot_dir to save the checkpoints in")
    if threads is not None:
        torch.set_num_threads(int(threads))
    data = read_training_set(data_dir, manifest, unconditional=config.unconditional)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    vocabulary = build_vocabulary(data.captions)
    ids = {c: i for i, c in enumerate(vocabulary)}
    x0_all = _load_pixels(data.files, config.size)
    labels_all = torch.tensor([ids[c] for c in data.captions], dtype=torch.long)

    scheduler = make_scheduler()
    scheduler.set_timesteps(config.grid_steps)
    grid = scheduler.timesteps.clone().long()
    alpha_bar = scheduler.alphas_cumprod.float()

    torch.manual_seed(config.seed)
    unet = build_unet(config, None if config.unconditional else len(vocabulary))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    order = _Order(len(data.files), generator)

    identity = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items() if k != "steps"},
                "data": data.fingerprint, "threads": torch.get_num_threads()}
    start_step, total_seconds, curve = 0, 0.0, []
    state_path = out_dir / STATE_FILE
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["identity"] != identity:
            raise InputError(f"{out_dir} holds an unfinished run with other settings or data; "
                             f"use another --out or delete {state_path}")
        if state["step"] > config.steps:
            raise InputError(f"{out_dir} holds an unfinished run already at step {state['step']}, past --steps {config.steps}; "
                             f"ask for more steps or delete {state_path}")
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        order.queue = list(state["queue"])
        start_step, total_seconds, curve = state["step"], state["seconds"], [tuple(p) for p in state["curve"]]

    parameters = sum(p.numel() for p in unet.parameters())
    unet.train()
    t_start = time.perf_counter()
    window: list[float] = []
    losses_since = []

    def checkpoint(step: int) -> None:
        elapsed = total_seconds + time.perf_counter() - t_start
        _save_pipeline(unet, vocabulary, config, out_dir)
        _atomic_torch_save({"identity": identity, "step": step, "seconds": elapsed, "curve": curve,
                            "unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
                            "generator": generator.get_state(), "queue": order.queue}, state_path)

    for step in range(start_step + 1, config.steps + 1):
        idx = torch.tensor(order.take(config.batch_size))
        x0 = x0_all[idx]
        labels = labels_all[idx].clone()
        drop = torch.rand(len(idx), generator=generator) < config.caption_dropout
        labels[drop] = 0
        if config.unconditional:
            labels = None
        t = grid[torch.randint(len(grid), (len(idx),), generator=generator)]
        eps = torch.randn(x0.shape, generator=generator)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t, class_labels=labels).sample
        loss = F.mse_loss(pred, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"training diverged at step {step} (loss {value}); lower the learning rate")
        window.append(value)
        window = window[-100:]
        losses_since.append(value)
        if step % 50 == 0 or step == config.steps:
            curve.append((step, sum(losses_since) / len(losses_since)))
            losses_since = []
        if progress is not None:
            progress(step, config.steps, value)
        if step in snapshot_steps:
            unet.eval()
            _save_pipeline(unet, vocabulary, config, Path(snapshot_dir) / f"step-{step}")  # type: ignore[arg-type]
            unet.train()
        if step % checkpoint_every == 0 and step < config.steps:
            checkpoint(step)

    seconds = time.perf_counter() - t_start
    total = total_seconds + seconds
    unet.eval()
    _save_pipeline(unet, vocabulary, config, out_dir)
    final_loss = sum(window) / len(window) if window else float("nan")
    _write_json({
        "command": f"python -m core.demo.trainer --data {Path(data_dir).as_posix()} --out {out_dir.as_posix()} "
                   f"--steps {config.steps} --seed {config.seed}"
                   + (f" --manifest {Path(manifest).as_posix()}" if manifest is not None else "")
                   + (" --unconditional" if config.unconditional else ""),
        "config": asdict(config),
        "data": {"dir": Path(data_dir).as_posix(), "manifest": None if manifest is None else Path(manifest).as_posix(),
                 "fingerprint": data.fingerprint,
                 "examples": len(data.files), "captions": len(vocabulary) - 1},
        "parameters": parameters,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": round(total, 1),
        "resumed_from": start_step,
        "final_loss": final_loss,
        "loss_curve": [[s, round(v, 6)] for s, v in curve],
    }, out_dir / LOG_FILE)
    state_path.unlink(missing_ok=True)
    return TrainReport(out_dir=out_dir, steps=config.steps, seed=config.seed, examples=len(data.files),
                       captions=len(vocabulary) - 1, parameters=parameters, seconds=seconds, total_seconds=total,
                       resumed_from=start_step, final_loss=final_loss, loss_curve=list(curve))


@dataclass(frozen=True)
class CaptionCopies:
    """How one caption's generations relate to its training images (normalised L2 at the model size)."""
    caption: str
    examples: int  # training files with this caption
    images: int  # distinct images among them (by content)
    generations: int
    copy_fraction: float  # generations within tau of one of the caption's training images
    median_l2: float  # median over generations of the L2 to the nearest of the caption's images
    largest_clique: int  # largest clique of generations linked by tiled L2 <= tau (the attack's statistic)
    copy_clique: int  # largest such clique whose members are all within tau of one training image

    @property
    def duplicates(self) -> int:
        """Copies of each image in the training set: examples / images, rounded."""
        return round(self.examples / self.images)


def measure_copies(
    model_dir: str | Path,
    data_dir: str | Path,
    *,
    per_prompt: int = 24,
    steps: int | None = None,
    seed: int = 0,
    tau: float = 0.1,
    grid: int = 4,
    batch_size: int = 64,
    captions: Sequence[str] | None = None,
) -> list[CaptionCopies]:
    """Generate ``per_prompt`` images per training caption (image j from seed ``seed + j``) and
    compare them with that caption's training images.

    Normalised L2 ``sqrt(mean((a - b)^2))`` on [0, 1] pixels at the model's size. A generation
    is a copy when it lies within ``tau`` of one of its caption's training images. Cliques link
    two generations when their tiled L2 (``grid`` x ``grid`` tiles, max over tiles) is <= tau.
    """
    import numpy as np
    import torch

    from ..cliques import maximum_clique
    from ..distances import pairwise_l2, pairwise_tiled_l2
    from .model import CaptionConditionedPipeline

    pipe = CaptionConditionedPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    size = pipe.sample_size
    data = read_training_set(data_dir)
    by_caption: dict[str, dict[str, Path]] = {}
    counts: dict[str, int] = {}
    for f, c in zip(data.files, data.captions):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        by_caption.setdefault(c, {}).setdefault(digest, f)
        counts[c] = counts.get(c, 0) + 1
    results = []
    for caption in (captions if captions is not None else sorted(by_caption)):
        train_px = np.stack([to_working(load_image(f), size) for f in by_caption[caption].values()])
        gens = []
        for start in range(0, per_prompt, batch_size):
            seeds = range(seed + start, seed + min(per_prompt, start + batch_size))
            gens.append(pipe([caption] * len(seeds), num_inference_steps=steps, output_type="np",
                             generator=[torch.Generator().manual_seed(s) for s in seeds]).images)
        g = np.concatenate(gens)
        to_train = pairwise_l2(g, train_px).numpy()
        nearest = to_train.min(1)
        adj = pairwise_tiled_l2(g, grid=grid).numpy() <= tau
        np.fill_diagonal(adj, False)
        copy_clique = 0
        for j in range(len(train_px)):
            members = np.flatnonzero(to_train[:, j] <= tau)
            if len(members) > copy_clique:
                copy_clique = max(copy_clique, len(maximum_clique(adj[np.ix_(members, members)])))
        results.append(CaptionCopies(caption=caption, examples=counts[caption], images=len(train_px),
                                     generations=len(g), copy_fraction=float((nearest <= tau).mean()),
                                     median_l2=float(np.median(nearest)), largest_clique=len(maximum_clique(adj)),
                                     copy_clique=copy_clique))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    defaults = TrainConfig(steps=1)
    p = argparse.ArgumentParser(prog="python -m core.demo.trainer", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help=f"folder with images and {CAPTIONS_FILE} (columns file,caption)")
    p.add_argument("--out", required=True, help="folder to write the diffusers pipeline to")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--size", type=int, default=defaults.size, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--channels", type=str, default=",".join(map(str, defaults.channels)),
                   help="UNet channels per level, comma-separated")
    p.add_argument("--layers-per-block", type=int, default=defaults.layers_per_block)
    p.add_argument("--grid-steps", type=int, default=defaults.grid_steps,
                   help="timesteps are drawn from this DDIM grid (also the pipeline's default sampling steps)")
    p.add_argument("--caption-dropout", type=float, default=defaults.caption_dropout)
    p.add_argument("--unconditional", action="store_true",
                   help="no caption conditioning; save a DDIMPipeline (captions.csv optional)")
    p.add_argument("--manifest", help="CSV (file,caption) of the examples to train on, files relative to --data "
                                      "(default: --data's captions.csv)")
    p.add_argument("--snapshot-steps", default="", help="also save the pipeline after these steps (comma-separated) "
                                                        "to --snapshot-dir/step-<N>")
    p.add_argument("--snapshot-dir", help="folder for --snapshot-steps")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--fresh", action="store_true", help="ignore an unfinished run in --out and start again")
    a = p.parse_args(argv)
    try:
        channels = tuple(int(c) for c in a.channels.split(","))
        snapshots = [int(s) for s in a.snapshot_steps.split(",") if s.strip()]
    except ValueError:
        print(f"error: --channels and --snapshot-steps must be comma-separated integers, got {a.channels!r}, "
              f"{a.snapshot_steps!r}", file=sys.stderr)
        return 1
    started = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        if step % 100 == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.5f} ({time.perf_counter() - started:.0f} s)", flush=True)

    from ..errors import MemauditError

    try:
        report = train(a.data, a.out, steps=a.steps, seed=a.seed, size=a.size, batch_size=a.batch_size, lr=a.lr,
                       channels=channels, layers_per_block=a.layers_per_block, grid_steps=a.grid_steps,
                       caption_dropout=a.caption_dropout, unconditional=a.unconditional, manifest=a.manifest,
                       snapshot_steps=snapshots, snapshot_dir=a.snapshot_dir,
                       checkpoint_every=a.checkpoint_every, threads=a.threads,
                       resume=not a.fresh, progress=progress)
    except MemauditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"saved {report.out_dir} ({report.parameters} parameters, {report.examples} examples, "
          f"{report.captions} captions, {report.total_seconds:.0f} s, final loss {report.final_loss:.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
