"""Generation on Ray against the local run: the same images, in the same process's rounds.

Work: the demo model's architecture (``benchmarks.workspaces.demo_model_dir``: 32 x 32, 20 DDIM
steps, float32 on the CPU), one caption, 192 images in batches of 32 (``--smoke``: 8 images in
batches of 4 at 2 steps, local 1 thread and Ray 1 worker only), each variant into a fresh workspace:

* local, 1 thread and local, 2 threads: ``core.generate.generate`` in this process;
* Ray, 1 worker and Ray, 2 workers: ``core.generate_ray.generate_on_ray`` on a private Ray
  instance started here (``core.cluster.start_local``: 2 CPUs, no dashboard), each actor on
  one CPU with one torch thread;
* Ray start-up: ``generate_on_ray`` once more on a workspace that already holds every image:
  connecting, starting one actor, loading the model in it, planning, and nothing to sample.

Overhead per work unit (one batch): (Ray 1 worker - Ray start-up - local 1 thread) / batches,
the cost of shipping a batch to an actor and its rows back, on top of the same sampling and
storing. Scaling: Ray 2 workers against Ray 1 worker, both with their start-up (on a 2-core
machine shared with other work, two single-thread actors compete with everything else).
Ratios against local 1 thread (>= 1: faster). Ray itself starting (``ray.init``) is reported
apart: a cluster is started once, not per command.

The audit: one workspace of ``benchmarks.workspaces`` (24 prompts of 100 generations, 32 x 32;
``--smoke``: 4 x 20) audited locally (1 thread, tau curves inline) and on Ray with 1 and 2
workers (each actor one CPU, one thread); every run's counts must equal the local run's. Overhead
per prompt: (Ray 1 worker - local) / prompts, actor start and the context built in it included.

The same run on a multi-GPU node and on a cluster of nodes is printed as command lines
(``MULTI_GPU``, ``MULTI_NODE``); there is no GPU and no second node here.

    python -m benchmarks.bench_ray [--smoke]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import cli, print_table, write_json
from benchmarks.workspaces import demo_model_dir

STEPS = 20
COLUMNS = ["variant", "seconds", "images_per_s", "ratio_to_local_1_thread", "note"]
MULTI_GPU = [
    "# one machine with 8 GPUs: a private Ray instance, one actor per GPU",
    "memaudit generate WS --model MODEL_DIR --prompts prompts.txt --per-prompt 500 --batch-size 64 --ray local",
    "# or a long-lived instance that several commands share",
    "ray start --head --num-gpus 8",
    "memaudit generate WS --model MODEL_DIR --prompts prompts.txt --per-prompt 500 --batch-size 64 --ray auto",
    "memaudit audit WS --ray auto",
]
MULTI_NODE = [
    "# head node (it holds the workspace's audit.db on its local disk; WS and MODEL_DIR on a shared filesystem,",
    "# the same path on every node; the same memaudit and Ray versions on every node)",
    "ray start --head --port 6379",
    "# every other node",
    "ray start --address HEAD_IP:6379",
    "# on the head node: the driver, the only process that writes audit.db",
    "memaudit generate /shared/WS --model /shared/MODEL_DIR --prompts prompts.txt --per-prompt 500 --batch-size 64 "
    "--ray HEAD_IP:6379",
    "memaudit audit /shared/WS --ray HEAD_IP:6379",
]
GPU_RUN = ("On a GPU cluster the same script would measure images/s with 1, 2, ... N GPU actors against one local GPU "
           "process at batch 64, 50 steps (the paper's setting; about 1.2 images/s per A100): scaling should be close "
           "to N while the driver's PNG-free work (inserting rows) stays far below one batch's sampling time, and the "
           "overhead per batch measured here is what each batch of 64 adds.")


def audit_variants(tmp: Path, address: str, smoke: bool) -> tuple[list[dict], dict[str, float]]:
    """The same audit (``benchmarks.workspaces``: prompts of planted copies and distinct images) locally
    and on Ray with 1 and 2 workers; every run's counts must be the local run's."""
    import torch

    from benchmarks.workspaces import build_workspace
    from core.audit import run_audit
    from core.results import count_summary
    from core.store import Workspace

    prompts, per_prompt = (4, 20) if smoke else (24, 100)
    built = build_workspace(tmp / "audit-ws", prompts, per_prompt)
    ws = Workspace.open(built.root)
    ws.set_setting("audit_workers", 0)  # the tau curves inline, as every Ray actor computes them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds: dict[str, float] = {}
    summaries = {}
    try:
        run_audit(ws)  # warm-up: imports, the training set's pooled cache
        variants = [("audit local, 1 thread", None)] + [(f"audit Ray, {w} worker{'s' if w > 1 else ''}", w)
                                                         for w in ((1,) if smoke else (1, 2))]
        for name, workers in variants:
            t = time.perf_counter()
            run_id = run_audit(ws, ray_address=address if workers else None, ray_workers=workers or 0)
            seconds[name] = time.perf_counter() - t
            summaries[name] = {k: v for k, v in count_summary(ws, run_id).items() if k != "run_id"}
    finally:
        torch.set_num_threads(threads)
    first = summaries["audit local, 1 thread"]
    assert all(s == first for s in summaries.values()), summaries
    base = seconds["audit local, 1 thread"]
    units = prompts
    rows = [{"variant": name, "seconds": s, "images_per_s": prompts * per_prompt / s, "ratio_to_local_1_thread": base / s,
             "note": f"{prompts} prompts x {per_prompt} generations, 32 x 32; counts equal to the local run's"}
            for name, s in seconds.items()]
    rows.append({"variant": "audit Ray overhead per prompt", "seconds": (seconds["audit Ray, 1 worker"] - base) / units,
                 "images_per_s": "", "ratio_to_local_1_thread": "",
                 "note": "(Ray 1 worker - local) / prompts: actor start, the context built in it, shipping each unit"})
    return rows, seconds


def main(smoke: bool = False) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError:
        print("Ray is not installed (pip install 'memaudit[ray]'): nothing measured")
        return write_json("ray", smoke, {"skipped": "ray not installed"})
    import torch

    from core import cluster
    from core.generate import generate
    from core.generate_ray import generate_on_ray
    from core.store import Workspace

    images, batch = (8, 4) if smoke else (192, 32)
    steps = 2 if smoke else STEPS
    batches = -(-images // batch)
    tmp = Path(tempfile.mkdtemp(prefix="memaudit-bench-ray-"))
    threads = torch.get_num_threads()
    started_here = not ray.is_initialized()
    try:
        model, model_note = demo_model_dir(tmp, STEPS)
        from core.demo.model import CaptionConditionedPipeline

        caption = CaptionConditionedPipeline.from_pretrained(model).captions[0]
        t0 = time.perf_counter()
        address = cluster.start_local(num_cpus=2) if started_here else ray.get_runtime_context().gcs_address
        ray_start = time.perf_counter() - t0
        kw = dict(steps=steps, guidance=1.0, batch_size=batch, seed=0, device="cpu")
        count = [0]

        def fresh() -> Workspace:
            count[0] += 1
            return Workspace.init(tmp / f"ws{count[0]}")

        def local(n_threads: int) -> float:
            torch.set_num_threads(n_threads)
            ws = fresh()
            t = time.perf_counter()
            assert generate(ws, str(model), [caption], images, **kw).generated == images
            return time.perf_counter() - t

        def on_ray(workers: int, ws: Workspace | None = None) -> float:
            ws = ws or fresh()
            t = time.perf_counter()
            report = generate_on_ray(ws, str(model), [caption], images, address=address, workers=workers, **kw)
            assert report.generated + report.skipped_existing == images
            return time.perf_counter() - t

        full = fresh()  # every image already stored: a Ray run on it is start-up alone
        local_into = lambda ws: generate(ws, str(model), [caption], images, **kw)  # noqa: E731
        local_into(full)  # also the warm-up: imports, kernels, the weights hash
        variants = ["local, 1 thread", "local, 2 threads", "Ray start-up", "Ray, 1 worker", "Ray, 2 workers"]
        if smoke:
            variants = ["local, 1 thread", "Ray, 1 worker"]
        else:
            on_ray(1, full)  # untimed: the first actor of a new instance starts slower than the next ones
        seconds: dict[str, float] = {}
        for name in variants:
            if name.startswith("local"):
                seconds[name] = local(int(name.split(", ")[1][0]))
            elif name == "Ray start-up":
                seconds[name] = on_ray(1, full)
            else:
                seconds[name] = on_ray(int(name.split(", ")[1][0]))
        torch.set_num_threads(threads)
        base = seconds["local, 1 thread"]
        overhead = (seconds["Ray, 1 worker"] - seconds.get("Ray start-up", 0.0) - base) / batches
        rows = []
        for name, s in seconds.items():
            work = name != "Ray start-up"
            rows.append({"variant": name, "seconds": s, "images_per_s": images / s if work else "",
                         "ratio_to_local_1_thread": base / s if work else "",
                         "note": "connect, one actor, load the model, plan; nothing to sample" if not work else ""})
        rows.append({"variant": "Ray overhead per batch", "seconds": overhead, "images_per_s": "", "ratio_to_local_1_thread": "",
                     "note": f"(Ray 1 worker - start-up - local 1 thread) / {batches} batches"
                             + ("" if "Ray start-up" in seconds else "; start-up not measured at smoke size, so included")})
        if "Ray, 2 workers" in seconds:
            rows.append({"variant": "Ray scaling, 2 workers / 1", "seconds": "", "images_per_s": "",
                         "ratio_to_local_1_thread": seconds["Ray, 1 worker"] / seconds["Ray, 2 workers"],
                         "note": "speed-up of 2 actors over 1, start-up included"})
        audit_rows, audit_seconds = audit_variants(tmp, address, smoke)
        rows += audit_rows
        print(f"model: {model_note}; {images} images in batches of {batch}, {steps} DDIM steps, float32, CPU; "
              f"Ray {ray.__version__} started in {ray_start:.1f} s (not counted above)")
        print_table(rows, COLUMNS, title="one run each, in the order shown, in one process, after a warm-up of each side")
        print("A multi-GPU node:")
        print("\n".join(f"  {line}" for line in MULTI_GPU))
        print("A cluster of nodes:")
        print("\n".join(f"  {line}" for line in MULTI_NODE))
        print(GPU_RUN)
        return write_json("ray", smoke, {
            "model": model_note, "images": images, "batch_size": batch, "steps": steps, "ray": ray.__version__,
            "ray_start_s": ray_start, "seconds": seconds, "overhead_per_batch_s": overhead, "rows": rows,
            "audit_seconds": audit_seconds,
            "multi_gpu_commands": MULTI_GPU, "multi_node_commands": MULTI_NODE, "gpu_run_not_measured": GPU_RUN})
    finally:
        torch.set_num_threads(threads)
        if started_here:
            cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0])
