"""The workspace: one SQLite file (``audit.db``) plus image folders referenced by relative path.

The database is the system of record. Connections are short-lived, in WAL mode
with a busy timeout, so several processes (CLI runs, dashboard sessions, two
reviewers) can share one workspace. The schema is built by numbered migrations
recorded in the ``migrations`` table; opening a workspace written by a newer
memaudit fails with a clear message instead of guessing.

Layout::

    WS/audit.db            the database
    WS/generations/p<prompt_id // 1000>/<prompt_id>/s<seed // 1000>/<seed>-<hash>.png      generated
    WS/generations/p<prompt_id // 1000>/<prompt_id>/i<n // 1000>/import-<hash>-<hash>.<ext>  n-th import of the prompt
    WS/training/<sha256[:2]>/<sha256>.<ext>   copies of ingested training files
    WS/index/              faiss indexes and embeddings
    WS/cache/              distance matrices (derived data; safe to delete)

No folder grows past about ``FILES_PER_FOLDER`` entries however many prompts and images a
workspace holds (``generation_folder``). Rows store paths relative to WS, so files written
under an earlier layout (``generations/<prompt_id>/...``) stay readable where they are.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from . import config
from .errors import WorkspaceError

DB_NAME = "audit.db"

MIGRATIONS: list[tuple[str, str]] = [
    ("initial schema", """
