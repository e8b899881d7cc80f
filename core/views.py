"""Read-only queries and image preparation for the dashboard and the HTML report.

Everything here reads the workspace and returns plain data; nothing writes. The audit's own
readers (core.audit: candidates, recount, prompt_groups, ...) are used where they fit; the
queries below cover what a page needs beyond them (overview counts, labelled scores for
calibration, Figure 5 bins, duplicate groups).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

from .records import TrainingImage
from .store import Workspace

# ---------------------------------------------------------------------------- overview


@dataclass(frozen=True)
class Overview:
    models: int
    prompts: int
    generations: int
    training_images: int
    runs: int
    run_id: int | None
    audited_prompts: int = 0
    flagged_prompts: int = 0
    extracted_prompts: int = 0       # prompts with at least one extracted candidate
    candidates: int = 0
    extracted_candidates: int = 0
    extracted_training_images: int = 0
    labelled_candidates: int = 0     # candidates of the run with at least one current label
    label_events: int = 0
    reviewers: tuple[str, ...] = ()
    kappa: dict[tuple[str, str], tuple[float | None, int]] = field(default_factory=dict)
    clique_bounds: int = 0           # prompts whose largest clique is a lower bound (clique search budget)
    uncertified_nearest: int = 0     # flagged candidates whose nearest training image is not certified
    uncertain_verdicts: int = 0      # of those, counted not extracted though the true nearest could be within delta

    @property
    def unlabelled_candidates(self) -> int:
        return self.candidates - self.labelled_candidates


def overview(ws: Workspace, run_id: int | None = None) -> Overview:
    """Workspace counts, and for ``run_id`` (default: the latest run) its results and review progress."""
    from . import audit, labels

    counts = ws.counts()
    run_id = run_id if run_id is not None else audit.latest_run(ws)
    base = dict(models=counts["models"], prompts=counts["prompts"], generations=counts["generations"],
                training_images=counts["training_images"], runs=counts["audit_runs"], run_id=run_id,
                label_events=counts["label_events"])
    if run_id is None:
        return Overview(**base)
    summary = audit.count_summary(ws, run_id)
    current = labels.current_labels(ws)
    with ws.connect() as con:
        pairs = con.execute("SELECT medoid_generation_id, nearest_training_id FROM candidates WHERE run_id = ?",
                            (run_id,)).fetchall()
        extracted_prompts = con.execute("SELECT COUNT(DISTINCT prompt_id) FROM candidates WHERE run_id = ? AND extracted = 1",
                                        (run_id,)).fetchone()[0]
    labelled = sum(1 for g, t in pairs if current.get((g, t)))
    agree = labels.agreement(ws)
    return Overview(**base, audited_prompts=summary["prompts"], flagged_prompts=summary["flagged_prompts"],
                    extracted_prompts=extracted_prompts, candidates=summary["candidates"], extracted_candidates=summary["extracted_candidates"],
                    extracted_training_images=summary["extracted_training_images"], labelled_candidates=labelled,
                    reviewers=agree.reviewers, kappa=dict(agree.pairs), clique_bounds=summary["clique_bounds"],
                    uncertified_nearest=summary["uncertified_nearest"], uncertain_verdicts=summary["uncertain_verdicts"])


def model_refs(ws: Workspace) -> list[str]:
    """Models used in this workspace, most recent first (for the Generate page's choice)."""
    with ws.connect() as con:
        return [r[0] for r in con.execute("SELECT ref FROM models WHERE kind != 'imported' GROUP BY ref ORDER BY MAX(id) DESC")]


# ---------------------------------------------------------------------------- Figure 5

# Duplicate-count bins (inclusive bounds; None = no upper bound), powers of two as in the paper's log axis.
DUPLICATE_BINS: tuple[tuple[int, int | None], ...] = (
    (1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 127), (128, 255), (256, None))


@dataclass(frozen=True)
class DuplicateRates:
    basis: str                              # what a row counts, in words
    bins: list[tuple[str, int, int]]        # (label, prompts in the bin, extracted among them)


def _bin_label(lo: int, hi: int | None) -> str:
    return f"{lo}" if hi == lo else (f"{lo}-{hi}" if hi is not None else f">={lo}")


def bin_by_duplicates(rows: list[dict]) -> list[tuple[str, int, int]]:
    """Group rows {k, prompts, extracted} into DUPLICATE_BINS; bins without a prompt are left out."""
    out = []
    for lo, hi in DUPLICATE_BINS:
        inside = [r for r in rows if int(r["k"]) >= lo and (hi is None or int(r["k"]) <= hi)]
        n = sum(int(r["prompts"]) for r in inside)
        if n:
            out.append((_bin_label(lo, hi), n, sum(int(r["extracted"] or 0) for r in inside)))
    return out


def extraction_by_duplicates(ws: Workspace, run_id: int) -> DuplicateRates:
    """Figure 5: extracted prompts / prompts by the training duplicate count k.

    Where prompts are training captions (the paper's setting), k is the duplicate count of the
    captioned image; otherwise a prompt is attributed to the training image nearest to its
    largest clique's medoid. The duplicate counts are brought up to date first (a changed
    ``duplicate_threshold`` recounts them: ``core.duplicates.ensure``).
    """
    from . import audit, duplicates

    duplicates.ensure(ws)
    rows = audit.caption_duplicate_table(ws, run_id)
    if rows:
        return DuplicateRates("prompts that are training captions, by the duplicate count of the captioned image",
                              bin_by_duplicates(rows))
    rows = audit.duplicate_extraction_table(ws, run_id)
    return DuplicateRates("prompts, by the duplicate count of the training image nearest to their largest clique",
                          bin_by_duplicates(rows))


def largest_clique_sizes(ws: Workspace, run_id: int) -> list[int]:
    """The largest clique size of every text prompt of the run, at the run's own tau."""
    with ws.connect() as con:
        return [r[0] for r in con.execute(
            "SELECT r.largest_clique FROM prompt_results r JOIN prompts p ON p.id = r.prompt_id "
            "WHERE r.run_id = ? AND p.text != '' ORDER BY r.prompt_id", (run_id,))]


# ---------------------------------------------------------------------------- scores and labels

SCORE_METRICS = ("l2", "tiled_l2", "relative_l2", "similarity", "clique_size", "mean_distance")


@dataclass(frozen=True)
class CandidateScores:
    """Per candidate of a run (most suspicious first): its metrics, verdicts and human ground truth."""
    candidate_ids: np.ndarray             # (N,) int64
    metrics: dict[str, np.ndarray]        # name -> (N,) float64, NaN where absent
    flagged: np.ndarray                   # (N,) bool
    extracted: np.ndarray                 # (N,) bool
    truth: list[bool | None]              # (N,) majority human label; None when unlabelled or undecided

    def labelled(self) -> np.ndarray:
        return np.array([t is not None for t in self.truth], dtype=bool)

    def available_metrics(self) -> list[str]:
        """Metrics with a value on at least one labelled candidate."""
        lab = self.labelled()
        return [m for m, v in self.metrics.items() if np.isfinite(v[lab]).any()]


def candidate_scores(ws: Workspace, run_id: int) -> CandidateScores:
    from . import labels
    from .calibrate import ground_truth

    with ws.connect() as con:
        rows = con.execute(
            "SELECT c.id, c.medoid_generation_id AS g, c.nearest_training_id AS t, c.l2, c.tiled_l2, c.relative_l2, "
            "c.clique_size, c.mean_distance, c.flagged, c.extracted, n.similarity FROM candidates c "
            "LEFT JOIN neighbours n ON n.candidate_id = c.id AND n.rank = 0 "
            "WHERE c.run_id = ? ORDER BY c.score, c.id", (run_id,)).fetchall()
    current = labels.current_labels(ws)

    def column(name: str) -> np.ndarray:
        return np.array([np.nan if r[name] is None else float(r[name]) for r in rows], dtype=np.float64)

    return CandidateScores(
        candidate_ids=np.array([r["id"] for r in rows], dtype=np.int64),
        metrics={m: column(m) for m in SCORE_METRICS},
        flagged=np.array([bool(r["flagged"]) for r in rows], dtype=bool),
        extracted=np.array([bool(r["extracted"]) for r in rows], dtype=bool),
        truth=[ground_truth(current.get((r["g"], r["t"]), {})) for r in rows],
    )


def label_counts(ws: Workspace, run_id: int) -> dict[str, int]:
    """Current labels (all reviewers) on the run's candidates, by label."""
    from . import labels

    current = labels.current_labels(ws)
    with ws.connect() as con:
        pairs = con.execute("SELECT medoid_generation_id, nearest_training_id FROM candidates WHERE run_id = ?",
                            (run_id,)).fetchall()
    out: dict[str, int] = {}
    for g, t in pairs:
        for lab in current.get((g, t), {}).values():
            out[lab] = out.get(lab, 0) + 1
    return out


# ---------------------------------------------------------------------------- training data


@dataclass(frozen=True)
class DuplicateGroup:
    group: int                    # the id of the group's first image
    count: int                    # that image's duplicate count (images within the threshold of it, itself included)
    size: int                     # images in this browsing group
    images: list[TrainingImage]   # up to ``per_group`` members, the first image first, then by id
    captions: list[str]           # distinct captions in the group, most common first


def duplicate_groups(ws: Workspace, limit: int = 20, per_group: int = 8, min_size: int = 2) -> list[DuplicateGroup]:
    """Browsing groups of near-duplicates (core.duplicates), by their first image's duplicate count, then size."""
    from .audit import get_training

    with ws.connect() as con:
        groups = con.execute(
            "SELECT g.duplicate_group AS g, COUNT(*) AS n, f.duplicate_count AS k FROM training_images g "
            "JOIN training_images f ON f.id = g.duplicate_group "
            "GROUP BY g.duplicate_group HAVING n >= ? ORDER BY k DESC, n DESC, g LIMIT ?", (min_size, limit)).fetchall()
        out = []
        for g in groups:
            ids = [r[0] for r in con.execute("SELECT id FROM training_images WHERE duplicate_group = ? "
                                             "ORDER BY id != duplicate_group, id LIMIT ?", (g["g"], per_group))]
            caps = [r[0] for r in con.execute(
                "SELECT caption, COUNT(*) AS n FROM training_images WHERE duplicate_group = ? AND caption IS NOT NULL "
                "AND caption != '' GROUP BY caption ORDER BY n DESC, caption", (g["g"],))]
            out.append((g["g"], g["k"], g["n"], ids, caps))
    images = get_training(ws, [i for *_, ids, _ in out for i in ids])
    return [DuplicateGroup(gid, k, n, [images[i] for i in ids], caps) for gid, k, n, ids, caps in out]


def training_summary(ws: Workspace) -> dict[str, int]:
    """Counts for the Training data page, after bringing the duplicate counts up to date (core.duplicates.ensure)."""
    from . import duplicates

    duplicates.ensure(ws)
    with ws.connect() as con:
        r = con.execute(
            "SELECT COUNT(*) AS images, COUNT(DISTINCT sha256) AS unique_files, "
            "COUNT(DISTINCT COALESCE(duplicate_group, -id)) AS groups, "
            "SUM(CASE WHEN caption IS NOT NULL AND caption != '' THEN 1 ELSE 0 END) AS captioned, "
            "SUM(CASE WHEN duplicate_count > 1 THEN 1 ELSE 0 END) AS duplicated, "
            "COALESCE(MAX(duplicate_count), 0) AS max_duplicates FROM training_images").fetchone()
    return dict(r)


# ---------------------------------------------------------------------------- images


def upscale_nearest(array: np.ndarray, min_side: int) -> np.ndarray:
    """Enlarge (H, W, C) uint8 by the integer factor ceil(min_side / min(H, W)) with nearest neighbour,
    so that every source pixel stays a visible square; images already that large are returned as is."""
    h, w = array.shape[:2]
    factor = max(1, -(-min_side // max(1, min(h, w))))
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def display_image(ws: Workspace, relpath: str, min_side: int = 192) -> np.ndarray:
    """A workspace image as uint8 (H, W, 3), enlarged with nearest neighbour when its short side is below ``min_side``."""
    from .images import load_image

    return upscale_nearest(np.asarray(load_image(ws.resolve(relpath)), dtype=np.uint8), min_side)


MASK_SHADE = (128, 128, 128)  # how a masked input shows the region the model had to reconstruct


def masked_input(ws: Workspace, image_path: str, mask_path: str, min_side: int = 0) -> np.ndarray:
    """An inpainting input as the model saw it: the stored original with the mask's white region painted
    grey, uint8 (H, W, 3), enlarged with nearest neighbour to at least ``min_side``."""
    from .errors import ImageError
    from .images import load_image

    img = np.array(load_image(ws.resolve(image_path)), dtype=np.uint8)
    mask = np.asarray(load_image(ws.resolve(mask_path)).convert("L")) >= 128
    if mask.shape != img.shape[:2]:
        raise ImageError(f"{mask_path} is not the size of {image_path}; the run's files were changed")
    img[mask] = MASK_SHADE
    return upscale_nearest(img, min_side)


def pair_arrays(ws: Workspace, generation_path: str, training_path: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A generation and a training image at one resolution (the working-resolution rule), float32 in [0, 1].

    ``size`` defaults to the generation's short side."""
    from .images import load_image, to_working

    gen = load_image(ws.resolve(generation_path))
    size = size or min(gen.size)
    return to_working(gen, size), to_working(load_image(ws.resolve(training_path)), size)


def difference_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel |a - b| averaged over channels: (H, W) float32 in [0, 1]. Shapes must match."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean(axis=2)


# Anchors of the magma colour map (black -> purple -> orange -> pale yellow), evenly spaced.
MAGMA = np.array([[0, 0, 4], [24, 15, 61], [68, 15, 118], [114, 31, 129], [158, 47, 127], [205, 64, 113],
                  [241, 96, 93], [253, 150, 104], [254, 202, 141], [252, 253, 191]], dtype=np.float32)


def colour_map(values: np.ndarray, vmax: float) -> np.ndarray:
    """(H, W) values in [0, vmax] -> (H, W, 3) uint8 through MAGMA, linear between anchors; above vmax saturates."""
    if vmax <= 0:
        raise ValueError(f"vmax must be positive, got {vmax}")
    t = np.clip(np.asarray(values, np.float32) / vmax, 0.0, 1.0) * (len(MAGMA) - 1)
    lo = np.minimum(t.astype(np.int64), len(MAGMA) - 2)
    frac = (t - lo)[..., None]
    return np.round(MAGMA[lo] * (1 - frac) + MAGMA[lo + 1] * frac).astype(np.uint8)


DIFFERENCE_VMAX = 0.25  # one fixed scale, so that colours compare across candidates


def difference_image(a: np.ndarray, b: np.ndarray, vmax: float = DIFFERENCE_VMAX) -> tuple[np.ndarray, float]:
    """The per-pixel |a - b| as a colour image on a fixed scale (black 0, pale yellow >= ``vmax``), and ``vmax``."""
    return colour_map(difference_map(a, b), vmax), float(vmax)


def blend(a: np.ndarray, b: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(1 - alpha) * a + alpha * b, for an overlay of a generation on its training image."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return (1.0 - alpha) * np.asarray(a, np.float32) + alpha * np.asarray(b, np.float32)


def data_uri(array: np.ndarray) -> str:
    """A PNG data URI (for HTML that must not reference any file or URL)."""
    from .images import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode("ascii")


def file_data_uri(ws: Workspace, relpath: str, min_side: int = 0) -> str:
    """A workspace image as a PNG data URI, enlarged with nearest neighbour to ``min_side`` when smaller."""
    return data_uri(display_image(ws, relpath, min_side))


def labelled_prompts(ws: Workspace, run_id: int) -> set[int]:
    """Prompts of the run with at least one candidate that carries a current label."""
    from . import labels

    current = labels.current_labels(ws)
    with ws.connect() as con:
        rows = con.execute("SELECT prompt_id, medoid_generation_id, nearest_training_id FROM candidates WHERE run_id = ?",
                           (run_id,)).fetchall()
    return {r[0] for r in rows if current.get((r[1], r[2]))}


def distinct_neighbours(neighbours: list) -> list:
    """Neighbours with identical files (same SHA-256, e.g. the 100 copies of a duplicated image)
    kept once, at their best rank; their duplicate count still says how many there are."""
    seen: set[str] = set()
    out = []
    for n in neighbours:
        if n.training.sha256 not in seen:
            seen.add(n.training.sha256)
            out.append(n)
    return out
