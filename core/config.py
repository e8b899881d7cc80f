"""Every setting of memaudit, declared once: name, default, type, help.

The CLI builds its flags from these declarations and the dashboard builds its
sliders from them, so a default lives in exactly one place. Values the paper
leaves open (the clique edge threshold, sampler settings) are settings with a
documented default, never hidden constants. A workspace may override a default
(``Workspace.set_setting``), for example after calibration against human labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    type: type
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    parse: Callable[[Any], Any] | None = None  # normalises a value, raising ValueError when it is malformed

    def check(self, value: Any) -> Any:
        """Coerce ``value`` to this setting's type, raising ValueError naming the setting."""
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} must be a {self.type.__name__}, got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.name} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{self.name} must be <= {self.maximum}, got {value!r}")
        if self.parse is not None:
            value = self.parse(value)
        return value


# The tau curve (largest clique at every tau, for the dashboard's slider) is computed on a grid
# of this step from 0 to TAU_MAX, plus the run's own tau; edge_threshold cannot exceed TAU_MAX,
# so every tau a run or a slider can ask for is one the curve covers.
TAU_MAX = 0.3
TAU_STEP = 0.005

# Unconditional generations are judged one by one; a run stores as candidates the
# UNCONDITIONAL_CANDIDATES nearest to extraction (lowest relative L2), or every extracted one when more.
UNCONDITIONAL_CANDIDATES = 100
# The audit decodes one prompt's generations at once (its clique search needs all of them); the
# generations of an unconditional model, judged one by one, are decoded and searched in chunks of
# at most this many float32 bytes at the working size, so its memory does not grow with their number.
AUDIT_CHUNK_BYTES = 16 << 20
# Candidate ranking (lower ranks first): flagged cliques by mean distance (the paper's order), below
# RANK_FLAGGED_BELOW; the unflagged after them, larger cliques first
# (1 + RANK_SIZE_WEIGHT / size + RANK_DISTANCE_WEIGHT * min(mean, 1)), so a lone generation never
# outranks a clique of six; unconditional candidates extracted first, then by relative L2.
RANK_FLAGGED_BELOW = 0.999999
RANK_SIZE_WEIGHT = 0.5
RANK_DISTANCE_WEIGHT = 0.49

# Where `memaudit dashboard` and `memaudit demo --open` serve by default (--port overrides it;
# .streamlit/config.toml holds the same value for `streamlit run dashboard/app.py`).
DASHBOARD_PORT = 8501
# Most ids bound in one SQLite `IN (?, ?, ...)` query; longer lists are sent in chunks of this
# many (SQLite before 3.32 refuses more than 999 variables in one statement).
SQLITE_MAX_VARIABLES = 900


