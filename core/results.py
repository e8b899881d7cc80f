"""The read side of audit runs and of the workspace: candidates, per-prompt results, Figure 5
tables, the counts a page, the report or an export shows. Everything here reads the workspace
and returns plain data; nothing writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .records import Candidate, Generation, TrainingImage
from .runs import latest_run, require_run, run_params
from .store import Workspace


@dataclass(frozen=True)
class PromptRow:
    prompt_id: int
    prompt: str | None
    generations: int
    largest_clique: int
    flagged: bool
    extracted: bool
    mean_distance: float | None
    best_l2: float | None  # the largest clique medoid's nearest training l2
    clique_exact: bool = True  # False: the largest clique's size is a lower bound (search budget)
    nearest_certified: bool = True  # False: best_l2 is the best found, not certainly the nearest


@dataclass(frozen=True)
class NeighbourView:
    training: TrainingImage
    rank: int
    l2: float
    tiled_l2: float
    similarity: float
    relative_l2: float | None = None


def generation_from_row(row) -> Generation:
    return Generation(id=row["id"], path=row["path"], prompt_id=row["prompt_id"], prompt=row["text"] or None,
                      seed=row["seed"], model_id=row["model_id"], width=row["width"], height=row["height"],
                      steps=row["steps"], guidance=row["guidance"], scheduler=row["scheduler"], source=row["source"])


def training_from_row(row) -> TrainingImage:
    return TrainingImage(id=row["id"], path=row["path"], source_path=row["source_path"], caption=row["caption"],
                         sha256=row["sha256"], width=row["width"], height=row["height"],
                         duplicate_count=row["duplicate_count"], duplicate_group=row["duplicate_group"])


_GEN_SQL = "SELECT g.*, p.text FROM generations g JOIN prompts p ON p.id = g.prompt_id"


def get_generations(ws: Workspace, ids: list[int]) -> dict[int, Generation]:
    with ws.connect() as con:
        rows = con.execute(_GEN_SQL + f" WHERE g.id IN ({','.join('?' * len(ids))})", ids).fetchall() if ids else []
    return {r["id"]: generation_from_row(r) for r in rows}


def get_training(ws: Workspace, ids: list[int] | None = None) -> dict[int, TrainingImage]:
    with ws.connect() as con:
        if ids is None:
            rows = con.execute("SELECT * FROM training_images ORDER BY id").fetchall()
        else:
            rows = con.execute(f"SELECT * FROM training_images WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall() if ids else []
    return {r["id"]: training_from_row(r) for r in rows}


_CAND_SQL = """SELECT c.*, p.text AS prompt_text, g.path AS medoid_path, t.path AS training_path
FROM candidates c JOIN prompts p ON p.id = c.prompt_id JOIN generations g ON g.id = c.medoid_generation_id
LEFT JOIN training_images t ON t.id = c.nearest_training_id"""


def _candidate(row, members: tuple[int, ...] = ()) -> Candidate:
    return Candidate(id=row["id"], run_id=row["run_id"], prompt=row["prompt_text"] or None, prompt_id=row["prompt_id"],
                     group_rank=row["group_rank"], clique_size=row["clique_size"], mean_distance=row["mean_distance"],
                     flagged=bool(row["flagged"]), medoid_generation_id=row["medoid_generation_id"], medoid_path=row["medoid_path"],
                     nearest_training_id=row["nearest_training_id"], nearest_training_path=row["training_path"],
                     l2=row["l2"], tiled_l2=row["tiled_l2"], relative_l2=row["relative_l2"], extracted=bool(row["extracted"]),
                     members=members, clique_exact=bool(row["clique_exact"]),
                     nearest_certified=None if row["nearest_certified"] is None else bool(row["nearest_certified"]),
                     nearest_lower=row["nearest_lower"], exact_distances=row["exact_distances"])


def candidates(ws: Workspace, run_id: int | None = None, *, flagged_only: bool = False, extracted_only: bool = False,
               with_members: bool = False) -> list[Candidate]:
    """The run's candidates, most suspicious first (flagged before unflagged, then by mean clique distance)."""
    run_id = require_run(ws, run_id)
    sql = _CAND_SQL + " WHERE c.run_id = ?"
    if flagged_only:
        sql += " AND c.flagged = 1"
    if extracted_only:
        sql += " AND c.extracted = 1"
    sql += " ORDER BY c.score, c.id"
    with ws.connect() as con:
        rows = con.execute(sql, (run_id,)).fetchall()
        members: dict[int, list[int]] = {}
        if with_members:
            for m in con.execute("SELECT m.candidate_id, m.generation_id FROM candidate_members m JOIN candidates c "
                                 "ON c.id = m.candidate_id WHERE c.run_id = ? ORDER BY m.generation_id", (run_id,)):
                members.setdefault(m[0], []).append(m[1])
    return [_candidate(r, tuple(members.get(r["id"], ()))) for r in rows]


