"""Membership runs in the workspace: check the input, score it (``core.membership``), store, read back.

``run_membership`` is the readable loop: read the member and non-member sets, refuse bad
input before anything is written (sets that overlap, by path or by content; images whose
size is not the model's or whose mode is not RGB or grayscale; an unknown prediction type;
captions a conditional model lacks; shadows that do not hold the images), compute the target
model's losses (and for LiRA every shadow's), then copy the images into
``WS/membership/<sha[:2]>/<sha>.<ext>`` and store the run and its per-image scores in one
transaction.

Duplicate counts (Figure 20): an image's ``duplicates`` is the number of members within the
workspace's ``duplicate_threshold`` (normalised L2 on [0, 1] pixels at the set's size) of it,
itself included; exact over all member pairs.

Trend (Figure 11): ``run_checkpoints`` scores every ``step-<N>`` folder of a checkpoints
folder (and the final model) with the loss attack, each run tagged with one ``series`` and its
step, with the held-out denoising loss of the non-members as the quality measure (lower is
better; ``core.membership.held_out_loss``), or FID against the members when a local Inception
checkpoint is given (``core.quality``).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import InputError
from .imagesets import ImageSet, file_digests, read_image_set
from .store import Workspace, now

ALLOWED_MODES = ("RGB", "L")
FOLDER = "membership"


@dataclass(frozen=True)
class RunInfo:
    id: int
    created_at: str
    attack: str
    model_ref: str
    model_hash: str
    timestep: int
    noise_draws: int
    seed: int
    series: str | None
    step: int | None
    quality: float | None
    quality_measure: str | None
    params: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def label(self) -> str:
        m = self.metrics
        where = f" · step {self.step}" if self.step is not None else ""
        return (f"run {self.id} · {self.attack} t={self.timestep}{where} · AUC {m['auc']:.3f} · "
                f"TPR@1%FPR {m['tpr_at_1pct_fpr']:.1%}")


# ---------------------------------------------------------------------------- input
def _pixels(images: ImageSet, size: int, what: str) -> np.ndarray:
    from PIL import Image

    from .images import load_image

    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, f in enumerate(images.files):
        img = load_image(f)  # one clear error for a missing, corrupt or oversized file
        with Image.open(f) as raw:
            mode, (w, h) = raw.mode, raw.size
        if mode not in ALLOWED_MODES:
            raise InputError(f"{what} image {f} is in mode {mode}; give RGB or grayscale images as the model was "
                             "trained on (converting alpha, palette or 16-bit pixels would change the loss)")
        if (w, h) != (size, size):
            raise InputError(f"{what} image {f} is {w} x {h}; this model takes {size} x {size} images, and a resized "
                             "image is not the training image: give them at the training size")
        out[i] = np.asarray(img, dtype=np.float32) / 255.0
    return out


def _check_disjoint(members: ImageSet, nonmembers: ImageSet, m_sha: list[str], n_sha: list[str]) -> None:
    both = {f.resolve() for f in members.files} & {f.resolve() for f in nonmembers.files}
    if both:
        raise InputError(f"{len(both)} images are both members and non-members (for example {sorted(both)[0]}); "
                         "the two sets must not overlap")
    same = set(m_sha) & set(n_sha)
    if same:
        first = nonmembers.files[n_sha.index(sorted(same)[0])]
        raise InputError(f"{len(same)} non-member images have the same bytes as a member (for example {first}); "
                         "the two sets must not overlap")


def _duplicates(pixels: np.ndarray, threshold: float) -> np.ndarray:
    from .distances import pairwise_l2

    if len(pixels) == 0:
        return np.zeros(0, dtype=int)
    counts = np.zeros(len(pixels), dtype=int)
    block = 2048
    for start in range(0, len(pixels), block):
        d = pairwise_l2(pixels[start:start + block], pixels).numpy()
        counts[start:start + block] = (d <= threshold).sum(1)
    return counts


# ---------------------------------------------------------------------------- scoring
def _progress_total(report: Callable[[int, int], None] | None, total: int):
    state = {"base": 0}

    def inner(done: int, _n: int) -> None:
        if report is not None:
            report(state["base"] + done, total)

    def advance(n: int) -> None:
        state["base"] += n

    return inner, advance


def run_membership(ws: Workspace, model: str, members: str | Path, nonmembers: str | Path, *,
                   attack: str | None = None, timestep: int | None = None, noise_draws: int | None = None,
                   seed: int | None = None, shadow_dir: str | Path | None = None, quality: bool = False,
                   series: str | None = None, step: int | None = None, device: str = "cpu",
                   fid: tuple[Any, int, int] | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> int | None:
    """Score the member and non-member sets against ``model`` and store a membership run.

    Unset parameters come from the workspace settings. ``quality`` also measures the held-out
    denoising loss of the non-members; ``fid`` (an Inception model from ``core.quality``, the
    sample count, the sampling steps) measures FID against the members instead. Returns the run
    id, or None when ``should_stop`` ended the run early (nothing is stored then).
    """
    from . import config
    from .generate import load_pipeline
    from .membership import denoiser, held_out_loss, lira, losses, roc_metrics

    s = ws.settings()

    def setting(name: str, value: Any) -> Any:
        try:
            return config.check(name, s[name] if value is None else value)
        except ValueError as e:
            raise InputError(str(e)) from None

    attack = setting("mia_attack", attack)
    timestep = setting("mia_timestep", timestep)
    noise_draws = setting("mia_noise_draws", noise_draws)
    seed = setting("mia_seed", seed)
    batch = int(s["mia_batch_size"])
    if attack == "lira" and shadow_dir is None:
        raise InputError("the LiRA attack needs --shadow-dir, a folder of shadow models from `memaudit train-shadows`")

    mset = read_image_set(members, what="member set")
    nset = read_image_set(nonmembers, what="non-member set")
    m_sha, n_sha = file_digests(mset.files), file_digests(nset.files)
    _check_disjoint(mset, nset, m_sha, n_sha)
    shadows = None
    if attack == "lira":
        from .shadows import load_shadows

        shadows = load_shadows(shadow_dir)  # type: ignore[arg-type]
        where = {sha: j for j, sha in enumerate(shadows.sha256)}
        missing = [f for f, sha in zip(mset.files + nset.files, m_sha + n_sha) if sha not in where]
        if missing:
            raise InputError(f"{len(missing)} images are not in the shadow models' pool (for example {missing[0]}); "
                             "LiRA needs shadows trained on halves of a pool that holds every image scored")
        columns = np.array([where[sha] for sha in m_sha + n_sha])

    loaded = load_pipeline(model, device)
    d = denoiser(loaded)
    if not 0 <= timestep < d.timesteps:
        raise InputError(f"timestep {timestep} is outside the model's schedule 0..{d.timesteps - 1}")
    pixels = np.concatenate([_pixels(mset, d.size, "member"), _pixels(nset, d.size, "non-member")])
    conditions = list(mset.conditions) + list(nset.conditions)
    member = np.array([True] * len(mset) + [False] * len(nset))

    n = len(pixels)
    models = 1 + (shadows.count if shadows is not None else 0)
    report, advance = _progress_total(progress, n * models)
    target = losses(d, loaded, pixels, conditions, timestep=timestep, draws=noise_draws, seed=seed,
                    batch_size=batch, progress=report, should_stop=should_stop)
    if target is None:
        return None
    advance(n)
    params: dict[str, Any] = {"attack": attack, "timestep": timestep, "noise_draws": noise_draws, "seed": seed,
                              "members": str(mset.source), "nonmembers": str(nset.source),
                              "prediction_type": d.prediction_type, "conditioning": d.kind,
                              "latent": d.vae is not None, "model_class": loaded.pipeline_class}
    offline = None
    extra_metrics: dict[str, Any] = {}
    if shadows is not None:
        shadow_losses = np.empty((shadows.count, n))
        for k, folder in enumerate(shadows.models):
            sl = load_pipeline(str(folder), device)
            got = losses(denoiser(sl), sl, pixels, conditions, timestep=timestep, draws=noise_draws, seed=seed,
                         batch_size=batch, progress=report, should_stop=should_stop)
            if got is None:
                return None
            shadow_losses[k] = got
            advance(n)
        result = lira(target, shadow_losses, shadows.inside[:, columns])
        score, offline = result.online, result.offline
        extra_metrics["offline"] = roc_metrics(offline, member).to_dict()
        params.update({"shadow_dir": str(Path(shadow_dir).resolve()), "shadows": shadows.count,  # type: ignore[arg-type]
                       "shadow_sd_in": result.sd_in, "shadow_sd_out": result.sd_out})
    else:
        score = -target
    metrics = {**roc_metrics(score, member).to_dict(), **extra_metrics}
    q, measure = None, None
    if fid is not None:
        from .quality import fid as fid_of

        q, measure = fid_of(loaded, pixels[member], fid[0], samples=fid[1], seed=seed, steps=fid[2]), "fid"
    elif quality:
        q = held_out_loss(d, loaded, pixels[~member], [c for c, m in zip(conditions, member) if not m],
                          seed=seed, batch_size=batch)
        measure = "held_out_loss"
    dups = np.ones(n, dtype=int)
    dups[: len(mset)] = _duplicates(pixels[: len(mset)], float(s["duplicate_threshold"]))
    return _store(ws, loaded, mset, nset, m_sha + n_sha, member, conditions, target, score, offline, dups,
                  params, metrics, series, step, q, measure)


def _copy_in(ws: Workspace, src: Path, sha: str) -> str:
    from .tempfiles import atomic_path

    rel = f"{FOLDER}/{sha[:2]}/{sha}{src.suffix.lower()}"
    dst = ws.root / rel
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst, src.suffix.lower()) as tmp:
            shutil.copyfile(src, tmp)
    return rel


def _store(ws: Workspace, loaded: Any, mset: ImageSet, nset: ImageSet, digests: list[str], member: np.ndarray,
           conditions: list[str | None], target: np.ndarray, score: np.ndarray, offline: np.ndarray | None,
           dups: np.ndarray, params: dict[str, Any], metrics: dict[str, Any], series: str | None, step: int | None,
           quality: float | None, measure: str | None) -> int:
    files = mset.files + nset.files
    copies = [_copy_in(ws, f, sha) for f, sha in zip(files, digests)]
    with ws.transaction() as con:
        cur = con.execute(
            "INSERT INTO membership_runs(created_at, attack, model_ref, model_hash, timestep, noise_draws, seed, series, "
            "step, quality, quality_measure, params, metrics) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (now(), params["attack"], loaded.ref, loaded.weights_hash, params["timestep"], params["noise_draws"],
             params["seed"], series, step, quality, measure,
             json.dumps(params), json.dumps(metrics)))
        run_id = int(cur.lastrowid)
        con.executemany(
            "INSERT INTO membership_scores(run_id, idx, path, image, member, condition, loss, score, score_offline, "
            "duplicates) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(run_id, i, str(f.resolve()), c, int(m), cond, float(t), float(sc), None if offline is None else float(offline[i]),
              int(dp)) for i, (f, c, m, cond, t, sc, dp) in enumerate(zip(files, copies, member, conditions, target, score, dups))])
    return run_id


def checkpoint_folders(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-<N>`` subfolder, by step; InputError when there is none."""
    folder = Path(folder)
    found = sorted((int(m.group(1)), p) for p in folder.glob("step-*") if p.is_dir() and (m := re.fullmatch(r"step-(\d+)", p.name)))
    if not found:
        raise InputError(f"{folder} holds no step-<N> checkpoint folders")
    return found


