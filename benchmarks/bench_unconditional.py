"""An unconditional audit at the paper's CIFAR-10 scale: import and audit of N unconditional
generations of 32 x 32 against a training set of 50,000, each step a real ``memaudit`` process,
with its wall time and peak resident memory (the kernel's ru_maxrss of that process).

Images are synthetic (``bench_nearest``'s ``natural`` kind: a smooth random layout plus detail
that pooling averages away, so the certified search has work to do); 1% of the generations
copy a training image with a little noise. Both sets are written as PNG files in folders of
10,000. Reported per N: seconds and seconds per 100,000 generations for ``import-generations``
and ``audit``, their peak memory, and, against the first (smallest) N run in the same process,
the ratio of seconds per generation (1.0 = time linear in the generations) and of peak memory
(1.0 = memory independent of the generations). The audit must extract exactly the planted copies.

    python -m benchmarks.bench_unconditional [--smoke] [--generations 100000,1000000] [--training 50000]
        [--keep DIR]

``--smoke``: 400 and 1,200 generations against 200 training images.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_nearest import SIZE, _detail, _smooth
from benchmarks.common import print_table, write_json
from core.store import DB_NAME

COPY_SHARE = 0.01
FOLDER = 10_000  # files per folder of the source sets
BLOCK = 5_000  # images synthesised at once


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return (np.clip(_smooth(rng, n) + _detail(rng, n), 0, 1) * 255 + 0.5).astype(np.uint8)


def _write(folder: Path, index: int, image: np.ndarray) -> str:
    from PIL import Image

    rel = f"{index // FOLDER:03d}/{index:07d}.png"
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / rel)
    return rel


def build_sources(root: Path, generations: int, training: int, seed: int = 0, train_dir: Path | None = None) -> int:
    """Training PNGs in root/train (unless ``train_dir`` holds them already), generation PNGs in
    root/gens with root/gens/manifest.csv (1% noisy copies of training images); the number of copies."""
    rng = np.random.default_rng(seed)
    train_dir = train_dir or root / "train"
    if not (train_dir / "done").is_file():
        for start in range(0, training, BLOCK):
            for j, img in enumerate(_images(rng, min(BLOCK, training - start))):
                _write(train_dir, start + j, img)
        (train_dir / "done").write_text("")
    if not generations:
        return 0
    rng = np.random.default_rng([seed, generations])
    gen_dir = _mkdir(root / "gens")
    copies = int(generations * COPY_SHARE)
    copy_rows = set(rng.choice(generations, copies, replace=False).tolist())
    with open(gen_dir / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "prompt", "seed"])
        for start in range(0, generations, BLOCK):
            block = _images(rng, min(BLOCK, generations - start))
            for j, img in enumerate(block):
                i = start + j
                if i in copy_rows:  # a training image again, with a little noise
                    src = np.asarray(_load(train_dir, int(rng.integers(training))), np.float32)
                    img = np.clip(src + rng.normal(0, 2.0, src.shape), 0, 255).astype(np.uint8)
                w.writerow([_write(gen_dir, i, img), "", i])
    return copies


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _load(folder: Path, index: int) -> np.ndarray:
    from PIL import Image

    with Image.open(folder / f"{index // FOLDER:03d}/{index:07d}.png") as im:
        return np.asarray(im.convert("RGB"))


_CHILD = """import sys
from core.cli import main
try:
    code = main(sys.argv[1:])
finally:
    # the peak of this program alone: VmHWM belongs to the memory map exec made (ru_maxrss would also count
    # the benchmark's own pages copied by fork before exec)
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"\\n__peak_kb__ {peak}", flush=True)
sys.exit(code)
"""


def measured(args: list[str]) -> tuple[float, float, str]:
    """Run ``memaudit ARGS`` as its own process: (seconds, peak resident MB, output)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=env, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"memaudit {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}")
    out, _, peak = done.stdout.rpartition("__peak_kb__ ")
    return seconds, int(peak.split()[0]) / 1024.0, out


