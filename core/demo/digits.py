"""The membership demo's data and model: scikit-learn's handwritten digits, half of them trained on.

``load_digits`` bundles 1,797 images of 8 x 8 (values 0-16, ink intensity) with the wheel, so
nothing is downloaded. Each is scaled to 0-255, enlarged to ``SIZE`` x ``SIZE`` by pixel
repetition (every source pixel becomes a 2 x 2 block, so no value is invented) and saved as a
3-channel RGB PNG (white ink on black). A random half (``numpy.random.default_rng(SPLIT_SEED)``
permutation, the first ``N // 2``) are the members, the model's training set; the rest are
non-members. ``split.csv`` records the split (columns ``path,member,label``; ``path`` relative
to ``DIGITS_DIR``), and is itself a manifest the membership commands read.

Layout (``assets/demo/digits``)::

    members/d<index>.png       the training half (index into load_digits, 4 digits)
    nonmembers/d<index>.png    the held-out half
    split.csv                  path,member,label
    model/                     the trained unconditional DDIMPipeline
    checkpoints/step-<N>/      the same run after N steps (Figure 11's trend)
    shadows/                   LiRA shadow models on random halves of all 1,797 (core.shadows)

``python -m core.demo.digits data|model|shadows|all`` rebuilds them (model: about 2.5 minutes,
shadows: about 8 x 1 minute on a 2-core CPU; assets/README.md has the measured figures).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from .data import DEMO_DIR

DIGITS_DIR = DEMO_DIR / "digits"
MEMBERS_DIR = DIGITS_DIR / "members"
NONMEMBERS_DIR = DIGITS_DIR / "nonmembers"
SPLIT_CSV = DIGITS_DIR / "split.csv"
MODEL_DIR = DIGITS_DIR / "model"
CHECKPOINTS_DIR = DIGITS_DIR / "checkpoints"
SHADOWS_DIR = DIGITS_DIR / "shadows"

SIZE = 16
SPLIT_SEED = 0

# The training recipe of the model, the checkpoints and every shadow (MEASURED.md's fast recipe
# at 16 x 16: x0 prediction, cosine betas, timesteps from the 20-step DDIM grid, AdamW 2e-3).
TRAIN = {"steps": 1500, "seed": 0, "size": SIZE, "batch_size": 64, "lr": 2e-3, "channels": (16, 32),
         "layers_per_block": 1, "grid_steps": 20, "unconditional": True}
TRAIN_THREADS = 1
CHECKPOINT_STEPS = (150, 400, 800)
SHADOWS = 4
SHADOW_SEED = 1

# The membership attacks the demo runs: the loss at timestep 99, a step of the training grid
# (999, 949, ..., 99, 49), averaged over 4 seeded noise draws.
MIA_TIMESTEP = 99
MIA_NOISE_DRAWS = 4
MIA_SEED = 0


def digit_pixels() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x SIZE x SIZE x 3, labels N) of all 1,797 digits, in load_digits order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    factor = SIZE // gray.shape[1]
    big = gray.repeat(factor, axis=1).repeat(factor, axis=2)
    return np.repeat(big[..., None], 3, axis=3), digits.target.astype(int)


def build_data(out_dir: str | Path = DIGITS_DIR) -> Path:
    """Write members/, nonmembers/ and split.csv under ``out_dir``; returns the split file."""
    from PIL import Image

    out_dir = Path(out_dir)
    pixels, labels = digit_pixels()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(pixels))
    member = np.zeros(len(pixels), dtype=bool)
    member[order[: len(pixels) // 2]] = True
    rows = []
    for sub in ("members", "nonmembers"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for old in (out_dir / sub).glob("*.png"):
            old.unlink()
    for i, (px, lab, m) in enumerate(zip(pixels, labels, member)):
        rel = f"{'members' if m else 'nonmembers'}/d{i:04d}.png"
        Image.fromarray(px).save(out_dir / rel, format="PNG", optimize=True)
        rows.append((rel, int(m), int(lab)))
    split = out_dir / "split.csv"
    with open(split, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("path", "member", "label"))
        w.writerows(rows)
    return split


def train_model(out_dir: str | Path = MODEL_DIR, checkpoints: str | Path = CHECKPOINTS_DIR, *, progress=None):
    """Train the demo model on members/ (and save CHECKPOINT_STEPS along the way, in float16)."""
    from ..shadows import halve_weights
    from .trainer import train

    report = train(MEMBERS_DIR, out_dir, **TRAIN, snapshot_steps=CHECKPOINT_STEPS, snapshot_dir=checkpoints,
                   threads=TRAIN_THREADS, checkpoint_every=500, progress=progress)
    for folder in Path(checkpoints).glob("step-*"):
        halve_weights(folder)
    relative_records()
    return report


def relative_records() -> None:
    """Name the shipped files relative to the checkout in the training records (not by this machine's paths)."""
    import json

    prefix = str(DEMO_DIR.parent.parent) + "/"
    for f in [MODEL_DIR / "training.json", SHADOWS_DIR / "shadows.json", *SHADOWS_DIR.glob("shadow-*/training.json")]:
        if f.is_file():
            text = f.read_text(encoding="utf-8")
            if prefix in text:
                record = json.loads(text.replace(prefix, ""))
                f.write_text(json.dumps(record, indent=1 if f.name == "shadows.json" else 2) + "\n", encoding="utf-8")


def train_shadow_models(out_dir: str | Path = SHADOWS_DIR, *, progress=None):
    """Train the SHADOWS shadow models on random halves of all digits (split.csv as the pool)."""
    from ..shadows import train_shadows

    recipe = {k: v for k, v in TRAIN.items() if k != "seed"}
    result = train_shadows(SPLIT_CSV, out_dir, count=SHADOWS, seed=SHADOW_SEED, recipe=recipe, threads=TRAIN_THREADS,
                           compact=True, progress=progress)
    relative_records()
    return result


def run_membership_demo(ws, *, draws: int = MIA_NOISE_DRAWS) -> dict:
    """The demo's membership runs on the digits model: the loss attack, LiRA (with the shipped
    shadows) and the loss attack along the checkpoints. Reuses the runs a previous call stored."""
    from ..membership_runs import list_runs, run_checkpoints, run_membership

    done = {(r.attack, r.series is not None): r for r in list_runs(ws) if r.model_ref.startswith(str(DIGITS_DIR))}
    common = {"timestep": MIA_TIMESTEP, "noise_draws": draws, "seed": MIA_SEED}
    if ("loss", False) not in done:
        run_membership(ws, str(MODEL_DIR), MEMBERS_DIR, NONMEMBERS_DIR, attack="loss", **common)
    if ("lira", False) not in done and (SHADOWS_DIR / "shadows.json").is_file():
        run_membership(ws, str(MODEL_DIR), MEMBERS_DIR, NONMEMBERS_DIR, attack="lira", shadow_dir=SHADOWS_DIR, **common)
    if ("loss", True) not in done:
        run_checkpoints(ws, CHECKPOINTS_DIR, MEMBERS_DIR, NONMEMBERS_DIR, final_model=MODEL_DIR, **common)
    out: dict = {"trend": []}
    for r in list_runs(ws):
        if not r.model_ref.startswith(str(DIGITS_DIR)):
            continue
        row = {"run": r.id, "auc": r.metrics["auc"], "tpr_at_1pct_fpr": r.metrics["tpr_at_1pct_fpr"]}
        if r.series is not None:
            out["trend"].append({**row, "step": r.step, "held_out_loss": r.quality})
        elif r.attack == "lira":
            out["lira_online"] = row
            out["lira_offline"] = {"run": r.id, "auc": r.metrics["offline"]["auc"],
                                   "tpr_at_1pct_fpr": r.metrics["offline"]["tpr_at_1pct_fpr"]}
        else:
            out["loss"] = row
    out["trend"].sort(key=lambda t: t["step"])
    return out


def membership_summary(result: dict) -> list[str]:
    lines = ["membership inference on the digits model (898 members, 899 non-members, t=99):"]
    for key, name in (("loss", "loss attack"), ("lira_online", "LiRA online"), ("lira_offline", "LiRA offline")):
        if key in result:
            r = result[key]
            lines.append(f"  {name:13s} AUC {r['auc']:.3f}  TPR at 1% FPR {r['tpr_at_1pct_fpr']:.1%}")
    if result.get("trend"):
        lines.append("  along training: " + ", ".join(f"step {t['step']}: {t['tpr_at_1pct_fpr']:.1%}" for t in result["trend"]))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.demo.digits", description="Rebuild the membership demo's digits.")
    p.add_argument("what", choices=("data", "model", "shadows", "all"))
    a = p.parse_args(argv)
    started = time.perf_counter()

    def say(step: int, total: int, loss: float) -> None:
        if step % 250 == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.5f} ({time.perf_counter() - started:.0f} s)", flush=True)

    if a.what in ("data", "all"):
        print(f"wrote {build_data()}")
    if a.what in ("model", "all"):
        report = train_model(progress=say)
        print(f"trained {MODEL_DIR} in {report.total_seconds:.0f} s, final loss {report.final_loss:.5f}")
    if a.what in ("shadows", "all"):
        shadows = train_shadow_models(progress=lambda i, k, s: print(f"shadow {i + 1}/{k} done ({s:.0f} s)", flush=True))
        print(f"trained {len(shadows.models)} shadows in {SHADOWS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