def parse_grids(text: str) -> str:
    """'1, 2,4 ,8' -> '1,2,4,8': distinct positive grids, ascending ('' for none)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        grids = sorted({int(p) for p in parts})
    except ValueError:
        raise ValueError(f"grid_choices must be grids separated by commas, like 1,2,4,8; got {text!r}") from None
    if any(g < 1 or g > 64 for g in grids):
        raise ValueError(f"grid_choices must hold grids from 1 to 64, got {text!r}")
    return ",".join(map(str, grids))


def _parse_ray_address(text: str) -> str:
    from .cluster import parse_address

    return parse_address(text)


def grid_list(text: str) -> list[int]:
    return [int(p) for p in parse_grids(text).split(",") if p]


_SETTINGS = [
    # --- the attack (PAPER.md, "The generate-and-filter attack") ---
    Setting("edge_threshold", 0.1, float,
            "tau: two generations of one prompt are linked when their tiled L2 is <= tau. "
            "Not published by the paper; reimplementations use 0.05-0.15. Calibrate against labels. "
            "At most 0.3: beyond it novel images link and the largest clique measures nothing.",
            0.0, TAU_MAX),
    Setting("min_clique", 10, int,
            "k: a prompt is flagged as memorised when its largest clique has at least this many members.",
            2, None),
    Setting("group_min_size", 3, int,
            "After the largest clique, further disjoint clique groups are reported down to this size, "
            "so a prompt that copies two training images shows both.", 2, None),
    Setting("max_groups", 10, int, "At most this many clique groups are reported per prompt.", 1, None),
    Setting("clique_node_budget", 500_000, int,
            "Search steps allowed for one exact largest-clique search (one clique group, or one tau of the "
            "curve; roughly 10 s on 2 CPU cores). Realistic graphs need a few thousand; a search the budget "
            "stops keeps the largest clique found, and the prompt is reported as a lower bound "
            "(clique_exact false), not as exact.", 1, None),
    Setting("audit_workers", -1, int,
            "Processes that compute the tau curves (largest clique at every tau, for the sliders) beside the "
            "audit's main loop. -1: one per CPU core (at most 8) when prompts have 100 generations or more; "
            "0: none, all in the audit's own process.", -1, 64),
    Setting("audit_device", "cpu", str,
            "Where the audit computes image distances (between generations, and to training images): cpu, cuda "
            "(an NVIDIA GPU: the same computation, identical images still exactly 0; `make gpu-check` compares it "
            "with the CPU's), or auto (cuda when one is usable, else cpu). Clique search and tau curves run on the "
            "CPU either way.",
            choices=("cpu", "cuda", "auto")),
    Setting("grid", 4, int,
            "G: tiled L2 splits each image into a G x G grid of tiles and takes the maximum over tile "
            "positions of the normalised L2. G must divide the working size.", 1, 64),
    Setting("grid_choices", "1,2,4,8", str,
            "Tile grids the audit also caches, besides G, for the dashboard's grid slider: those dividing the "
            "working size. One pass of distance products serves them all; each adds its tau curve to the audit "
            "time and its distance matrices to the cache. '' caches G alone.", parse=parse_grids),
    Setting("delta", 0.15, float,
            "(l2, delta)-extraction: a candidate extracts a training image when their normalised L2 "
            "is <= delta (the paper uses 0.15 at 512 x 512).", 0.0, 1.0),
    Setting("neighbours", 10, int,
            "Nearest training images shown and cached for each generation, all measured exactly; the first is "
            "the certified nearest in the whole training set.", 1, 1000),
    Setting("nearest_budget", 5000, int,
            "Exact distances the certified nearest-neighbour search may compute per generation. Pooled-pixel "
            "lower bounds prune the training set; a generation whose search the budget stops is reported as "
            "not certified (nearest_certified false) with a lower bound on its true nearest distance.", 1, None),
    Setting("embedder", "pixel", str,
            "Embedder for the training index and the neighbours' similarity column: 'pixel' (downsampled "
            "pixels) or 'clip' (open_clip image embeddings, cosine). The extraction verdict never depends "
            "on it: nearest training images are found by certified pixel L2.",
            choices=("pixel", "clip")),
    Setting("relative_alpha", 0.5, float, "alpha of the relative L2 criterion (unconditional models).", 0.0, None),
    Setting("relative_n", 50, int, "n: the relative L2 denominator averages over the n nearest training images.", 1, None),
    Setting("working_size", 0, int,
            "Distances are computed at a working resolution S x S: each image is centre-cropped to a "
            "square on its short side and resized (area filter) to S. 0 means the most common "
            "generation size in the workspace.", 0, 4096),
    Setting("duplicate_threshold", 0.1, float,
            "Two training images are near-duplicates when their normalised L2 at duplicate_size x duplicate_size "
            "is <= this (measured exactly). The duplicate count k of an image is the number of training images, "
            "itself included, within this of it; not the size of a chain of look-alikes.", 0.0, 1.0),
    Setting("duplicate_size", 64, int,
            "Working size S of the duplicate counts: each training image is centre-cropped to a square and "
            "resized (area filter) to S x S before the exact L2. Pooled 8 x 8 and 16 x 16 copies of these "
            "arrays prune candidates (true lower bounds); a change recomputes every count.", 16, 512),
    Setting("duplicate_clip_similarity", 0.0, float,
            "When above 0, two training images within duplicate_threshold also need a CLIP cosine similarity "
            "of at least this to count as duplicates (the paper's prompt selection found near-duplicates with "
            "CLIP embeddings). Needs clip_pretrained. 0: pixels alone.", 0.0, 1.0),
    # --- the training index ---
    Setting("pixel_size", 16, int,
            "Side of the downsampled image used by the pixel embedder (3 x S x S values).", 4, 128),
    Setting("index_exact_max", 50_000, int,
            "Training sets up to this size use an exact faiss index; larger ones an IVF index "
            "whose candidates are re-ranked exactly.", 1, None),
    Setting("index_nprobe", 16, int,
            "IVF lists probed per query when the training set is larger than index_exact_max; "
            "higher finds more true neighbours but is slower.", 1, None),
    Setting("clip_model", "ViT-B-32", str, "open_clip architecture for the 'clip' embedder."),
    Setting("clip_pretrained", "", str,
            "open_clip weights: a local checkpoint file, or a pretrained tag (needs network once)."),
    # --- generation ---
    Setting("per_prompt", 500, int, "Images generated per prompt, each from its own seed.", 1, None),
    Setting("steps", 50, int, "Sampling steps (the paper does not publish them).", 1, 1000),
    Setting("guidance", 7.5, float, "Classifier-free guidance scale for text-to-image models.", 0.0, 100.0),
    Setting("batch_size", 16, int, "Images per pipeline call.", 1, 4096),
    Setting("seed", 0, int, "First seed: image j of every prompt uses seed + j.", 0, 2**63 - 1),
    Setting("device", "auto", str, "cuda, mps, cpu, or auto (the first available of those).",
            choices=("auto", "cuda", "mps", "cpu")),
    # --- running on a Ray cluster (core/cluster.py; needs `pip install 'memaudit[ray]'`) ---
    Setting("ray_address", "", str,
            "Ray cluster that generation and the audit run on: '' for none (this process alone), auto (the cluster running on "
            "this machine), local (a private instance with this machine's CPUs and GPUs) or HOST:PORT (the head "
            "node's address that `ray start --head` prints).", parse=_parse_ray_address),
    Setting("ray_workers", 0, int,
            "Ray actors that hold the pipeline and sample (or audit): 0 for one per GPU of the cluster (one per CPU "
            "on a cluster without GPUs, or with --device cpu); at most that many.", 0, None),
    # --- triage (core/triage.py): scoring prompts before generating ---
    Setting("triage_method", "noise-norm", str,
            "How triage scores a prompt: 'noise-norm' (Wen et al. 2024: magnitude of the text-conditional noise "
            "prediction, eps(x_t, prompt) - eps(x_t, empty prompt)) or 'one-step' (Webster 2023: distance between "
            "the one-step denoised sample and the starting noise).", choices=("noise-norm", "one-step")),
    Setting("triage_steps", 1, int,
            "Denoising steps triage scores, from the start of the sampling grid (Wen et al. report good separation "
            "from the first step alone).", 1, 1000),
    Setting("triage_samples", 4, int,
            "Starting noises per prompt that triage averages over (sample j uses seed + j).", 1, 4096),
    # --- the inpainting attack (PAPER.md, Figure 12) ---
    Setting("inpaint_mask", "left", str,
            "Region the model must reconstruct: left, right, top or bottom half, center (the central square of "
            "half the side), or a PNG mask file at the model's resolution (white = reconstruct). The paper masks the left half."),
    Setting("inpaint_samples", 8, int,
            "Completions per image, each from its own seed (sample j uses seed + j).", 1, 10_000),
    Setting("inpaint_steps", 0, int,
            "Sampling steps of each completion; 0 means the model's own default (the step grid memaudit's models "
            "were trained on, else 50).", 0, 1000),
    Setting("inpaint_score_draws", 2, int,
            "Noise draws per timestep of the denoising loss that ranks one image's completions (the attacker keeps "
            "the completion the model finds most likely). The same draws serve every completion of an image.", 1, 64),
    Setting("inpaint_score_max_t", 0.3, float,
            "The ranking loss is averaged over the sampling grid's timesteps up to this fraction of the noise "
            "schedule (the paper's membership signal lies at low t, about 100 of 1000).", 0.0, 1.0),
    # --- membership inference (core.membership) ---
    Setting("mia_attack", "loss", str,
            "Membership attack: 'loss' (the training loss at one timestep) or 'lira' (likelihood ratio against "
            "shadow models trained on random halves of a pool; online and offline).", choices=("loss", "lira")),
    Setting("mia_timestep", 100, int,
            "Timestep t of the loss attack (of the scheduler's training timesteps; the paper found about 100 of "
            "1000 best). Models trained on a timestep grid should be attacked on it.", 0, None),
    Setting("mia_noise_draws", 8, int, "Seeded noise draws the loss is averaged over, the same for every image.", 1, 4096),
    Setting("mia_seed", 0, int, "Seed of the first noise draw (draw k uses seed + k).", 0, 2**63 - 1),
    Setting("mia_batch_size", 64, int, "Denoiser inputs per forward pass in the membership attacks.", 1, 65536),
    Setting("shadow_count", 8, int, "LiRA shadow models: each image is IN for half of them (even).", 2, 1024),
]

SETTINGS: dict[str, Setting] = {s.name: s for s in _SETTINGS}


def default(name: str) -> Any:
    return SETTINGS[name].default


def check(name: str, value: Any) -> Any:
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(SETTINGS))}")
    return SETTINGS[name].check(value)