def training_workspace(root: Path, training: int) -> tuple[Path, dict]:
    """A workspace holding only the training set (built once per training size and reused)."""
    base = root / f"base-{training}"
    info = root / f"base-{training}.json"
    import json

    if not info.is_file():
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        build_sources(root / f"src-train-{training}", 0, training)
        synth = time.perf_counter() - t0
        measured(["init", str(base)])
        seconds, peak, _ = measured(["add-training", str(base), str(root / f"src-train-{training}" / "train")])
        info.write_text(json.dumps({"training_synthesise_s": synth, "add_training_s": seconds, "add_training_mb": peak}))
    return base, json.loads(info.read_text())


def run_one(root: Path, generations: int, training: int) -> dict:
    import json

    base, made = training_workspace(root, training)
    src = root / f"src-{generations}"
    t0 = time.perf_counter()
    copies = build_sources(src, generations, training, train_dir=root / f"src-train-{training}" / "train")
    build_s = time.perf_counter() - t0
    ws = root / f"ws-{generations}-{training}"
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(base, ws)
    imp_s, imp_mb, _ = measured(["import-generations", str(ws), str(src / "gens" / "manifest.csv")])
    aud_s, aud_mb, out = measured(["audit", str(ws), "--json"])
    summary = json.loads(out[out.index("{"):])
    per = 100_000 / generations
    return {"generations": generations, "training": training, "synthesise_s": build_s, **made,
            "import_s": imp_s, "import_s_per_100k": imp_s * per, "import_peak_mb": imp_mb,
            "audit_s": aud_s, "audit_s_per_100k": aud_s * per, "audit_peak_mb": aud_mb,
            "copies": copies, "extracted": summary["extracted_candidates"],
            "uncertified_nearest": summary["uncertified_nearest"],
            "db_mb": (ws / DB_NAME).stat().st_size / 2**20,
            "cache_mb": sum(p.stat().st_size for p in (ws / "cache").rglob("*") if p.is_file()) / 2**20}


def main(smoke: bool = False, sizes: tuple[int, ...] | None = None, training: int | None = None,
         keep: str | None = None) -> dict:
    sizes = sizes or ((400, 1_200) if smoke else (100_000, 1_000_000))
    training = training or (200 if smoke else 50_000)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="memaudit-uncond-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in sizes:
            rows.append(run_one(root, n, training))
            r = rows[-1]
            print(f"  {n:,} generations: import {r['import_s']:.0f} s ({r['import_peak_mb']:.0f} MB), "
                  f"audit {r['audit_s']:.0f} s ({r['audit_peak_mb']:.0f} MB), {r['extracted']} of {r['copies']} copies",
                  flush=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    base = rows[0]
    for r in rows:
        for step in ("import", "audit"):
            r[f"{step}_time_ratio"] = r[f"{step}_s_per_100k"] / base[f"{step}_s_per_100k"]
            r[f"{step}_memory_ratio"] = r[f"{step}_peak_mb"] / base[f"{step}_peak_mb"]
        assert r["extracted"] == r["copies"], f"the audit found {r['extracted']} of {r['copies']} planted copies"
    print_table(rows, ["generations", "training", "import_s", "import_s_per_100k", "import_peak_mb", "import_time_ratio",
                       "audit_s", "audit_s_per_100k", "audit_peak_mb", "audit_time_ratio", "audit_memory_ratio",
                       "copies", "extracted", "uncertified_nearest", "db_mb", "cache_mb"],
                title=f"unconditional audit, 32 x 32, {training:,} training images (ratios against {sizes[0]:,} generations)")
    print(f"the training workspace: images synthesised in {rows[0]['training_synthesise_s']:.0f} s, add-training "
          f"{rows[0]['add_training_s']:.0f} s at a peak of {rows[0]['add_training_mb']:.0f} MB (once, then copied)")
    payload = {"rows": rows, "size": SIZE}
    write_json("unconditional", smoke, payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--generations", help="comma-separated numbers of generations")
    parser.add_argument("--training", type=int, help="training images (default 50,000)")
    parser.add_argument("--keep", help="build in DIR and keep it (sources are reused between runs)")
    args = parser.parse_args()
    main(args.smoke, tuple(int(s) for s in args.generations.split(",")) if args.generations else None, args.training, args.keep)