def run_checkpoints(ws: Workspace, checkpoints: str | Path, members: str | Path, nonmembers: str | Path, *,
                    final_model: str | Path | None = None, timestep: int | None = None, noise_draws: int | None = None,
                    seed: int | None = None, device: str = "cpu", inception: str | Path | None = None,
                    fid_samples: int = 256, fid_steps: int = 20,
                    progress: Callable[[int, int], None] | None = None) -> list[int]:
    """A loss-attack run for each checkpoint (and the final model, at its training steps), one series.

    Quality: FID with ``inception`` (a local checkpoint, ``core.quality``), else the held-out loss.
    """
    found = checkpoint_folders(checkpoints)
    fid = None
    if inception is not None:
        from .quality import load_inception

        fid = (load_inception(inception), int(fid_samples), int(fid_steps))
    if final_model is not None:
        log = Path(final_model) / "training.json"
        steps = json.loads(log.read_text(encoding="utf-8"))["config"]["steps"] if log.is_file() else found[-1][0] + 1
        found.append((int(steps), Path(final_model)))
    series = str(Path(checkpoints).resolve())
    runs = []
    for i, (step, folder) in enumerate(found):
        run = run_membership(ws, str(folder), members, nonmembers, attack="loss", timestep=timestep,
                             noise_draws=noise_draws, seed=seed, quality=True, series=series, step=step, device=device,
                             fid=fid)
        runs.append(int(run))  # type: ignore[arg-type]
        if progress is not None:
            progress(i + 1, len(found))
    return runs