def get_candidate(ws: Workspace, candidate_id: int) -> Candidate:
    with ws.connect() as con:
        row = con.execute(_CAND_SQL + " WHERE c.id = ?", (candidate_id,)).fetchone()
        if row is None:
            raise InputError(f"no candidate {candidate_id} in {ws.root}; `memaudit export {ws.root} --format csv` lists them")
        members = tuple(r[0] for r in con.execute("SELECT generation_id FROM candidate_members WHERE candidate_id = ? ORDER BY generation_id", (candidate_id,)))
    return _candidate(row, members)


def neighbours(ws: Workspace, candidate_id: int) -> list[NeighbourView]:
    with ws.connect() as con:
        rows = con.execute("SELECT * FROM neighbours WHERE candidate_id = ? ORDER BY rank", (candidate_id,)).fetchall()
    train = get_training(ws, [r["training_id"] for r in rows])
    return [NeighbourView(train[r["training_id"]], r["rank"], r["l2"], r["tiled_l2"], r["similarity"], r["relative_l2"]) for r in rows]


def prompt_results(ws: Workspace, run_id: int | None = None) -> list[PromptRow]:
    """Per-prompt results of a run at the run's own thresholds."""
    run_id = require_run(ws, run_id)
    with ws.connect() as con:
        rows = con.execute(
            "SELECT r.*, p.text, (SELECT MAX(c.extracted) FROM candidates c WHERE c.run_id = r.run_id AND c.prompt_id = r.prompt_id) AS ext, "
            "(SELECT c.l2 FROM candidates c WHERE c.run_id = r.run_id AND c.prompt_id = r.prompt_id AND c.group_rank = 0) AS best, "
            "(SELECT c.nearest_certified FROM candidates c WHERE c.run_id = r.run_id AND c.prompt_id = r.prompt_id AND c.group_rank = 0) AS cert "
            "FROM prompt_results r JOIN prompts p ON p.id = r.prompt_id WHERE r.run_id = ? ORDER BY r.flagged DESC, r.largest_clique DESC, r.mean_distance",
            (run_id,)).fetchall()
    return [PromptRow(r["prompt_id"], r["text"] or None, r["generations"], r["largest_clique"], bool(r["flagged"]),
                      bool(r["ext"]), r["mean_distance"], r["best"], bool(r["clique_exact"]), r["cert"] != 0) for r in rows]


def duplicate_extraction_table(ws: Workspace, run_id: int | None = None) -> list[dict]:
    """The paper's Figure 5 as rows: per training duplicate count, prompts flagged and extracted.

    A prompt is attributed to the duplicate count of the training image nearest to its
    largest clique's medoid.
    """
    run_id = require_run(ws, run_id)
    with ws.connect() as con:
        rows = con.execute(
            "SELECT t.duplicate_count AS k, COUNT(*) AS prompts, SUM(r.flagged) AS flagged, SUM(c.extracted) AS extracted "
            "FROM prompt_results r JOIN candidates c ON c.run_id = r.run_id AND c.prompt_id = r.prompt_id AND c.group_rank = 0 "
            "JOIN training_images t ON t.id = c.nearest_training_id JOIN prompts p ON p.id = r.prompt_id "
            "WHERE r.run_id = ? AND p.text != '' GROUP BY t.duplicate_count ORDER BY t.duplicate_count", (run_id,)).fetchall()
    return [dict(r) for r in rows]


def caption_duplicate_table(ws: Workspace, run_id: int | None = None) -> list[dict]:
    """Figure 5 keyed by the prompt's own training caption: for prompts that are training captions,
    the duplicate count of the captioned image against whether the prompt was flagged / extracted."""
    run_id = require_run(ws, run_id)
    with ws.connect() as con:
        rows = con.execute(
            "SELECT MAX(t.duplicate_count) AS k, r.prompt_id, r.flagged, "
            "(SELECT MAX(c.extracted) FROM candidates c WHERE c.run_id = r.run_id AND c.prompt_id = r.prompt_id) AS extracted "
            "FROM prompt_results r JOIN prompts p ON p.id = r.prompt_id JOIN training_images t ON t.caption = p.text "
            "WHERE r.run_id = ? GROUP BY r.prompt_id", (run_id,)).fetchall()
    table: dict[int, dict] = {}
    for r in rows:
        e = table.setdefault(r["k"], {"k": r["k"], "prompts": 0, "flagged": 0, "extracted": 0})
        e["prompts"] += 1
        e["flagged"] += int(r["flagged"])
        e["extracted"] += int(r["extracted"] or 0)
    return [table[k] for k in sorted(table)]