CREATE TABLE settings(
  name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE models(
  id INTEGER PRIMARY KEY, ref TEXT NOT NULL, kind TEXT NOT NULL, pipeline_class TEXT NOT NULL,
  weights_hash TEXT NOT NULL, scheduler TEXT NOT NULL, created_at TEXT NOT NULL,
  UNIQUE(ref, weights_hash));
CREATE TABLE prompts(
  id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE);  -- '' stands for "no prompt" (unconditional)
CREATE TABLE generations(
  id INTEGER PRIMARY KEY,
  prompt_id INTEGER NOT NULL REFERENCES prompts(id),
  model_id INTEGER REFERENCES models(id),
  seed INTEGER,
  path TEXT NOT NULL UNIQUE,
  sha256 TEXT NOT NULL,
  width INTEGER NOT NULL, height INTEGER NOT NULL,
  steps INTEGER, guidance REAL, scheduler TEXT,
  source TEXT NOT NULL CHECK (source IN ('generate', 'import')),
  origin TEXT,                      -- imported: the original file, resolved
  params TEXT NOT NULL DEFAULT '{}', -- full provenance as JSON
  created_at TEXT NOT NULL);
CREATE UNIQUE INDEX generations_resume_key
  ON generations(model_id, prompt_id, seed, steps, guidance, width, height) WHERE source = 'generate';
CREATE UNIQUE INDEX generations_import_key ON generations(origin) WHERE source = 'import';
CREATE INDEX generations_prompt ON generations(prompt_id);
CREATE TABLE training_images(
  id INTEGER PRIMARY KEY,
  path TEXT NOT NULL,
  source_path TEXT NOT NULL UNIQUE,
  caption TEXT,
  sha256 TEXT NOT NULL,
  width INTEGER NOT NULL, height INTEGER NOT NULL,
  duplicate_count INTEGER NOT NULL DEFAULT 1,
  duplicate_group INTEGER,
  added_at TEXT NOT NULL);
CREATE INDEX training_sha ON training_images(sha256);
CREATE TABLE indexes(
  embedder TEXT PRIMARY KEY, path TEXT NOT NULL, kind TEXT NOT NULL, dim INTEGER NOT NULL,
  count INTEGER NOT NULL, max_training_id INTEGER NOT NULL, params TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE audit_runs(
  id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, finished_at TEXT,
  status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
  params TEXT NOT NULL);
CREATE TABLE prompt_results(
  run_id INTEGER NOT NULL REFERENCES audit_runs(id) ON DELETE CASCADE,
  prompt_id INTEGER NOT NULL REFERENCES prompts(id),
  generations INTEGER NOT NULL, largest_clique INTEGER NOT NULL, flagged INTEGER NOT NULL,
  mean_distance REAL,
  PRIMARY KEY (run_id, prompt_id));
CREATE TABLE candidates(
  id INTEGER PRIMARY KEY,
  run_id INTEGER NOT NULL REFERENCES audit_runs(id) ON DELETE CASCADE,
  prompt_id INTEGER NOT NULL REFERENCES prompts(id),
  group_rank INTEGER NOT NULL,
  clique_size INTEGER NOT NULL,
  mean_distance REAL NOT NULL,
  flagged INTEGER NOT NULL,
  medoid_generation_id INTEGER NOT NULL REFERENCES generations(id),
  nearest_training_id INTEGER REFERENCES training_images(id),
  l2 REAL, tiled_l2 REAL, relative_l2 REAL,
  extracted INTEGER NOT NULL,
  score REAL NOT NULL);            -- rank key: lower is more suspicious
CREATE INDEX candidates_run ON candidates(run_id, score);
CREATE TABLE candidate_members(
  candidate_id INTEGER NOT NULL REFERENCES candidates(id) ON DELETE CASCADE,
  generation_id INTEGER NOT NULL REFERENCES generations(id),
  PRIMARY KEY (candidate_id, generation_id));
CREATE TABLE neighbours(
  candidate_id INTEGER NOT NULL REFERENCES candidates(id) ON DELETE CASCADE,
  rank INTEGER NOT NULL,
  training_id INTEGER NOT NULL REFERENCES training_images(id),
  l2 REAL NOT NULL, tiled_l2 REAL NOT NULL, similarity REAL NOT NULL, relative_l2 REAL,
  PRIMARY KEY (candidate_id, rank));
CREATE TABLE label_events(
  id INTEGER PRIMARY KEY,
  candidate_id INTEGER REFERENCES candidates(id) ON DELETE SET NULL,
  generation_id INTEGER NOT NULL REFERENCES generations(id),
  training_id INTEGER REFERENCES training_images(id),
  reviewer TEXT NOT NULL,
  label TEXT CHECK (label IS NULL OR label IN ('exact_copy', 'near_copy', 'not_memorized', 'unsure')),
  note TEXT NOT NULL DEFAULT '',
  created_at TEXT NOT NULL,
  undoes INTEGER REFERENCES label_events(id),
  token TEXT UNIQUE,               -- idempotency key: a retried write is stored once
  CHECK ((label IS NULL) = (undoes IS NOT NULL)));
CREATE INDEX label_events_pair ON label_events(generation_id, training_id, reviewer);
"""),
    # clique_exact 0: a search budget stopped the clique search, the size is a lower bound;
    # nearest_certified 1: the nearest training image is certainly the nearest of the whole set,
    # nearest_lower a lower bound of the true nearest distance, exact_distances what the search computed
    # (no comment inside an ADD COLUMN: SQLite appends the text to the stored CREATE TABLE)
    ("certified verdicts", """
ALTER TABLE prompt_results ADD COLUMN clique_exact INTEGER NOT NULL DEFAULT 1;
ALTER TABLE candidates ADD COLUMN clique_exact INTEGER NOT NULL DEFAULT 1;
ALTER TABLE candidates ADD COLUMN nearest_certified INTEGER;
ALTER TABLE candidates ADD COLUMN nearest_lower REAL;
ALTER TABLE candidates ADD COLUMN exact_distances INTEGER
"""),
    ("triage runs", """
CREATE TABLE triage_runs(
  id INTEGER PRIMARY KEY,
  model_id INTEGER NOT NULL REFERENCES models(id),
  method TEXT NOT NULL,
  params TEXT NOT NULL,            -- core.triage.TriageParams as sorted JSON: with the model, the run's identity
  provenance TEXT NOT NULL,        -- weights hash, pipeline, scheduler, device, library versions
  created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
  UNIQUE(model_id, method, params));
CREATE TABLE triage_scores(
  run_id INTEGER NOT NULL REFERENCES triage_runs(id) ON DELETE CASCADE,
  prompt_id INTEGER NOT NULL REFERENCES prompts(id),
  score REAL NOT NULL,             -- higher: more likely memorised
  note TEXT NOT NULL DEFAULT '',   -- e.g. the prompt was truncated to the text encoder's length
  created_at TEXT NOT NULL,
  PRIMARY KEY (run_id, prompt_id));
CREATE INDEX triage_scores_rank ON triage_scores(run_id, score);
"""),
    ("inpainting runs", """
CREATE TABLE inpainting_runs(
  id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, finished_at TEXT,
  status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
  model_id INTEGER REFERENCES models(id),
  mask TEXT NOT NULL,               -- left | right | top | bottom | center | the mask file, resolved
  samples INTEGER NOT NULL, steps INTEGER NOT NULL, seed INTEGER NOT NULL,
  mask_path TEXT NOT NULL,          -- the mask as used, at the model's resolution (white = reconstructed)
  params TEXT NOT NULL);
CREATE TABLE inpainting_images(
  id INTEGER PRIMARY KEY,
  run_id INTEGER NOT NULL REFERENCES inpainting_runs(id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  source_path TEXT NOT NULL,        -- the file as given, resolved
  path TEXT NOT NULL,               -- the original at the model's resolution, in the workspace
  member INTEGER NOT NULL,
  distance_best REAL NOT NULL,      -- oracle bound: the closest completion
  distance_mean REAL NOT NULL,
  distance_chosen REAL,             -- the completion with the lowest denoising loss (NULL: no loss for this model)
  chosen_sample INTEGER,
  UNIQUE (run_id, position));
CREATE TABLE inpainting_samples(
  image_id INTEGER NOT NULL REFERENCES inpainting_images(id) ON DELETE CASCADE,
  sample INTEGER NOT NULL, seed INTEGER NOT NULL,
  path TEXT NOT NULL, distance REAL NOT NULL, loss REAL,
  PRIMARY KEY (image_id, sample));
"""),
    ("per-image duplicate counts", """
CREATE TABLE duplicate_pairs(
  a INTEGER NOT NULL REFERENCES training_images(id),
  b INTEGER NOT NULL REFERENCES training_images(id),
  l2 REAL NOT NULL,                 -- exact normalised L2 at duplicate_size
  similarity REAL,                  -- CLIP cosine similarity, when duplicate_clip_similarity > 0
  PRIMARY KEY (a, b), CHECK (a < b)) WITHOUT ROWID;
CREATE INDEX duplicate_pairs_b ON duplicate_pairs(b);
CREATE TABLE duplicate_params(
  id INTEGER PRIMARY KEY CHECK (id = 1), params TEXT NOT NULL, groups_current INTEGER NOT NULL DEFAULT 0);
ALTER TABLE training_images ADD COLUMN duplicates_checked INTEGER NOT NULL DEFAULT 0;
UPDATE training_images SET duplicate_group = NULL
"""),
    ("membership runs", """
CREATE TABLE membership_runs(
  id INTEGER PRIMARY KEY, created_at TEXT NOT NULL,
  attack TEXT NOT NULL CHECK (attack IN ('loss', 'lira')),
  model_ref TEXT NOT NULL, model_hash TEXT NOT NULL,
  timestep INTEGER NOT NULL, noise_draws INTEGER NOT NULL, seed INTEGER NOT NULL,
  series TEXT, step INTEGER,        -- checkpoints of one training run share a series (the Figure 11 trend)
  quality REAL, quality_measure TEXT,
  params TEXT NOT NULL,             -- every parameter as JSON
  metrics TEXT NOT NULL);           -- AUC, TPR at FPR, balanced accuracy (and LiRA offline's) as JSON
CREATE TABLE membership_scores(
  run_id INTEGER NOT NULL REFERENCES membership_runs(id) ON DELETE CASCADE,
  idx INTEGER NOT NULL,
  path TEXT NOT NULL,               -- the image as given (absolute)
  image TEXT NOT NULL,              -- its copy in the workspace, membership/<sha[:2]>/<sha>.<ext>
  member INTEGER NOT NULL,
  condition TEXT,
  loss REAL NOT NULL,               -- the target model's loss at the run's timestep
  score REAL NOT NULL,              -- the attack's score, higher = more likely a member (LiRA: online)
  score_offline REAL,               -- LiRA offline, NULL for the loss attack
  duplicates INTEGER NOT NULL,      -- members within duplicate_threshold of this image, itself included
  PRIMARY KEY (run_id, idx));
"""),
    # a workspace of millions of generations: the per-prompt candidate look-ups of the prompt table and
    # Figure 5 (one index probe per prompt instead of a scan of the run's candidates), the caption join
    # of Figure 5 (a probe per prompt instead of a scan of the training set), and the duplicate counts'
    # "is every image checked?" (empty once all are)
    ("indexes for large workspaces", """
CREATE INDEX candidates_prompt ON candidates(run_id, prompt_id, group_rank);
CREATE INDEX training_caption ON training_images(caption);
CREATE INDEX training_unchecked ON training_images(id) WHERE duplicates_checked = 0
"""),
]

SCHEMA_VERSION = len(MIGRATIONS)

# Entries per folder that the workspace layout aims at: prompts are grouped by a thousand, and a
# prompt's images by a thousand seeds (generated) or a thousand in order of import (imported).
FILES_PER_FOLDER = 1000


def generation_folder(prompt_id: int, kind: str, key: int) -> str:
    """The folder (relative to WS) of a prompt's image: ``kind`` 's' with ``key`` its seed for a
    generated image, 'i' with ``key`` the count of the prompt's images imported before it for an
    imported one. Each level holds at most ``FILES_PER_FOLDER`` entries when seeds are consecutive."""
    if kind not in ("s", "i"):
        raise ValueError(f"kind must be 's' (seed) or 'i' (import order), got {kind!r}")
    return f"generations/p{int(prompt_id) // FILES_PER_FOLDER}/{int(prompt_id)}/{kind}{int(key) // FILES_PER_FOLDER}"


def prompt_folder(prompt_id: int) -> str:
    """The folder (relative to WS) holding every image of a prompt written under this layout."""
    return f"generations/p{int(prompt_id) // FILES_PER_FOLDER}/{int(prompt_id)}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Workspace:
    """A handle on a workspace directory. Cheap to create; opens connections on demand."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.db_path = self.root / DB_NAME

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def init(cls, root: str | Path) -> "Workspace":
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise WorkspaceError(f"{root} exists and is not a folder; choose another workspace path")
        root.mkdir(parents=True, exist_ok=True)
        ws = cls(root)
        for sub in ("generations", "training", "index", "cache"):
            (ws.root / sub).mkdir(exist_ok=True)
        ws.migrate()
        return ws

    @classmethod
    def open(cls, root: str | Path) -> "Workspace":
        ws = cls(root)
        if not ws.db_path.is_file():
            raise WorkspaceError(f"{root} is not a memaudit workspace (no {DB_NAME}); create it with `memaudit init {root}`")
        ws.migrate()
        return ws

    def migrate(self) -> None:
        with self.connect() as con:
            con.execute("CREATE TABLE IF NOT EXISTS migrations(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
            have = con.execute("SELECT COALESCE(MAX(version), 0) FROM migrations").fetchone()[0]
            if have > SCHEMA_VERSION:
                raise WorkspaceError(
                    f"{self.root} was written by a newer memaudit (schema {have}, this one knows {SCHEMA_VERSION}); upgrade memaudit to open it")
            for version in range(have + 1, SCHEMA_VERSION + 1):
                name, sql = MIGRATIONS[version - 1]
                con.execute("BEGIN IMMEDIATE")
                try:
                    # re-check inside the write lock: another process may have migrated meanwhile
                    if con.execute("SELECT 1 FROM migrations WHERE version = ?", (version,)).fetchone():
                        con.execute("ROLLBACK")
                        continue
                    for statement in _split_sql(sql):
                        con.execute(statement)
                    con.execute("INSERT INTO migrations(version, name, applied_at) VALUES (?, ?, ?)", (version, name, now()))
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise

    def schema_version(self) -> int:
        with self.connect() as con:
            return con.execute("SELECT COALESCE(MAX(version), 0) FROM migrations").fetchone()[0]

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection in autocommit mode; use ``transaction()`` for writes."""
        try:
            con = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        except sqlite3.OperationalError as e:
            raise WorkspaceError(f"cannot open {self.db_path}: {e}") from None
        try:
            con.row_factory = sqlite3.Row
            try:
                con.execute("PRAGMA busy_timeout = 30000")
                con.execute("PRAGMA journal_mode = WAL")  # creates the -wal and -shm files: fails on a full disk
                con.execute("PRAGMA synchronous = NORMAL")
                con.execute("PRAGMA foreign_keys = ON")
            except sqlite3.OperationalError as e:
                raise WorkspaceError(f"cannot open {self.db_path} ({e}); check that its disk has free space and "
                                     "the folder is writable, then run the same command again") from None
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken with BEGIN IMMEDIATE, retried while another writer holds the lock."""
        with self.connect() as con:
            delay = 0.05
            for attempt in range(60):
                try:
                    con.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) and "busy" not in str(e):
                        raise
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
            else:
                raise WorkspaceError(f"{self.db_path} stayed locked by another writer; try again")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException as e:
                if con.in_transaction:  # SQLite may have rolled back already (a full disk does)
                    try:
                        con.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if isinstance(e, sqlite3.OperationalError) and ("full" in str(e) or "disk I/O" in str(e)):
                    raise WorkspaceError(f"cannot write {self.db_path} ({e}); free some disk space and run the same "
                                         "command again (what was written before is kept)") from None
                raise

    # ------------------------------------------------------------------ paths
    def rel(self, path: str | Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def resolve(self, relpath: str) -> Path:
        """The absolute path of a workspace file; refuses anything that would lead outside the workspace."""
        p = (self.root / relpath).resolve()
        if p != self.root and self.root not in p.parents:
            raise WorkspaceError(f"{relpath!r} points outside the workspace; refused")
        return p

    # ------------------------------------------------------------------ settings
    def get_setting(self, name: str) -> Any:
        spec = config.SETTINGS[name]
        with self.connect() as con:
            row = con.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return spec.default if row is None else spec.check(json.loads(row["value"]))

    def set_setting(self, name: str, value: Any) -> None:
        value = config.check(name, value)
        with self.transaction() as con:
            con.execute("INSERT INTO settings(name, value, updated_at) VALUES (?, ?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                        (name, json.dumps(value), now()))

    def settings(self) -> dict[str, Any]:
        """Every setting with the workspace's override applied."""
        with self.connect() as con:
            rows = {r["name"]: json.loads(r["value"]) for r in con.execute("SELECT name, value FROM settings")}
        return {name: (spec.check(rows[name]) if name in rows else spec.default) for name, spec in config.SETTINGS.items()}

    # ------------------------------------------------------------------ prompts & models
    def prompt_id(self, text: str | None, con: sqlite3.Connection | None = None) -> int:
        text = text or ""
        if con is None:
            with self.transaction() as c:
                return self.prompt_id(text, c)
        con.execute("INSERT OR IGNORE INTO prompts(text) VALUES (?)", (text,))
        return con.execute("SELECT id FROM prompts WHERE text = ?", (text,)).fetchone()["id"]

    def model_id(self, ref: str, kind: str, pipeline_class: str, weights_hash: str, scheduler: str) -> int:
        with self.transaction() as con:
            con.execute("INSERT OR IGNORE INTO models(ref, kind, pipeline_class, weights_hash, scheduler, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (ref, kind, pipeline_class, weights_hash, scheduler, now()))
            return con.execute("SELECT id FROM models WHERE ref = ? AND weights_hash = ?", (ref, weights_hash)).fetchone()["id"]

    # ------------------------------------------------------------------ counts
    def counts(self) -> dict[str, int]:
        with self.connect() as con:
            q = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
            return {
                "models": q("SELECT COUNT(*) FROM models"),
                # a probe per prompt, not a pass over every generation
                "prompts": q("SELECT COUNT(*) FROM prompts p WHERE EXISTS (SELECT 1 FROM generations g WHERE g.prompt_id = p.id)"),
                "generations": q("SELECT COUNT(*) FROM generations"),
                "training_images": q("SELECT COUNT(*) FROM training_images"),
                "audit_runs": q("SELECT COUNT(*) FROM audit_runs WHERE status = 'done'"),
                "label_events": q("SELECT COUNT(*) FROM label_events"),
            }


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (no literal or comment in a migration contains ';')."""
    return [stmt.strip() for stmt in script.split(";") if stmt.strip()]
