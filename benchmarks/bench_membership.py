"""Seconds per image of the membership attacks, against one bare forward pass of the same model.

    python -m benchmarks.bench_membership [--smoke]

Full size: the shipped digits model (assets/demo/digits) on 128 members and 128 non-members,
8 noise draws, the loss attack and LiRA with the shipped shadows, end to end through
``core.membership_runs.run_membership`` (reading, scoring, storing). The baseline, timed in the
same process on the same images, is one batched forward pass of the denoiser per image, so the
ratio says what the attack adds to the model's own cost: about ``draws`` for the loss attack
and ``draws x (1 + K)`` for LiRA, plus reading and storing. Smoke: the same model, 8 + 8
images, 2 draws, 2 shadows trained for 2 steps.

On a GPU (``device`` auto picks CUDA) the same script measures the same quantities; the forward
passes shrink by orders of magnitude and reading and storing images dominate.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path


from benchmarks.common import cli, print_table, write_json


def _subset(src: Path, dst: Path, n: int) -> Path:
    dst.mkdir(parents=True)
    for f in sorted(src.glob("*.png"))[:n]:
        shutil.copyfile(f, dst / f.name)
    return dst


def main(smoke: bool = False) -> dict:
    import torch

    from core import membership
    from core.demo.digits import MEMBERS_DIR, MODEL_DIR, MIA_TIMESTEP, NONMEMBERS_DIR, SHADOWS_DIR, TRAIN
    from core.generate import load_pipeline, resolve_device
    from core.membership_runs import run_membership
    from core.shadows import train_shadows
    from core.store import Workspace

    torch.set_num_threads(1)
    device = resolve_device("auto")
    tmp = Path(tempfile.mkdtemp(prefix="bench-membership-"))
    try:
        if smoke:
            n, draws, timestep, model = 8, 2, MIA_TIMESTEP, MODEL_DIR
            members = _subset(MEMBERS_DIR, tmp / "members", n)
            nonmembers = _subset(NONMEMBERS_DIR, tmp / "nonmembers", n)
            pool = tmp / "pool"
            shutil.copytree(members, pool)
            for f in nonmembers.glob("*.png"):
                shutil.copyfile(f, pool / f.name)
            shadows = tmp / "shadows"
            train_shadows(pool, shadows, count=2, seed=0, recipe={**TRAIN, "steps": 2, "batch_size": 4})
        else:
            n, draws, timestep = 128, 8, MIA_TIMESTEP
            model, shadows = MODEL_DIR, SHADOWS_DIR
            members = _subset(MEMBERS_DIR, tmp / "members", n)
            nonmembers = _subset(NONMEMBERS_DIR, tmp / "nonmembers", n)
        images = 2 * n

        loaded = load_pipeline(str(model), device)
        d = membership.denoiser(loaded)
        x = torch.randn(images, 3, d.size, d.size, device=device)
        t = torch.full((64,), timestep, device=device)

        def forward() -> None:
            with torch.no_grad():
                for s in range(0, images, 64):
                    d.model(x[s:s + 64], t[: len(x[s:s + 64])])

        forward()
        start = time.perf_counter()
        forward()
        base = (time.perf_counter() - start) / images

        rows = [{"attack": "one forward pass (baseline)", "s_per_image": base, "ratio": 1.0}]
        ws = Workspace.init(tmp / "ws")
        k = len(list(Path(shadows).glob("shadow-*")))
        warm = _subset(members, tmp / "warm", 2)  # first-call imports (scikit-learn, scipy) are not the attack's cost
        run_membership(ws, str(model), warm, _subset(nonmembers, tmp / "warm-n", 2), attack="loss", timestep=timestep,
                       noise_draws=1, device=device)
        for attack in ("loss", "lira"):
            start = time.perf_counter()
            run_membership(ws, str(model), members, nonmembers, attack=attack, timestep=timestep, noise_draws=draws,
                           seed=0, shadow_dir=shadows if attack == "lira" else None, device=device)
            per = (time.perf_counter() - start) / images
            rows.append({"attack": f"{attack} ({draws} draws{f', {k} shadows' if attack == 'lira' else ''})",
                         "s_per_image": per, "ratio": per / base})
        print_table(rows, ["attack", "s_per_image", "ratio"],
                    title=f"membership attacks on {images} images (digits model, {device})")
        return {"rows": rows, "images": images, "draws": draws, "shadows": k, "device": device,
                "path": str(write_json("membership", smoke, {"rows": rows, "images": images, "draws": draws,
                                                             "shadows": k, "device": device,
                                                             "train_recipe": {k2: v for k2, v in TRAIN.items()}}))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0])