def count_summary(ws: Workspace, run_id: int | None = None) -> dict:
    """A run's counts, with what its search budgets left uncertain: ``clique_bounds`` prompts whose
    largest clique is a lower bound, ``uncertified_nearest`` flagged candidates whose nearest training
    image is not certainly the nearest, ``uncertain_verdicts`` those among them counted not extracted
    whose true nearest could still lie within delta."""
    run_id = require_run(ws, run_id)
    delta = run_params(ws, run_id).delta
    with ws.connect() as con:
        r = con.execute("SELECT COUNT(*) AS prompts, SUM(flagged) AS flagged, SUM(1 - clique_exact) AS bounds "
                        "FROM prompt_results WHERE run_id = ?", (run_id,)).fetchone()
        c = con.execute("SELECT COUNT(*) AS candidates, SUM(extracted) AS extracted, COUNT(DISTINCT CASE WHEN extracted = 1 THEN nearest_training_id END) AS images, "
                        "SUM(CASE WHEN flagged = 1 AND nearest_certified = 0 THEN 1 ELSE 0 END) AS uncertified, "
                        "SUM(CASE WHEN flagged = 1 AND extracted = 0 AND nearest_certified = 0 AND nearest_lower <= ? THEN 1 ELSE 0 END) AS uncertain "
                        "FROM candidates WHERE run_id = ?", (delta, run_id)).fetchone()
    return {"run_id": run_id, "prompts": r["prompts"], "flagged_prompts": r["flagged"] or 0, "candidates": c["candidates"],
            "extracted_candidates": c["extracted"] or 0, "extracted_training_images": c["images"] or 0,
            "clique_bounds": r["bounds"] or 0, "uncertified_nearest": c["uncertified"] or 0,
            "uncertain_verdicts": c["uncertain"] or 0}


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
    from . import labels

    counts = ws.counts()
    run_id = run_id if run_id is not None else latest_run(ws)
    base = dict(models=counts["models"], prompts=counts["prompts"], generations=counts["generations"],
                training_images=counts["training_images"], runs=counts["audit_runs"], run_id=run_id,
                label_events=counts["label_events"])
    if run_id is None:
        return Overview(**base)
    summary = count_summary(ws, run_id)
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


@dataclass(frozen=True)
class DuplicateRates:
    basis: str                              # what a row counts, in words
    bins: list[tuple[str, int, int]]        # (label, prompts in the bin, extracted among them)


# Duplicate-count bins (inclusive bounds; None = no upper bound), powers of two as in the paper's log axis.
DUPLICATE_BINS: tuple[tuple[int, int | None], ...] = (
    (1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 127), (128, 255), (256, None))


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
    from . import duplicates

    duplicates.ensure(ws)
    rows = caption_duplicate_table(ws, run_id)
    if rows:
        return DuplicateRates("prompts that are training captions, by the duplicate count of the captioned image",
                              bin_by_duplicates(rows))
    rows = duplicate_extraction_table(ws, run_id)
    return DuplicateRates("prompts, by the duplicate count of the training image nearest to their largest clique",
                          bin_by_duplicates(rows))


def largest_clique_sizes(ws: Workspace, run_id: int) -> list[int]:
    """The largest clique size of every text prompt of the run, at the run's own tau."""
    with ws.connect() as con:
        return [r[0] for r in con.execute(
            "SELECT r.largest_clique FROM prompt_results r JOIN prompts p ON p.id = r.prompt_id "
            "WHERE r.run_id = ? AND p.text != '' ORDER BY r.prompt_id", (run_id,))]


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


def labelled_prompts(ws: Workspace, run_id: int) -> set[int]:
    """Prompts of the run with at least one candidate that carries a current label."""
    from . import labels

    current = labels.current_labels(ws)
    with ws.connect() as con:
        rows = con.execute("SELECT prompt_id, medoid_generation_id, nearest_training_id FROM candidates WHERE run_id = ?",
                           (run_id,)).fetchall()
    return {r[0] for r in rows if current.get((r[1], r[2]))}


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
