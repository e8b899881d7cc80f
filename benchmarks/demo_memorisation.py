"""Demo model benchmark: how much the shipped model memorises, per duplicate count, and how fast it samples.

For every caption of the demo training set, ``--per-prompt`` images are generated (image j
from seed j, ``--steps`` DDIM steps, no guidance) with the shipped
``CaptionConditionedPipeline`` and compared with that caption's training images
(``core.demo.trainer.measure_copies``; normalised L2 on [0, 1] pixels at 32 x 32):

- copy: a generation within ``--tau`` (0.1) of one of its caption's training images;
- flagged: the caption's largest clique of generations linked by tiled L2 <= tau (4 x 4
  grid) has >= 10 members (the attack's criterion, blind to the training set);
- memorised: a clique of >= 10 generations that are all copies of the same training image.

Captions are grouped by duplicate count (copies of each image in the training set) and,
for single images, by whether the caption is shared by several different images. Sampling
time is measured separately: all captions, ``--per-prompt`` images each, one pipeline call
per caption, on ``--threads`` torch threads.

    python -m benchmarks.demo_memorisation [--model DIR] [--per-prompt 24] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.demo.data import DEMO_DATA_DIR, DEMO_MODEL_DIR, DEMO_PROMPTS  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def level(r) -> str:
    if r.images > 1:
        return "1 (shared caption)"
    return f"{r.duplicates}" + (" (own caption)" if r.duplicates == 1 else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--data", default=str(DEMO_DATA_DIR))
    p.add_argument("--per-prompt", type=int, default=24)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-timing", action="store_true")
    a = p.parse_args(argv)

    import torch

    from core.demo.model import CaptionConditionedPipeline
    from core.demo.trainer import measure_copies

    torch.set_num_threads(a.threads)
    prompts = DEMO_PROMPTS.read_text(encoding="utf-8").splitlines()
    timing = None
    if not a.skip_timing:
        pipe = CaptionConditionedPipeline.from_pretrained(a.model)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        for caption in prompts:
            pipe([caption] * a.per_prompt, num_inference_steps=a.steps, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in range(a.per_prompt)])
        timing = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = measure_copies(a.model, a.data, per_prompt=a.per_prompt, steps=a.steps, tau=a.tau, captions=prompts)
    measure_seconds = time.perf_counter() - t0

    groups: dict[str, list] = {}
    for r in results:
        groups.setdefault(level(r), []).append(r)
    lines = [f"model {a.model}; {a.per_prompt} images per caption, {a.steps} DDIM steps, tau {a.tau}, "
             f"{a.threads} threads, {platform.processor() or platform.machine()}",
             "",
             "| copies of each image | captions | memorised (clique of >= 10 copies) | flagged (clique >= 10) "
             "| generations that are copies | median L2 to nearest own image |",
             "|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (-int(k.split()[0]), k)):
        rs = groups[key]
        mem = sum(r.copy_clique >= 10 for r in rs)
        flag = sum(r.largest_clique >= 10 for r in rs)
        copies = sum(r.copy_fraction * r.generations for r in rs) / sum(r.generations for r in rs)
        med = float(np.median([r.median_l2 for r in rs]))
        lines.append(f"| {key} | {len(rs)} | {mem}/{len(rs)} ({mem / len(rs):.0%}) | {flag}/{len(rs)} | "
                     f"{copies:.0%} | {med:.3f} |")
    if timing is not None:
        lines += ["", f"sampling {len(prompts)} captions x {a.per_prompt} images at {a.steps} steps: {timing:.1f} s"]
    lines += ["", "per caption (copies, images, copy fraction, median L2, largest clique, copy clique):"]
    for r in sorted(results, key=lambda r: (-r.duplicates, r.images, r.caption)):
        lines.append(f"  {r.duplicates:3d} {r.images:2d} {r.copy_fraction:4.2f} {r.median_l2:.3f} "
                     f"{r.largest_clique:2d} {r.copy_clique:2d}  {r.caption}")
    text = "\n".join(lines)
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "demo_model.json").write_text(json.dumps({
        "per_prompt": a.per_prompt, "steps": a.steps, "tau": a.tau, "threads": a.threads,
        "sampling_seconds": timing, "measure_seconds": measure_seconds,
        "captions": [r.__dict__ for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
