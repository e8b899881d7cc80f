"""Sampling images from a diffusers pipeline, one recorded seed per image, resumable.

Seeds: image j (0-based) of every prompt is drawn with seed ``s_j = seed + j`` from its
own ``torch.Generator("cpu").manual_seed(s_j)``; a batch passes the list of its images'
generators, so each image's starting noise (and, for stochastic samplers, every noise
draw) depends on its own seed only, never on the batch it was drawn in. Generators live
on the CPU so that the same seed gives the same starting noise on every device.

Reproducibility: regenerating one row alone (``regenerate``) on the device and dtype
recorded in the row gives the stored pixels exactly when the row was generated with
batch_size 1. Batched rows match to within one 8-bit level: floating-point kernels are
not batch-invariant (a convolution over 32 images rounds differently from the same
convolution over 1), so the float output differs by about 1e-6 and a value lying that
close to a rounding boundary of the 8-bit image comes out one level apart. Measured on
the CPU with tiny pipelines (32 images a batch, 2 and 10 steps): at most 1 level, on at
most 4 of 24,576 values (0.02%), in 0 to 4 of the 32 images; none at all for some
pipelines. With Stable Diffusion 1.5's blocks at 64 x 64 (the GPU check's dry run: batch 2,
4 PNDM steps) far more values move, 766 of 12,288 (6%), still by one level at most. The
row's params record ``batch_size`` and ``batch_position``.

Resume: a generation is identified by (model, prompt, seed, steps, guidance, width,
height); ``generate`` skips those already stored, so a rerun after an interruption or
cancel only does the rest, losing at most the batch in flight. Each image is written
with ``save_png_atomic`` before its row is inserted, so a row never points to a
missing file.

Model kinds: ``text2image`` pipelines take ``prompt``; ``class`` pipelines (DiT) take
``class_labels`` and each prompt is a class id or a class name from the model's
``id2label``; ``unconditional`` pipelines (DDPM, DDIM) take neither and are stored with
prompt text ''.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from . import config, tempfiles
from .errors import InputError, MemauditError, ModelError, WorkspaceError
from .images import png_bytes, save_png_atomic, to_uint8
from .textfiles import decode_utf8, read_utf8
from .store import Workspace, generation_folder, now, prompt_folder

KINDS = ("text2image", "class", "unconditional")
# Files whose bytes make up a model's weights (hashed into ``weights_hash``).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".onnx_data", ".pb", ".h5", ".gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Call parameters every supported pipeline may leave required; any other required one
# (an input image, a mask) means the pipeline cannot generate from prompts alone.
_ALLOWED_REQUIRED = {"prompt", "class_labels"}


@dataclass(frozen=True)
class LoadedPipeline:
    pipeline: Any
    kind: str  # text2image | class | unconditional
    pipeline_class: str
    weights_hash: str
    scheduler: str  # class name
    dtype: str  # "float32" | "float16"
    device: str
    ref: str  # normalised reference: absolute folder for a local model, the id for a hub model
    path: Path  # the local folder the weights were read from (a hub snapshot for a hub id)
    revision: str | None = None  # hub commit of the snapshot, None for a local folder
    size: tuple[int, int] | None = None  # (height, width) of the output, when the model's config states it
    labels: dict[str, int] = field(default_factory=dict)  # class name -> class id (class kind)
    num_classes: int | None = None
    call_params: frozenset[str] = frozenset()

    @property
    def uses_guidance(self) -> bool:
        return "guidance_scale" in self.call_params


@dataclass(frozen=True)
class GenerateReport:
    planned: int  # len(prompts) x per_prompt
    skipped_existing: int  # already in the workspace, not regenerated
    generated: int  # generated and stored by this call
    seconds: float
    stopped: bool = False  # should_stop() ended the run early; rerun to finish
    model_id: int | None = None


# ---------------------------------------------------------------------------------- devices
def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' if a CUDA GPU is usable, else 'mps' if available, else 'cpu'."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or re.fullmatch(r"cuda:\d+", name):
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} was asked for but no CUDA GPU is usable here; use --device cpu or auto")
        return name
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise InputError("device 'mps' was asked for but Apple MPS is not available here; use --device cpu or auto")
        return name
    raise InputError(f"unknown device {name!r}; use auto, cuda, mps or cpu")


# ---------------------------------------------------------------------------------- loading
def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def _local_folder(ref: str) -> tuple[Path, str, str | None]:
    """(folder holding the model, normalised ref, hub revision) for a local folder or a hub id."""
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{ref} is a file, not a model folder; pass the folder that holds model_index.json")
        return p.resolve(), str(p.resolve()), None
    if not _HUB_ID.match(ref):
        raise ModelError(f"no such model folder: {ref}; pass a folder written by save_pretrained or a Hugging Face hub id like org/name")
    from diffusers import DiffusionPipeline

    offline = _offline()
    try:
        folder = Path(DiffusionPipeline.download(ref, local_files_only=offline))
    except Exception as e:  # every way a download fails is about the network, the id or the cache
        if type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError") and not offline:
            raise ModelError(f"{ref} is not a model on the Hugging Face Hub (or it is private or gated); check the id or pass a local directory") from e
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        raise ModelError(f"cannot load {ref}: it is not in the local Hugging Face cache and {why}; "
                         "pass a local directory holding the model (written by save_pretrained)") from e
    revision = folder.name if folder.parent.name == "snapshots" else None
    return folder, ref, revision


_HASH_CACHE: dict[tuple, str] = {}


def weights_hash(folder: str | Path) -> str:
    """sha256 over the model's weight files (suffixes in WEIGHT_SUFFIXES), sorted by relative path.

    For each file, in order of its POSIX relative path: the path's UTF-8 bytes, a NUL byte,
    then the file's bytes. Symlinks (hub snapshots) are followed. Cached per process by
    (relative path, size, mtime) of every file, so a second call on an unchanged folder is free.
    """
    folder = Path(folder)
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*")
                   if p.name.lower().endswith(WEIGHT_SUFFIXES) and p.is_file())
    key = (str(folder.resolve()),) + tuple((rel, p.stat().st_size, p.stat().st_mtime_ns) for rel, p in files)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    h = hashlib.sha256()
    for rel, p in files:
        h.update(rel.encode("utf-8") + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def _pipeline_class(class_name: Any) -> tuple[type, bool]:
    """The class to load with, and whether it is one of memaudit's own pipelines (core.demo.model).

    Saved folders name their class only (``_class_name`` in ``model_index.json``), never its
    module, so models saved before the pipelines moved into ``core.demo`` load the same.
    """
    import diffusers

    from .demo import model as own

    if isinstance(class_name, str):
        if isinstance(getattr(own, class_name, None), type):
            return getattr(own, class_name), True
        cls = getattr(diffusers, class_name, None)
        if isinstance(cls, type):
            return cls, False
    return diffusers.DiffusionPipeline, False


def _dtype_keyword() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype``; use whichever this version reads."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' per-component loading bars (restored afterwards)."""
    from diffusers.utils import logging as dlog

    was = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover - transformers is a dependency
        tlog = None
    twas = tlog.is_progress_bar_enabled() if tlog is not None else False
    if tlog is not None:
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            dlog.enable_progress_bar()
        if tlog is not None and twas:
            tlog.enable_progress_bar()


