"""Sampling speed: memaudit's ``generate`` (one seed per image, stored) against a plain pipeline call.

Model: the demo model's architecture (``CaptionConditionedPipeline``: a class-conditional
``UNet2DModel`` with channels 16/32/64, one layer a block, 32 x 32 output, 37 caption
classes, DDIM with x0 prediction). The trained demo model in assets/demo/model is used when
it loads; otherwise the same architecture with random weights (``core.demo.trainer.build_unet``),
which costs the same to sample. Both sides load the same folder, so scheduler, steps (20,
no guidance) and precision (float32 on the CPU) are identical.

Per batch size B (32 and 64; ``--smoke``: 4 at 2 steps), in interleaved rounds so that
drifting machine load hits every variant alike (after one warm-up call of each at batch 2):

* plain: ``pipe([caption] * B, num_inference_steps=20, generator=torch.Generator().manual_seed(s),
  output_type="np")``, one generator for the whole batch (the usual diffusers call);
* plain + per-image generators: the same call with a list of B generators (memaudit's seed rule
  without the rest of memaudit);
* memaudit sample: ``core.generate.sample`` (the call ``generate`` makes for one batch);
* memaudit generate: ``core.generate.generate(ws, model, [caption], per_prompt=B, batch_size=B)``
  into a temporary workspace, a fresh base seed each round: loading the pipeline (and hashing its
  weights, cached per process), sampling, PNG encoding, sha256, atomic file writes and the
  database rows. Also shown without its ``load_pipeline`` time (measured separately in the same
  rounds), i.e. the steady state of a long run that loads once.

Images per second and the ratio to the plain call at the same batch size; ratio >= 1 means
no slower. Both wall-clock seconds and the process's CPU seconds (``time.process_time``, all
threads) are reported: on a shared machine the CPU-time ratio is the steadier one. No GPU on the development machine: the GPU variant is described, not measured.

    python -m benchmarks.bench_generate [--smoke]
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
COLUMNS = ["batch", "variant", "median_s", "images_per_s", "ratio_to_plain", "cpu_s", "cpu_ratio_to_plain"]
GPU_VARIANT = [
    "precision: float32 vs float16 (memaudit's load_pipeline default on CUDA) vs bfloat16, same seeds",
    "attention: PyTorch SDPA (flash / memory-efficient kernels) vs the math kernel (the demo UNet has no attention "
    "blocks; a Stable Diffusion UNet does)",
    "memory format: channels_last for the UNet (and VAE) vs contiguous",
    "torch.compile(unet, mode='max-autotune') vs eager, compile time reported separately",
    "batch size sweep (1, 8, 16, 32, 64, 128, 256 until out of memory): images/s and peak GPU memory",
    "per-image CPU generators vs one generator: the noise is drawn on the CPU then moved, which may "
    "matter at large batch sizes on a GPU",
    "generate end to end: whether PNG encoding, hashing and SQLite inserts on the CPU keep the GPU busy "
    "(GPU utilisation), i.e. whether storing should overlap sampling",
]


def main(smoke: bool = False) -> dict:
    import torch

    from core.generate import generate, load_pipeline, sample
    from core.demo.model import CaptionConditionedPipeline
    from core.store import Workspace

    batches = [4] if smoke else [32, 64]
    steps = 2 if smoke else STEPS
    rounds = 1 if smoke else 2
    tmp = Path(tempfile.mkdtemp(prefix="memaudit-bench-generate-"))
    try:
        model, model_note = demo_model_dir(tmp, STEPS)
        plain = CaptionConditionedPipeline.from_pretrained(model)
        plain.set_progress_bar_config(disable=True)
        caption = plain.captions[0]
        loaded = load_pipeline(str(model), "cpu")
        ws = Workspace.init(tmp / "ws")
        params = sum(p.numel() for p in plain.unet.parameters())
        seed = [0]

        def run_plain(b: int) -> None:
            with torch.inference_mode():
                plain([caption] * b, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed[0]),
                      output_type="np")

        def run_plain_list(b: int) -> None:
            with torch.inference_mode():
                plain([caption] * b, num_inference_steps=steps,
                      generator=[torch.Generator().manual_seed(seed[0] + j) for j in range(b)], output_type="np")

        def run_sample(b: int) -> None:
            sample(loaded, [(caption, None)] * b, [seed[0] + j for j in range(b)], steps=steps, guidance=None)

        def run_generate(b: int) -> None:
            report = generate(ws, str(model), [caption], b, steps=steps, guidance=1.0, batch_size=b, seed=seed[0], device="cpu")
            assert report.generated == b, report

        def run_load(b: int) -> None:
            load_pipeline(str(model), "cpu")

        variants = [("plain", run_plain), ("plain + per-image generators", run_plain_list),
                    ("memaudit sample", run_sample), ("memaudit generate", run_generate), ("load_pipeline", run_load)]
        rows, raw = [], {}
        for _, fn in variants:  # warm up: first-call imports, kernels
            seed[0] += 10_000
            fn(2)
        for b in batches:
            times: dict[str, list[float]] = {name: [] for name, _ in variants}
            cpu: dict[str, list[float]] = {name: [] for name, _ in variants}
            for r in range(rounds):
                for name, fn in variants:
                    seed[0] += 10_000
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn(b)
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
            raw[str(b)] = {"wall": times, "cpu": cpu}
            med = {name: statistics.median(v) for name, v in times.items()}
            mcpu = {name: statistics.median(v) for name, v in cpu.items()}
            med["memaudit generate without load"] = med["memaudit generate"] - med["load_pipeline"]
            mcpu["memaudit generate without load"] = mcpu["memaudit generate"] - mcpu["load_pipeline"]
            for name in ["plain", "plain + per-image generators", "memaudit sample", "memaudit generate",
                         "memaudit generate without load"]:
                rows.append({"batch": b, "variant": name, "median_s": med[name], "images_per_s": b / med[name],
                             "ratio_to_plain": med["plain"] / med[name], "cpu_s": mcpu[name],
                             "cpu_ratio_to_plain": mcpu["plain"] / mcpu[name], "rounds": rounds})
            rows.append({"batch": b, "variant": "load_pipeline (per generate call)", "median_s": med["load_pipeline"],
                         "images_per_s": "", "ratio_to_plain": "", "cpu_s": mcpu["load_pipeline"],
                         "cpu_ratio_to_plain": "", "rounds": rounds})
            print_table([r for r in rows if r["batch"] == b], COLUMNS, title=f"batch {b} done")
        print(f"model: {model_note}; {params:,} UNet parameters; {steps} DDIM steps, float32, CPU, "
              f"{torch.get_num_threads()} torch threads; medians of {rounds} interleaved rounds after a warm-up call of each at batch 2")
        print_table(rows, COLUMNS, title="images per second (ratio_to_plain >= 1: no slower than the plain call)")
        cuda = torch.cuda.is_available()
        if not cuda:
            print("No GPU here: nothing GPU-specific was measured. The GPU variant would measure:")
            for line in GPU_VARIANT:
                print(f"  - {line}")
        return write_json("generate", smoke, {
            "model": model_note, "unet_parameters": params, "steps": steps, "dtype": "float32", "device": "cpu",
            "rounds": rounds, "rows": rows, "raw_seconds": raw, "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_variant_not_measured": [] if cuda else GPU_VARIANT,
        })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0])
