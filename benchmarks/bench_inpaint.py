"""Inpainting speed: seconds per image per completion, against plain sampling of the same model.

Model: the shipped demo model (assets/demo/model: ``CaptionConditionedPipeline``, a UNet2DModel
with channels 16/32/64 at 32 x 32, DDIM with x0 prediction, 20 steps), or the same architecture
with random weights when it does not load. Images: the demo training images (32 x 32), the
left half masked.

Per batch of B completions (B = 32 and 64; ``--smoke``: 4 at 2 steps), in interleaved rounds
after one warm-up call of each:

* plain sampling: ``pipe([caption] * B, num_inference_steps=20, generator=[B generators])``,
  the baseline: what generating B images costs;
* RePaint: ``core.repaint.repaint`` on B images, the same UNet, scheduler, steps and generators
  (adds the known region's noise draw and blend at every step);
* ranking loss: ``core.repaint.denoising_loss`` of B completions at the grid timesteps up to 0.3 of
  the schedule (6 of the 20-step grid) with 2 noise draws: 12 UNet calls per completion;
* run_inpainting: ``core.inpaint.run_inpainting`` end to end into a temporary workspace (loading,
  checks, RePaint, ranking, distances, PNG files and rows) for B/8 images x 8 completions.

Reported: seconds per image per completion and the ratio to plain sampling (ratio <= 1 would be
no slower; RePaint is expected near 1, the end-to-end run adds the ranking loss and storage), in
wall-clock and in the process's CPU seconds (``time.process_time``): on a shared machine the CPU
figures are the steadier ones.

    python -m benchmarks.bench_inpaint [--smoke]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import cli, print_table, write_json
from benchmarks.workspaces import demo_model_dir

STEPS = 20
SAMPLES = 8
COLUMNS = ["batch", "variant", "median_s", "s_per_image_per_sample", "ratio_to_plain", "cpu_s", "cpu_s_per_image_per_sample",
           "cpu_ratio_to_plain"]
GPU_VARIANT = [
    "the same variants on CUDA in float16 (load_pipeline's default there) and float32, same seeds: seconds per "
    "image per completion, and the RePaint/plain ratio (the known region's CPU noise draws are moved to the GPU "
    "every step, which may show at large batches)",
    "batch size sweep (64 to 4096 completions) until out of memory: throughput and peak GPU memory",
    "run_inpainting end to end: whether PNG writing, hashing and SQLite inserts on the CPU leave the GPU idle "
    "(GPU utilisation), i.e. whether storing should overlap the next batch",
    "a diffusers inpainting pipeline (Stable Diffusion inpainting at 512 x 512, 50 steps) against its own "
    "text-to-image sampling, per completion",
]


def main(smoke: bool = False) -> dict:
    import numpy as np
    import torch

    from core import inpaint
    from core.demo.data import DEMO_DATA_DIR
    from core.images import load_working, save_png_atomic
    from core.demo.model import CaptionConditionedPipeline
    from core.repaint import denoising_loss, repaint
    from core.store import Workspace

    batches = [8] if smoke else [32, 64]
    steps = 2 if smoke else STEPS
    rounds = 1 if smoke else 2
    tmp = Path(tempfile.mkdtemp(prefix="memaudit-bench-inpaint-"))
    try:
        model, note = demo_model_dir(tmp, STEPS)
        pipe = CaptionConditionedPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        size = pipe.sample_size
        files = sorted(DEMO_DATA_DIR.glob("*.png"))[:: 7][: max(batches)]
        images = tmp / "images"
        for f in files:
            save_png_atomic(load_working(f, size), images / f.name)
        known_all = torch.from_numpy(np.stack([load_working(f, size) for f in files])).permute(0, 3, 1, 2) * 2 - 1
        mask = torch.from_numpy(inpaint.named_mask("left", size)[None, None].astype(np.float32))
        pipe.scheduler.set_timesteps(steps)
        grid = sorted(int(t) for t in pipe.scheduler.timesteps)
        ts = [t for t in grid if 0 < t <= 0.3 * pipe.scheduler.config.num_train_timesteps] or grid[:1]
        noises = torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(0))
        params = sum(p.numel() for p in pipe.unet.parameters())
        ws = Workspace.init(tmp / "ws")

        def known(b: int) -> torch.Tensor:
            return known_all[torch.arange(b) % len(known_all)]

        def gens(b: int) -> list[torch.Generator]:
            return [torch.Generator().manual_seed(j) for j in range(b)]

        def run_plain(b: int) -> None:
            with torch.inference_mode():
                pipe([""] * b, num_inference_steps=steps, generator=gens(b), output_type="np")

        def run_repaint(b: int) -> None:
            repaint(pipe.unet, pipe.scheduler, known(b), mask, gens(b), steps, torch.zeros(b, dtype=torch.long))

        def run_loss(b: int) -> None:
            denoising_loss(pipe.unet, pipe.scheduler, known(b), ts, noises, torch.zeros(b, dtype=torch.long))

        def run_full(b: int) -> None:
            per = max(1, b // SAMPLES)
            sub = tmp / f"subset-{per}"
            if not sub.exists():
                sub.mkdir()
                for f in sorted(images.glob("*.png"))[:per]:
                    shutil.copyfile(f, sub / f.name)
            inpaint.run_inpainting(ws, str(model), sub, samples=min(b, SAMPLES), steps=steps, batch_size=b, device="cpu")

        variants = [("plain sampling", run_plain), ("RePaint", run_repaint), ("ranking loss", run_loss),
                    ("run_inpainting end to end", run_full)]
        for _, fn in variants:
            fn(2)
        rows, raw = [], {}
        for b in batches:
            wall: dict[str, list[float]] = {n: [] for n, _ in variants}
            cpu: dict[str, list[float]] = {n: [] for n, _ in variants}
            for _ in range(rounds):
                for name, fn in variants:
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn(b)
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
            raw[str(b)] = {"wall": wall, "cpu": cpu}
            med = {n: statistics.median(v) for n, v in wall.items()}
            completions = {n: (max(1, b // SAMPLES) * min(b, SAMPLES) if n == "run_inpainting end to end" else b) for n in med}
            per = {n: med[n] / completions[n] for n in med}
            per_cpu = {n: statistics.median(cpu[n]) / completions[n] for n in med}
            for name, _ in variants:
                rows.append({"batch": b, "variant": name, "median_s": med[name], "s_per_image_per_sample": per[name],
                             "ratio_to_plain": per[name] / per["plain sampling"], "cpu_s": statistics.median(cpu[name]),
                             "cpu_s_per_image_per_sample": per_cpu[name],
                             "cpu_ratio_to_plain": per_cpu[name] / per_cpu["plain sampling"], "rounds": rounds})
        print(f"model: {note}; {params:,} UNet parameters; {size} x {size}; {steps} DDIM steps; float32 CPU, "
              f"{torch.get_num_threads()} torch threads; ranking loss at timesteps {ts} x 2 draws; medians of {rounds} rounds")
        print_table(rows, COLUMNS, title="seconds per image per completion (ratio_to_plain: against sampling as many images)")
        cuda = torch.cuda.is_available()
        if not cuda:
            print("No GPU here: nothing GPU-specific was measured. The GPU variant would measure:")
            for line in GPU_VARIANT:
                print(f"  - {line}")
        return write_json("inpaint", smoke, {
            "model": note, "unet_parameters": params, "size": size, "steps": steps, "score_timesteps": ts, "rounds": rounds,
            "rows": rows, "raw_seconds": raw, "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_variant_not_measured": [] if cuda else GPU_VARIANT})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0])
