"""Frozen records that cross module boundaries (store <-> engine <-> dashboard)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LABELS = ("exact_copy", "near_copy", "not_memorized", "unsure")
# Labels that count as "memorised" when human labels are used as ground truth.
POSITIVE_LABELS = ("exact_copy", "near_copy")


@dataclass(frozen=True)
class Model:
    id: int
    ref: str  # local directory or hub id, as the user gave it
    kind: str  # text2image | class | unconditional | imported
    pipeline_class: str
    weights_hash: str
    scheduler: str


@dataclass(frozen=True)
class Generation:
    id: int
    path: str  # relative to the workspace
    prompt_id: int
    prompt: str | None  # None for unconditional generations
    seed: int | None
    model_id: int | None
    width: int
    height: int
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    source: str = "generate"  # generate | import


@dataclass(frozen=True)
class TrainingImage:
    id: int
    path: str  # relative to the workspace
    source_path: str  # where it was ingested from
    caption: str | None
    sha256: str
    width: int
    height: int
    duplicate_count: int = 1
    duplicate_group: int | None = None


@dataclass(frozen=True)
class AuditParams:
    edge_threshold: float
    min_clique: int
    group_min_size: int
    max_groups: int
    grid: int
    delta: float
    neighbours: int
    embedder: str
    relative_alpha: float
    relative_n: int
    working_size: int
    grid_choices: str = ""  # extra grids cached for re-thresholding ('' in runs made before the grid slider)
    nearest_budget: int = 0  # exact distances per generation for the certified search (0: a run made before it)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CliqueGroup:
    """One clique of near-identical generations (indices into the prompt's generation list)."""
    members: tuple[int, ...]
    medoid: int
    mean_distance: float
    exact: bool = True  # False: a search budget stopped the search, so a larger clique may exist

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class Candidate:
    id: int
    run_id: int
    prompt: str | None
    prompt_id: int
    group_rank: int  # 0 = the prompt's largest clique
    clique_size: int
    mean_distance: float
    flagged: bool
    medoid_generation_id: int
    medoid_path: str
    nearest_training_id: int | None
    nearest_training_path: str | None
    l2: float | None
    tiled_l2: float | None
    relative_l2: float | None
    extracted: bool
    members: tuple[int, ...] = field(default=())
    clique_exact: bool = True  # False: a search budget stopped the clique search; the size is a lower bound
    nearest_certified: bool | None = None  # None in runs made before certified search
    nearest_lower: float | None = None  # lower bound of the true nearest distance
    exact_distances: int | None = None


@dataclass(frozen=True)
class LabelEvent:
    id: int
    candidate_id: int | None
    generation_id: int
    training_id: int | None
    reviewer: str
    label: str | None  # None for an undo event
    note: str
    created_at: str
    undoes: int | None = None
