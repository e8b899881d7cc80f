"""Human review: append-only label events, the current label per reviewer, and agreement.

A label judges a pair (generation, training image): "is this generation a copy of
this training image?". Keying on the pair, not on the candidate row, keeps labels
valid across audit runs. Events are never updated or deleted: an undo is an event
of its own that names the event it cancels. Every write may carry a token (an
idempotency key), so a retried or re-rendered click is stored once.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from itertools import combinations

from .errors import InputError
from .records import LABELS, Candidate, LabelEvent
from .store import Workspace, now


# The ids of undone events. As a list subquery SQLite evaluates it once into a temporary b-tree; the
# correlated form (NOT EXISTS ... WHERE u.undoes = e.id) scans every event for every event, O(n^2).
_UNDONE = "SELECT undoes FROM label_events WHERE undoes IS NOT NULL"


def _check_reviewer(reviewer: str) -> str:
    reviewer = (reviewer or "").strip()
    if not reviewer:
        raise InputError("a reviewer name is required (for example --reviewer alice)")
    if len(reviewer) > 100:
        raise InputError("a reviewer name must be at most 100 characters")
    return reviewer


def _event(row: sqlite3.Row) -> LabelEvent:
    return LabelEvent(id=row["id"], candidate_id=row["candidate_id"], generation_id=row["generation_id"],
                      training_id=row["training_id"], reviewer=row["reviewer"], label=row["label"], note=row["note"],
                      created_at=row["created_at"], undoes=row["undoes"])


def _already_written(con: sqlite3.Connection, token: str | None) -> int | None:
    """The id of the event already stored under ``token`` (a retried write), if any."""
    if token is None:
        return None
    row = con.execute("SELECT id FROM label_events WHERE token = ?", (token,)).fetchone()
    return None if row is None else row["id"]


def add_label(ws: Workspace, candidate_id: int, label: str, reviewer: str, note: str = "", token: str | None = None) -> int:
    """Record ``reviewer``'s label for a candidate (its medoid against its nearest training image)."""
    if label not in LABELS:
        raise InputError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    reviewer = _check_reviewer(reviewer)
    with ws.transaction() as con:
        if (done := _already_written(con, token)) is not None:
            return done
        cand = con.execute("SELECT medoid_generation_id, nearest_training_id FROM candidates WHERE id = ?", (candidate_id,)).fetchone()
        if cand is None:
            raise InputError(f"no candidate {candidate_id} in {ws.root}; `memaudit export {ws.root} --format csv` lists them")
        return con.execute(
            "INSERT INTO label_events(candidate_id, generation_id, training_id, reviewer, label, note, created_at, token) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (candidate_id, cand["medoid_generation_id"], cand["nearest_training_id"], reviewer, label, note or "", now(), token)).lastrowid


def undo_last(ws: Workspace, reviewer: str, token: str | None = None) -> int | None:
    """Cancel ``reviewer``'s latest label that is still in force; return the undo event's id (None if nothing to undo)."""
    reviewer = _check_reviewer(reviewer)
    with ws.transaction() as con:
        if (done := _already_written(con, token)) is not None:
            return done
        target = con.execute(
            "SELECT * FROM label_events e WHERE reviewer = ? AND label IS NOT NULL "
            f"AND e.id NOT IN ({_UNDONE}) ORDER BY id DESC LIMIT 1", (reviewer,)).fetchone()
        if target is None:
            return None
        return con.execute(
            "INSERT INTO label_events(candidate_id, generation_id, training_id, reviewer, label, note, created_at, undoes, token) "
            "VALUES (?, ?, ?, ?, NULL, '', ?, ?, ?)",
            (target["candidate_id"], target["generation_id"], target["training_id"], reviewer, now(), target["id"], token)).lastrowid


def label_events(ws: Workspace) -> list[LabelEvent]:
    with ws.connect() as con:
        return [_event(r) for r in con.execute("SELECT * FROM label_events ORDER BY id")]


Pair = tuple[int, int | None]


def current_labels(ws: Workspace) -> dict[Pair, dict[str, str]]:
    """(generation_id, training_id) -> {reviewer: label}: each reviewer's latest label not undone."""
    with ws.connect() as con:
        rows = con.execute(
            "SELECT e.generation_id, e.training_id, e.reviewer, e.label FROM label_events e "
            f"WHERE e.label IS NOT NULL AND e.id NOT IN ({_UNDONE}) ORDER BY e.id").fetchall()
    out: dict[Pair, dict[str, str]] = {}
    for r in rows:
        out.setdefault((r["generation_id"], r["training_id"]), {})[r["reviewer"]] = r["label"]
    return out


def review_queue(ws: Workspace, run_id: int | None, reviewer: str, *, unlabeled_only: bool = True) -> list[Candidate]:
    """Candidates in review order (most suspicious first), without those ``reviewer`` has labelled when asked."""
    return review_state(ws, run_id, reviewer, unlabeled_only=unlabeled_only).queue


@dataclass(frozen=True)
class ReviewState:
    """What the Review page shows around one candidate, from one read of the run's candidates."""
    queue: list[Candidate]           # in review order
    candidates: int                  # all the run's candidates
    labelled_by_reviewer: int        # of those, with a current label by the reviewer
    labels: dict[Pair, dict[str, str]]  # current labels, as ``current_labels``


def review_state(ws: Workspace, run_id: int | None, reviewer: str, *, unlabeled_only: bool = True,
                 flagged_only: bool = False) -> ReviewState:
    """The review queue (most suspicious first; without what ``reviewer`` has labelled when ``unlabeled_only``;
    flagged candidates alone when ``flagged_only``) and the reviewer's progress over all the run's candidates."""
    from .results import candidates

    cands = candidates(ws, run_id)
    labels = current_labels(ws)
    mine = [reviewer in labels.get((c.medoid_generation_id, c.nearest_training_id), {}) for c in cands]
    queue = [c for c, done in zip(cands, mine) if not (unlabeled_only and done) and (c.flagged or not flagged_only)]
    return ReviewState(queue, len(cands), sum(mine), labels)


@dataclass(frozen=True)
class Agreement:
    reviewers: tuple[str, ...]
    pairs: dict[tuple[str, str], tuple[float | None, int]]  # (a, b) -> (Cohen's kappa, items both labelled)
    labelled_items: int


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa = (p_o - p_e) / (1 - p_e) over paired labels; None when undefined (no items, or p_e = 1)."""
    if len(a) != len(b):
        raise ValueError(f"label lists differ in length: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in zip(a, b)) / n
    cats = set(a) | set(b)
    p_e = sum((a.count(c) / n) * (b.count(c) / n) for c in cats)
    if p_e >= 1.0:
        return 1.0 if p_o == 1.0 else None
    return (p_o - p_e) / (1.0 - p_e)


def agreement(ws: Workspace) -> Agreement:
    labels = current_labels(ws)
    reviewers = tuple(sorted({r for by in labels.values() for r in by}))
    pairs = {}
    for a, b in combinations(reviewers, 2):
        both = [(by[a], by[b]) for by in labels.values() if a in by and b in by]
        pairs[(a, b)] = (cohen_kappa([x for x, _ in both], [y for _, y in both]), len(both))
    return Agreement(reviewers, pairs, len(labels))