# ---------------------------------------------------------------------------- reading
def _info(r: Any) -> RunInfo:
    return RunInfo(r["id"], r["created_at"], r["attack"], r["model_ref"], r["model_hash"], r["timestep"], r["noise_draws"],
                   r["seed"], r["series"], r["step"], r["quality"], r["quality_measure"], json.loads(r["params"]),
                   json.loads(r["metrics"]))


def list_runs(ws: Workspace) -> list[RunInfo]:
    with ws.connect() as con:
        return [_info(r) for r in con.execute("SELECT * FROM membership_runs ORDER BY id")]


def get_run(ws: Workspace, run_id: int | None = None) -> RunInfo:
    """One run (default: the latest); InputError when there is none."""
    runs = list_runs(ws)
    if not runs:
        raise InputError(f"{ws.root} has no membership run yet; run `memaudit mia {ws.root} --model M --members A --nonmembers B`")
    if run_id is None:
        return runs[-1]
    for r in runs:
        if r.id == run_id:
            return r
    raise InputError(f"no membership run {run_id} in {ws.root}; `memaudit mia-runs {ws.root}` lists them")


def scores(ws: Workspace, run_id: int) -> list[dict[str, Any]]:
    with ws.connect() as con:
        return [dict(r) for r in con.execute("SELECT * FROM membership_scores WHERE run_id = ? ORDER BY idx", (run_id,))]