def _output_size(pipe: Any) -> tuple[int, int] | None:
    """(height, width) the pipeline makes by default: the denoiser's sample_size x the VAE's scale factor."""
    den = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    cfg = getattr(den, "config", None)
    size = cfg.get("sample_size") if cfg is not None else None
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    vae = getattr(pipe, "vae", None)
    factor = 1
    if vae is not None:
        factor = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(vae.config.get("block_out_channels", [0])) - 1)
    return int(h) * int(factor), int(w) * int(factor)


def load_pipeline(ref: str, device: str, accept: frozenset[str] = frozenset()) -> LoadedPipeline:
    """Load a diffusers pipeline from a local folder or hub id onto ``device`` (fp16 on CUDA).

    ``accept`` names further call parameters the pipeline may require (an inpainting pipeline's
    ``image`` and ``mask_image`` for core.inpaint); any other required one is refused.

    Safety checkers are removed (``safety_checker=None``, ``requires_safety_checker=False``):
    they replace flagged images by black ones, and the audit must see what the model makes.
    """
    import torch

    device = resolve_device(device)
    folder, norm_ref, revision = _local_folder(ref)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelError(f"{ref} is not a diffusers model folder (no model_index.json); pass a folder written by save_pretrained or a hub id")
    try:
        model_index = json.loads(index_file.read_text(encoding="utf-8"))
        if not isinstance(model_index, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{index_file} is not valid JSON ({e}); the model folder is damaged") from None
    cls, own = _pipeline_class(model_index.get("_class_name"))
    init_params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    if "safety_checker" in model_index or "safety_checker" in init_params:
        kwargs["safety_checker"] = None
    if "requires_safety_checker" in model_index or "requires_safety_checker" in init_params:
        kwargs["requires_safety_checker"] = False
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    kwargs[_dtype_keyword()] = dtype
    try:
        with _quiet_loading():
            pipe = cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except MemauditError:
        raise
    except Exception as e:  # missing or damaged component files, unknown classes, missing libraries
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the diffusers pipeline in {ref} ({first}); check that the folder is complete") from e
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    call = inspect.signature(pipe.__call__).parameters
    required = {n for n, p in call.items()
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if required - _ALLOWED_REQUIRED - accept:
        raise ModelError(f"{type(pipe).__name__} in {ref} needs {', '.join(sorted(required - _ALLOWED_REQUIRED - accept))} as input; "
                         "memaudit generates from prompts, class labels or nothing, so use a text-to-image, class-conditional or unconditional model")
    kind = "text2image" if "prompt" in call else "class" if "class_labels" in call else "unconditional"
    labels: dict[str, int] = {}
    num_classes = None
    if kind == "class":
        labels = dict(getattr(pipe, "labels", None) or {})
        id2label = model_index.get("id2label") or {}
        for key, names in id2label.items():
            for name in str(names).split(","):
                if name.strip():
                    labels.setdefault(name.strip(), int(key))
        den = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        cfg = getattr(den, "config", None) or {}
        num_classes = cfg.get("num_embeds_ada_norm") or cfg.get("num_class_embeds") or (max(labels.values()) + 1 if labels else None)
    scheduler = getattr(pipe, "scheduler", None)
    return LoadedPipeline(
        pipeline=pipe, kind=kind, pipeline_class=type(pipe).__name__, weights_hash=weights_hash(folder),
        scheduler=type(scheduler).__name__ if scheduler is not None else "", dtype=str(dtype).replace("torch.", ""),
        device=device, ref=norm_ref, path=folder, revision=revision, size=_output_size(pipe), labels=labels,
        num_classes=int(num_classes) if num_classes else None, call_params=frozenset(call),
    )


# ---------------------------------------------------------------------------------- prompts
PROMPTS_HINT = "save it as UTF-8 with one prompt per line"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line: stripped, blank lines dropped, first occurrence kept, order kept."""
    text = read_utf8(path, "prompts file", "pass a text file with one prompt per line", PROMPTS_HINT)
    return _prompt_lines(text, str(path))


def parse_prompts(data: bytes, name: str) -> list[str]:
    """``read_prompts`` for the bytes of an uploaded file called ``name``: the same prompts and errors."""
    return _prompt_lines(decode_utf8(data, name, PROMPTS_HINT), name)


def _prompt_lines(text: str, name: str) -> list[str]:
    prompts = _unique(line.strip() for line in text.splitlines())
    if not prompts:
        raise InputError(f"{name} holds no prompts; write one prompt per line")
    return prompts


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        if item and item not in seen:
            seen[item] = None
    return list(seen)


def class_label(loaded: LoadedPipeline, text: str) -> int:
    """A class-conditional prompt -> class id: an integer id, or a name from the model's id2label."""
    t = text.strip()
    if re.fullmatch(r"\d+", t):
        label = int(t)
        if loaded.num_classes is None or label < loaded.num_classes:
            return label
    elif t in loaded.labels:
        return loaded.labels[t]
    else:
        lowered = {k.lower(): v for k, v in loaded.labels.items()}
        if t.lower() in lowered:
            return lowered[t.lower()]
    span = f"an id from 0 to {loaded.num_classes - 1}" if loaded.num_classes else "a class id"
    names = f" or a name such as {', '.join(repr(n) for n in list(loaded.labels)[:3])}" if loaded.labels else ""
    raise InputError(f"prompt {text!r} is not a class of {loaded.ref}; give {span}{names}")


def conditioning(loaded: LoadedPipeline, prompts: Sequence[str] | None) -> list[tuple[str, int | None]]:
    """(prompt text to store, class id or None) for each distinct prompt, checked against the model's kind."""
    prompts = [p.strip() for p in (prompts or [])]
    if loaded.kind == "unconditional":
        if any(prompts):
            raise InputError(f"{loaded.ref} is an unconditional model and takes no prompts (got {prompts[0]!r}...); omit the prompts")
        return [("", None)]
    # '' stays a prompt for text-to-image models: sampling with the empty prompt is the model's
    # unconditional mode, stored (like unconditional models) with prompt text ''
    texts = list(dict.fromkeys(prompts))
    if not texts:
        what = "class ids or names" if loaded.kind == "class" else "prompts"
        raise InputError(f"{loaded.ref} is a {loaded.kind} model and needs {what}; pass a file with one per line")
    if loaded.kind == "class":
        return [(t, class_label(loaded, t)) for t in texts]
    check = getattr(loaded.pipeline, "caption_ids", None)  # pipelines with a fixed vocabulary (core.demo.model)
    if callable(check):
        check(texts)
    return [(t, None) for t in texts]


# ---------------------------------------------------------------------------------- sampling
def sample(loaded: LoadedPipeline, conditions: Sequence[tuple[str, int | None]], seeds: Sequence[int],
           *, steps: int, guidance: float | None) -> np.ndarray:
    """One pipeline call: image i from ``conditions[i]`` and its own CPU generator seeded ``seeds[i]``.

    Returns float32 (N, H, W, 3) in [0, 1].
    """
    import torch

    if len(conditions) != len(seeds):
        raise ValueError(f"{len(conditions)} conditions for {len(seeds)} seeds")
    n = len(seeds)
    kwargs: dict[str, Any] = {
        "num_inference_steps": steps,
        "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        "output_type": "np",
    }
    if loaded.kind == "text2image":
        kwargs["prompt"] = [c[0] for c in conditions]
    elif loaded.kind == "class":
        kwargs["class_labels"] = [int(c[1]) for c in conditions]  # type: ignore[arg-type]
    else:
        kwargs["batch_size"] = n
    if guidance is not None and loaded.uses_guidance:
        kwargs["guidance_scale"] = float(guidance)
    if loaded.size is not None and {"height", "width"} <= loaded.call_params:
        kwargs["height"], kwargs["width"] = loaded.size
    with torch.inference_mode():
        out = loaded.pipeline(**kwargs)
    images = getattr(out, "images", out[0] if isinstance(out, tuple) else out)
    return _as_batch(images, n)


def _as_batch(images: Any, n: int) -> np.ndarray:
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().float().cpu().numpy()
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)
    elif isinstance(images, list):
        images = np.stack([np.asarray(im, dtype=np.float32) / (255.0 if not isinstance(im, np.ndarray) else 1.0) for im in images])
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
        raise ValueError(f"pipeline returned images of shape {images.shape}, expected ({n}, H, W, 3)")
    bad = int((~np.isfinite(images).reshape(n, -1).all(axis=1)).sum())
    if bad:  # stored as they are, NaN pixels would become black images that form a false clique
        raise ModelError(f"the pipeline produced non-finite pixels (NaN or inf) in {bad} of {n} images, which are not stored; "
                         "its weights may be damaged, or its VAE overflows in float16 (try --device cpu)")
    return np.clip(images, 0.0, 1.0)


# ---------------------------------------------------------------------------------- storing
def free_path(ws: Workspace, folder: str, stem: str) -> str:
    """``folder/stem.png``, or ``folder/stem-2.png``... when another row (identical pixels) already uses it."""
    with ws.connect() as con:
        for k in range(1, 10_000):
            rel = f"{folder}/{stem}.png" if k == 1 else f"{folder}/{stem}-{k}.png"
            if con.execute("SELECT 1 FROM generations WHERE path = ?", (rel,)).fetchone() is None:
                return rel
    raise RuntimeError(f"no free file name for {folder}/{stem}")


def _disk_error(e: OSError, what: str) -> MemauditError:
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return WorkspaceError(f"the disk is full while writing {what}; free some space and run the same command again "
                              "(finished images are kept and skipped)")
    return WorkspaceError(f"cannot write {what} ({e.strerror or e}); check the workspace folder's permissions and free space")


def provenance(loaded: LoadedPipeline, *, steps: int, guidance: float | None) -> dict[str, Any]:
    """What every row of one run shares: enough to rebuild the pipeline call exactly."""
    import diffusers
    import torch

    sched = getattr(loaded.pipeline, "scheduler", None)
    sched_config = json.loads(json.dumps(dict(getattr(sched, "config", {}) or {}), default=str))
    return {
        "model_ref": loaded.ref, "model_path": str(loaded.path), "hub_revision": loaded.revision,
        "kind": loaded.kind, "weights_hash": loaded.weights_hash, "pipeline_class": loaded.pipeline_class,
        "scheduler_class": loaded.scheduler, "scheduler_config": sched_config,
        "steps": steps, "guidance": guidance, "dtype": loaded.dtype, "device": loaded.device,
        "generator_device": "cpu", "seed_rule": "seed = base_seed + j for image j of each prompt",
        "diffusers_version": diffusers.__version__, "torch_version": torch.__version__,
    }


class Unit(NamedTuple):
    """One image to make: image ``index`` of a prompt, drawn with ``seed``."""

    prompt_id: int
    text: str  # the prompt as stored ('' for unconditional models)
    label: int | None  # class id (class models)
    index: int  # j: the image's place among the prompt's images
    seed: int  # base seed + j


@dataclass(frozen=True)
class Plan:
    """What a run still has to make, read from the workspace by the one process that writes it."""

    model_id: int
    pending: list[Unit]  # in prompt order, then seed order; a run cuts it into batches in this order
    planned: int  # prompts x per_prompt
    guidance: float | None  # the guidance stored with each row (None: the model takes none)

    @property
    def skipped(self) -> int:
        return self.planned - len(self.pending)


def check_settings(per_prompt: int, steps: int, guidance: float, batch_size: int, seed: int) -> tuple[int, int, float, int, int]:
    """The generation settings checked against their declarations (InputError naming the bad one)."""
    try:
        checked = tuple(config.check(name, value) for name, value in
                        (("per_prompt", per_prompt), ("steps", steps), ("guidance", guidance), ("batch_size", batch_size), ("seed", seed)))
    except ValueError as e:
        raise InputError(f"{e}") from None
    per_prompt, seed = checked[0], checked[4]
    if seed + per_prompt - 1 > 2**63 - 1:
        raise InputError(f"seed {seed} + {per_prompt} images per prompt passes 2**63 - 1; use a smaller seed")
    return checked  # type: ignore[return-value]


def plan(ws: Workspace, loaded: LoadedPipeline, conditions: Sequence[tuple[str, int | None]], per_prompt: int, *,
         steps: int, guidance: float, seed: int) -> Plan:
    """Record the model and the prompts, remove half-written files a killed run left, list the images not yet stored.

    ``loaded`` may be a description without its pipeline (``dataclasses.replace(loaded, pipeline=None)``):
    only its reference, kind, class, weights hash, scheduler name, size and guidance use are read.
    """
    used_guidance = float(guidance) if loaded.uses_guidance else None
    model_id = ws.model_id(loaded.ref, loaded.kind, loaded.pipeline_class, loaded.weights_hash, loaded.scheduler)
    with ws.transaction() as con:
        prompt_ids = [ws.prompt_id(text, con) for text, _ in conditions]
    for pid in prompt_ids:
        # images a killed run left half-written (under this layout or the earlier one)
        tempfiles.remove_stale(ws.root / prompt_folder(pid))
        tempfiles.remove_stale(ws.root / "generations" / str(pid))

    pending: list[Unit] = []
    with ws.connect() as con:
        for pid, (text, label) in zip(prompt_ids, conditions):
            sql = ("SELECT seed FROM generations WHERE source = 'generate' AND model_id = ? AND prompt_id = ? "
                   "AND steps = ? AND guidance IS ? AND seed BETWEEN ? AND ?")
            args: list[Any] = [model_id, pid, steps, used_guidance, seed, seed + per_prompt - 1]
            if loaded.size is not None:
                sql += " AND height = ? AND width = ?"
                args += list(loaded.size)
            have = {r[0] for r in con.execute(sql, args)}
            pending += [Unit(pid, text, label, j, seed + j) for j in range(per_prompt) if seed + j not in have]
    return Plan(model_id=model_id, pending=pending, planned=len(conditions) * per_prompt, guidance=used_guidance)


def sample_batch(loaded: LoadedPipeline, batch: Sequence[Unit], *, steps: int, guidance: float | None) -> np.ndarray:
    """``sample`` for a batch of units, a device out of memory said in one line."""
    try:
        return sample(loaded, [(u.text, u.label) for u in batch], [u.seed for u in batch], steps=steps, guidance=guidance)
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        raise MemauditError(f"{loaded.device} ran out of memory at batch size {len(batch)}; rerun with a smaller "
                            "batch size (finished images are kept and skipped)") from None


def write_images(root: Path, batch: Sequence[Unit], images: np.ndarray, *, model_id: int, base: dict[str, Any],
                 path_for: Callable[[str, str, bytes], str]) -> Iterator[dict[str, Any]]:
    """Encode and write each image of a sampled batch atomically under ``root``; yield its row (not inserted).

    ``path_for(folder, stem, png)`` names the file (relative to ``root``); ``base`` is the run's
    ``provenance``. A row is yielded only once its file is complete, so a caller that inserts
    the rows yielded before a failure never records a missing or partial file.
    """
    steps, guidance = base["steps"], base["guidance"]
    for pos, (unit, image) in enumerate(zip(batch, images)):
        pixels = to_uint8(image)
        data = png_bytes(pixels)  # encoded once: the bytes hashed are the bytes stored
        sha = hashlib.sha256(data).hexdigest()
        rel = path_for(generation_folder(unit.prompt_id, "s", unit.seed), f"{unit.seed}-{sha[:12]}", data)
        try:
            save_png_atomic(data, root / rel)
        except OSError as e:
            raise _disk_error(e, root / rel) from None
        params = dict(base, prompt=unit.text, class_label=unit.label, seed=unit.seed, base_seed=unit.seed - unit.index,
                      index=unit.index, height=int(pixels.shape[0]), width=int(pixels.shape[1]),
                      batch_size=len(batch), batch_position=pos, created_at=now())
        yield {"prompt_id": unit.prompt_id, "model_id": model_id, "seed": unit.seed, "path": rel, "sha256": sha,
               "width": int(pixels.shape[1]), "height": int(pixels.shape[0]), "steps": steps,
               "guidance": guidance, "scheduler": base["scheduler_class"],
               "params": json.dumps(params, sort_keys=True), "created_at": params["created_at"]}


def insert_rows(ws: Workspace, rows: list[dict[str, Any]]) -> int:
    """Insert generation rows in one transaction, skipping any whose resume key is already stored."""
    if not rows:
        return 0
    inserted = 0
    try:
        with ws.transaction() as con:
            for r in rows:
                exists = con.execute(
                    "SELECT 1 FROM generations WHERE source = 'generate' AND model_id = ? AND prompt_id = ? AND seed = ? "
                    "AND steps = ? AND guidance IS ? AND width = ? AND height = ?",
                    (r["model_id"], r["prompt_id"], r["seed"], r["steps"], r["guidance"], r["width"], r["height"])).fetchone()
                if exists:
                    continue
                con.execute(
                    "INSERT INTO generations(prompt_id, model_id, seed, path, sha256, width, height, steps, guidance, "
                    "scheduler, source, origin, params, created_at) VALUES "
                    "(:prompt_id, :model_id, :seed, :path, :sha256, :width, :height, :steps, :guidance, :scheduler, "
                    "'generate', NULL, :params, :created_at)", r)
                inserted += 1
    except sqlite3.OperationalError as e:
        if "full" in str(e):
            raise WorkspaceError(f"the disk is full while writing {ws.db_path}; free some space and run the same command again") from None
        raise
    return inserted


def generate(ws: Workspace, model_ref: str, prompts: Sequence[str] | None, per_prompt: int, *, steps: int,
             guidance: float, batch_size: int, seed: int, device: str = "auto",
             progress: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> GenerateReport:
    """Generate ``per_prompt`` images for every prompt (image j with seed ``seed + j``), skipping stored ones.

    ``progress(done, total)`` is called with total = planned images and done counting the skipped
    ones, once before the first batch and after every batch; ``should_stop()`` is asked before
    every batch and ends the run cleanly (report.stopped) when it returns True.
    (``core.raygen.generate_on_ray`` is the same run spread over the actors of a Ray cluster.)
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    per_prompt, steps, guidance, batch_size, seed = check_settings(per_prompt, steps, guidance, batch_size, seed)
    loaded = load_pipeline(model_ref, device)
    todo = plan(ws, loaded, conditioning(loaded, prompts), per_prompt, steps=steps, guidance=guidance, seed=seed)
    base = provenance(loaded, steps=steps, guidance=todo.guidance)

    generated, stopped = 0, False
    if progress:
        progress(todo.skipped, todo.planned)
    bar = tqdm(total=todo.planned, initial=todo.skipped, unit="img", desc="generate", disable=None)
    try:
        for start in range(0, len(todo.pending), batch_size):
            if should_stop is not None and should_stop():
                stopped = True
                break
            batch = todo.pending[start:start + batch_size]
            images = sample_batch(loaded, batch, steps=steps, guidance=todo.guidance)
            rows: list[dict[str, Any]] = []
            try:
                for row in write_images(ws.root, batch, images, model_id=todo.model_id, base=base,
                                        path_for=lambda folder, stem, _png: free_path(ws, folder, stem)):
                    rows.append(row)
            finally:
                # rows of the images fully written before a failure are kept: nothing is half-written
                generated += insert_rows(ws, rows)
            bar.update(len(batch))
            if progress:
                progress(todo.skipped + generated, todo.planned)
    finally:
        bar.close()
    return GenerateReport(planned=todo.planned, skipped_existing=todo.skipped, generated=generated,
                          seconds=time.perf_counter() - t0, stopped=stopped, model_id=todo.model_id)


# ---------------------------------------------------------------------------------- regenerating
def regenerate(ws: Workspace, generation_id: int, device: str = "auto", *,
               loaded: LoadedPipeline | None = None) -> np.ndarray:
    """Rebuild one generated image from its row's provenance alone; uint8 (H, W, 3).

    Identical to the stored pixels when run on the device and dtype recorded in the row
    (``params.device``, ``params.dtype``). ``loaded`` lets a caller reuse a pipeline it holds.
    """
    with ws.connect() as con:
        row = con.execute("SELECT g.*, m.weights_hash AS model_hash FROM generations g "
                          "LEFT JOIN models m ON m.id = g.model_id WHERE g.id = ?", (int(generation_id),)).fetchone()
    if row is None:
        raise InputError(f"no generation with id {generation_id} in {ws.root}")
    if row["source"] != "generate":
        raise InputError(f"generation {generation_id} was imported, not generated here, so it cannot be regenerated")
    params = json.loads(row["params"])
    if loaded is None:
        ref = params["model_ref"]
        if not Path(ref).exists() and Path(params.get("model_path", "")).is_dir():
            ref = params["model_path"]
        loaded = load_pipeline(ref, device)
    if loaded.weights_hash != params["weights_hash"]:
        raise ModelError(f"the model at {loaded.ref} has changed since generation {generation_id} was made "
                         f"(weights hash {loaded.weights_hash[:12]}, recorded {params['weights_hash'][:12]}); restore the original weights")
    _use_scheduler(loaded, params.get("scheduler_class"), params.get("scheduler_config"))
    label = params.get("class_label")
    image = sample(loaded, [(params.get("prompt", ""), label)], [int(params["seed"])],
                   steps=int(params["steps"]), guidance=params.get("guidance"))[0]
    return to_uint8(image)


def _use_scheduler(loaded: LoadedPipeline, class_name: str | None, cfg: dict[str, Any] | None) -> None:
    """Put back the recorded scheduler when the model folder's scheduler differs from it."""
    import diffusers

    current = getattr(loaded.pipeline, "scheduler", None)
    if not class_name or cfg is None or current is None:
        return
    now_cfg = json.loads(json.dumps(dict(current.config), default=str))
    if type(current).__name__ == class_name and now_cfg == cfg:
        return
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ModelError(f"scheduler {class_name} recorded with this generation is unknown to diffusers {diffusers.__version__}; install the diffusers version recorded in the row")
    loaded.pipeline.scheduler = cls.from_config(cfg)