@dataclass(frozen=True)
class RunView:
    """Everything the Membership page shows of one run."""
    run: RunInfo
    roc: dict[str, dict[str, list[float]]]  # curve name -> {"fpr": [...], "tpr": [...]}
    table: list[dict[str, Any]]  # one row per curve: AUC, TPR at 1% and 0.1% FPR, balanced accuracy
    member_scores: list[float]
    nonmember_scores: list[float]
    hardest: list[dict[str, Any]]  # members least like members (lowest score)
    easiest: list[dict[str, Any]]  # members most like members
    trend: list[dict[str, Any]]  # the run's series: step, quality, TPR at 1% FPR, AUC
    notes: list[str]


def run_view(ws: Workspace, run_id: int | None = None, gallery: int = 8) -> RunView:
    from .membership import roc_metrics

    run = get_run(ws, run_id)
    rows = scores(ws, run.id)
    member = np.array([bool(r["member"]) for r in rows])
    curves = {"online" if run.attack == "lira" else "loss": np.array([r["score"] for r in rows])}
    if run.attack == "lira":
        curves["offline"] = np.array([r["score_offline"] for r in rows])
    roc, table, notes = {}, [], []
    for name, sc in curves.items():
        m = roc_metrics(sc, member)
        roc[name] = {"fpr": m.fpr.tolist(), "tpr": m.tpr.tolist()}
        table.append({"attack": f"{run.attack} ({name})" if run.attack == "lira" else run.attack, "AUC": m.auc,
                      "TPR at 1% FPR": m.tpr_at[0.01], "TPR at 0.1% FPR": m.tpr_at[0.001],
                      "balanced accuracy": m.balanced_accuracy})
        notes = m.notes
    main = curves["online" if run.attack == "lira" else "loss"]
    members = sorted((r for r in rows if r["member"]), key=lambda r: (r["score"], r["idx"]))
    keep = ("idx", "path", "image", "loss", "score", "duplicates", "condition")
    trend = []
    if run.series is not None:
        trend = [{"run": r.id, "step": r.step, "quality": r.quality, "quality_measure": r.quality_measure,
                  "tpr_at_1pct_fpr": r.metrics["tpr_at_1pct_fpr"], "auc": r.metrics["auc"]}
                 for r in list_runs(ws) if r.series == run.series and r.attack == run.attack]
        trend.sort(key=lambda t: (t["step"] is None, t["step"]))
    return RunView(run, roc, table, main[member].tolist(), main[~member].tolist(),
                   [{k: r[k] for k in keep} for r in members[:gallery]],
                   [{k: r[k] for k in keep} for r in members[::-1][:gallery]], trend, notes)


def export_runs(ws: Workspace) -> list[dict[str, Any]]:
    """Every membership run with its per-image scores (the export's ``membership_runs``)."""
    out = []
    for r in list_runs(ws):
        out.append({"id": r.id, "created_at": r.created_at, "attack": r.attack, "timestep": r.timestep,
                    "noise_draws": r.noise_draws, "seed": r.seed, "model": r.model_ref, "model_hash": r.model_hash,
                    "auc": r.metrics["auc"], "tpr_at_1pct_fpr": r.metrics["tpr_at_1pct_fpr"],
                    "tpr_at_0_1pct_fpr": r.metrics["tpr_at_0_1pct_fpr"],
                    "balanced_accuracy": r.metrics["balanced_accuracy"], "members": r.metrics["members"],
                    "nonmembers": r.metrics["nonmembers"], "series": r.series, "step": r.step, "quality": r.quality,
                    "quality_measure": r.quality_measure, "parameters": r.params, "metrics": r.metrics,
                    "scores": [{"path": s["path"], "member": bool(s["member"]), "score": s["score"],
                                "score_offline": s["score_offline"], "loss": s["loss"], "duplicates": s["duplicates"]}
                               for s in scores(ws, r.id)]})
    return out

