"""Triage: score prompts for memorisation from a few denoising steps, before spending 500 samples on each.

A prompt's score is computed from the model's own predictions on ``samples`` starting noises
(sample j of every prompt from ``torch.Generator("cpu").manual_seed(seed + j)``, as in
``core.generate``), over the first ``steps`` timesteps of a ``sampling_steps``-step DDIM grid
on the model's noise schedule. Higher means more likely memorised. Two methods:

- ``noise-norm`` (after Wen et al., ICLR 2024): the magnitude of the text-conditional noise
  prediction, ``rms(eps(x_t, c) - eps(x_t, ""))``, averaged over the steps and the samples.
  A memorised prompt pulls the prediction hard towards one training image; a prompt that
  admits many images barely moves it from the empty prompt's.
- ``one-step`` (after Webster, 2023): the distance between the one-step denoised sample and
  the initial noise, ``rms(x0_hat(x_T, c) - x_T)``, with ``x0_hat`` from the guided prediction
  at the first timestep, averaged over the samples. A memorised prompt reconstructs a fixed,
  sharp image in one step.

``rms(v) = sqrt(mean(v^2))`` over every latent (or pixel) value, so scores do not grow with
the image size. Predictions are converted to ``eps`` and ``x0`` from the scheduler's
``prediction_type`` with the cumulative alpha ``a`` of the timestep:

    epsilon:       eps = out                              x0 = (x - sqrt(1 - a) eps) / sqrt(a)
    sample:        eps = (x - sqrt(a) out) / sqrt(1 - a)  x0 = out
    v_prediction:  eps = sqrt(a) out + sqrt(1 - a) x      x0 = sqrt(a) x - sqrt(1 - a) out

Between steps the sample moves along DDIM (eta 0) with the guided prediction
``uncond + guidance * (cond - uncond)`` (the conditional one when ``guidance <= 1``), whatever
sampler the model ships with, so a score depends on its seeds alone.

Models: text-to-image pipelines with an unconditional branch: Stable Diffusion-style latent
pipelines (``encode_prompt``, a ``UNet2DConditionModel``, one text encoder; the VAE is not
used) and memaudit's ``CaptionConditionedPipeline`` (pixels; the empty caption is class 0,
learnt by caption dropout).

A triage run is identified by the model (reference and weights hash) and the parameters; the
same command run again scores only the prompts it has not scored yet, and an interruption
loses at most the batch in flight. Nothing is written before the first batch is scored, so a
model that fails leaves the workspace as it was.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import config
from .errors import InputError, MemauditError, ModelError
from .store import Workspace, now
from .tempfiles import write_text_atomic

METHODS = ("noise-norm", "one-step")
VERDICTS = ("extracted", "flagged")


@dataclass(frozen=True)
class TriageParams:
    """What a triage run's scores depend on (with the model): its identity in the workspace."""
    method: str = "noise-norm"
    steps: int = 1
    samples: int = 4
    seed: int = 0
    guidance: float = 7.5
    sampling_steps: int = 50

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class TriageReport:
    run_id: int | None  # None when nothing was scored (no run stored)
    planned: int  # distinct prompts asked for
    skipped_existing: int  # already scored in this run, not scored again
    scored: int  # scored and stored by this call
    seconds: float
    stopped: bool = False
    notes: list[str] = field(default_factory=list)  # one line each: prompts truncated to the tokenizer's length


@dataclass(frozen=True)
class TriageRun:
    id: int
    model_ref: str
    weights_hash: str
    params: TriageParams
    prompts: int
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class TriageScore:
    rank: int  # 1 = most suspicious
    prompt_id: int
    prompt: str
    score: float
    note: str


def make_params(ws: Workspace | None = None, **given: Any) -> TriageParams:
    """Triage parameters from the workspace's settings, overridden by the non-None values given."""
    settings = ws.settings() if ws is not None else {n: s.default for n, s in config.SETTINGS.items()}
    names = {"method": "triage_method", "steps": "triage_steps", "samples": "triage_samples", "seed": "seed",
             "guidance": "guidance", "sampling_steps": "steps"}
    values = {}
    for field_name, setting in names.items():
        value = given.get(field_name)
        try:
            values[field_name] = config.check(setting, settings[setting] if value is None else value)
        except ValueError as e:
            raise InputError(str(e)) from None
    params = TriageParams(**values)
    if params.steps > params.sampling_steps:
        raise InputError(f"triage steps {params.steps} exceed the {params.sampling_steps}-step sampling grid; "
                         "lower --steps or raise --sampling-steps")
    if params.method == "one-step" and params.steps != 1:
        raise InputError(f"the one-step method scores the first step only; use --steps 1 (got {params.steps})")
    if params.seed + params.samples - 1 > 2**63 - 1:
        raise InputError(f"seed {params.seed} + {params.samples} samples passes 2**63 - 1; use a smaller seed")
    return params


# ---------------------------------------------------------------------------------- model adapters
class _Scorer:
    """What triage needs from a pipeline: noise shape, the conditioning of prompts, one denoiser call."""

    pipe: Any
    shape: tuple[int, int, int]

    def condition(self, prompts: Sequence[str]) -> tuple[Any, Any, dict[str, str]]:
        """(conditional, unconditional) inputs for each prompt, and a one-line note per truncated prompt."""
        raise NotImplementedError

    def predict(self, x: Any, t: Any, cond: Any) -> Any:
        raise NotImplementedError

    @staticmethod
    def repeat(cond: Any, n: int) -> Any:
        return cond.repeat_interleave(n, dim=0)


class _CaptionScorer(_Scorer):
    """memaudit's CaptionConditionedPipeline: caption -> class id, class 0 the empty caption."""

    def __init__(self, pipe: Any):
        import torch

        self.pipe = pipe
        self.torch = torch
        size = int(pipe.unet.config.sample_size)
        self.shape = (int(pipe.unet.config.in_channels), size, size)

    def condition(self, prompts: Sequence[str]) -> tuple[Any, Any, dict[str, str]]:
        torch = self.torch
        device = self.pipe.unet.device
        ids = torch.tensor(self.pipe.caption_ids(list(prompts)), dtype=torch.long, device=device)
        return ids, torch.zeros_like(ids), {}

    def predict(self, x: Any, t: Any, cond: Any) -> Any:
        return self.pipe.unet(x, t, class_labels=cond).sample


class _TextScorer(_Scorer):
    """Stable Diffusion-style latent pipelines: ``encode_prompt`` with the empty prompt as the unconditional branch."""

    def __init__(self, pipe: Any, size: tuple[int, int] | None):
        self.pipe = pipe
        unet = pipe.unet
        factor = int(getattr(pipe, "vae_scale_factor", 1) or 1)
        if size is None:
            s = unet.config.sample_size
            h, w = (s, s) if isinstance(s, int) else tuple(s)
        else:
            h, w = size[0] // factor, size[1] // factor
        self.shape = (int(unet.config.in_channels), int(h), int(w))

    def condition(self, prompts: Sequence[str]) -> tuple[Any, Any, dict[str, str]]:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        tok = self.pipe.tokenizer
        limit = int(tok.model_max_length)
        notes = {}
        levels = dlog.get_verbosity(), tlog.get_verbosity()
        dlog.set_verbosity_error()  # their truncation warnings are replaced by the notes below
        tlog.set_verbosity_error()
        try:
            for p in prompts:
                n = len(tok(p, truncation=False, add_special_tokens=True).input_ids)
                if n > limit:
                    notes[p] = (f"prompt {p[:60]!r}{'...' if len(p) > 60 else ''} has {n} tokens, more than the {limit} "
                                f"the text encoder reads; it was scored on its first {limit} (as the model generates from it)")
            cond, uncond = self.pipe.encode_prompt(list(prompts), self.pipe.unet.device, 1, True, negative_prompt=None)
        finally:
            dlog.set_verbosity(levels[0])
            tlog.set_verbosity(levels[1])
        return cond, uncond, notes

    def predict(self, x: Any, t: Any, cond: Any) -> Any:
        return self.pipe.unet(x, t, encoder_hidden_states=cond).sample


def scorer_for(loaded: Any) -> _Scorer:
    """The adapter for a loaded pipeline, or a one-line error saying why it cannot be triaged."""
    pipe, ref = loaded.pipeline, loaded.ref
    if loaded.kind != "text2image":
        raise ModelError(f"{ref} is a {loaded.kind} model; triage compares a prompt's prediction with the empty prompt's, "
                         "so it needs a text-to-image model with classifier-free guidance")
    if not loaded.uses_guidance:
        raise ModelError(f"{ref} ({loaded.pipeline_class}) takes no guidance_scale, so it has no unconditional branch to "
                         "compare a prompt against; triage needs a model trained with classifier-free guidance")
    if callable(getattr(pipe, "caption_ids", None)):
        log = Path(loaded.path) / "training.json"
        if log.is_file():
            try:
                dropout = json.loads(log.read_text(encoding="utf-8")).get("config", {}).get("caption_dropout")
            except ValueError:
                dropout = None
            if dropout is not None and float(dropout) <= 0:
                raise ModelError(f"{ref} was trained without caption dropout (training.json: caption_dropout 0), so its "
                                 "empty caption was never learnt; retrain with --caption-dropout 0.1 to triage it")
        if getattr(pipe.unet.config, "num_class_embeds", None) is None:
            raise ModelError(f"{ref} has no caption embeddings, so it has no unconditional branch; triage needs a conditional model")
        return _CaptionScorer(pipe)
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise ModelError(f"{ref} ({loaded.pipeline_class}) has no text encoder, so prompts cannot be encoded; "
                         "pass a complete model folder (text_encoder and tokenizer included)")
    if getattr(pipe, "text_encoder_2", None) is not None or not callable(getattr(pipe, "encode_prompt", None)) \
            or getattr(pipe, "unet", None) is None:
        raise ModelError(f"{ref} ({loaded.pipeline_class}) is not a Stable Diffusion-style pipeline (one text encoder, "
                         "encode_prompt and a UNet); triage supports those and memaudit's own pipelines")
    return _TextScorer(pipe, loaded.size)


def trajectory_scheduler(scheduler: Any, sampling_steps: int, device: str) -> Any:
    """A DDIM scheduler on ``scheduler``'s noise schedule, set to ``sampling_steps`` steps (the triage trajectory)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(sampling_steps, device=device)
    return sched


def _convert(kind: str, out: Any, x: Any, a: Any) -> tuple[Any, Any]:
    """(eps, x0) from a model output of prediction type ``kind`` at cumulative alpha ``a`` (module docstring)."""
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if kind == "epsilon":
        return out, (x - sb * out) / sa
    if kind == "sample":
        return (x - sa * out) / sb, out
    if kind == "v_prediction":
        return sa * out + sb * x, sa * x - sb * out
    raise ModelError(f"the scheduler's prediction_type {kind!r} is not one triage knows (epsilon, sample, v_prediction)")


def _rms(v: Any) -> Any:
    return v.float().pow(2).flatten(1).mean(1).sqrt()


def score_batch(scorer: _Scorer, scheduler: Any, prompts: Sequence[str], params: TriageParams) -> tuple[np.ndarray, dict[str, str]]:
    """Scores (len(prompts),) float64 of one batch of prompts, and a note per truncated prompt."""
    import torch

    pipe = scorer.pipe
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    n, k = len(prompts), params.samples
    cond, uncond, notes = scorer.condition(prompts)
    cond, uncond = scorer.repeat(cond, k), scorer.repeat(uncond, k)
    both = torch.cat([uncond, cond])
    noise = [torch.randn(scorer.shape, generator=torch.Generator("cpu").manual_seed(params.seed + j), dtype=torch.float32)
             for _ in range(n) for j in range(k)]
    x = (torch.stack(noise) * float(scheduler.init_noise_sigma)).to(device=device, dtype=dtype)
    x_start = x
    kind = scheduler.config.prediction_type
    alphas = scheduler.alphas_cumprod.to(device)
    total = torch.zeros(n * k, dtype=torch.float64, device=device)
    with torch.inference_mode():
        for step in range(params.steps):
            t = scheduler.timesteps[step]
            a = alphas[int(t)].to(torch.float32)
            model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            out = scorer.predict(model_in, t, both)
            if not torch.isfinite(out).all():
                ok = torch.isfinite(out).flatten(1).all(1).view(2, n, k).all(0).all(1)
                bad = [p for p, good in zip(prompts, ok.tolist()) if not good]
                raise ModelError(f"the model's noise prediction holds NaN or inf (prompt {bad[0]!r}"
                                 f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); its weights may be damaged, "
                                 "or it overflows in float16 (try --device cpu)")
            out_u, out_c = out.float().chunk(2)
            xf = x.float()
            guided = out_u + params.guidance * (out_c - out_u) if params.guidance > 1.0 else out_c
            if params.method == "noise-norm":
                eps_u, _ = _convert(kind, out_u, xf, a)
                eps_c, _ = _convert(kind, out_c, xf, a)
                total += _rms(eps_c - eps_u).double()
            else:
                _, x0 = _convert(kind, guided, xf, a)
                total += _rms(x0 - x_start.float()).double()
            if step + 1 < params.steps:
                x = scheduler.step(guided, t, xf).prev_sample.to(dtype)
    scores = (total / params.steps).view(n, k).mean(1).cpu().numpy()
    if not np.isfinite(scores).all():
        raise ModelError("the triage score is not finite (the noise schedule's first timestep leaves no signal); "
                         "use another --sampling-steps")
    return scores, notes


# ---------------------------------------------------------------------------------- running and storing
def _find_run(ws: Workspace, model_id: int, params: TriageParams) -> int | None:
    with ws.connect() as con:
        row = con.execute("SELECT id FROM triage_runs WHERE model_id = ? AND method = ? AND params = ?",
                          (model_id, params.method, params.key())).fetchone()
    return None if row is None else int(row["id"])


def _model_row(ws: Workspace, loaded: Any) -> int | None:
    with ws.connect() as con:
        row = con.execute("SELECT id FROM models WHERE ref = ? AND weights_hash = ?", (loaded.ref, loaded.weights_hash)).fetchone()
    return None if row is None else int(row["id"])


def _scored(ws: Workspace, run_id: int | None) -> set[str]:
    if run_id is None:
        return set()
    with ws.connect() as con:
        return {r[0] for r in con.execute("SELECT p.text FROM triage_scores s JOIN prompts p ON p.id = s.prompt_id "
                                          "WHERE s.run_id = ?", (run_id,))}


def _provenance(loaded: Any) -> dict[str, Any]:
    import diffusers
    import torch

    return {"model_ref": loaded.ref, "model_path": str(loaded.path), "hub_revision": loaded.revision,
            "weights_hash": loaded.weights_hash, "pipeline_class": loaded.pipeline_class, "scheduler_class": loaded.scheduler,
            "trajectory": "DDIM, eta 0, on the model's noise schedule", "dtype": loaded.dtype, "device": loaded.device,
            "generator_device": "cpu", "seed_rule": "sample j of every prompt uses seed + j",
            "diffusers_version": diffusers.__version__, "torch_version": torch.__version__}


def _store(ws: Workspace, loaded: Any, params: TriageParams, run_id: int | None, prompts: Sequence[str],
           scores: np.ndarray, notes: dict[str, str]) -> int:
    """Store one batch's scores (and the run, the model and the prompts on the first batch) in one transaction."""
    stamp = now()
    with ws.transaction() as con:
        if run_id is None:
            con.execute("INSERT OR IGNORE INTO models(ref, kind, pipeline_class, weights_hash, scheduler, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (loaded.ref, loaded.kind, loaded.pipeline_class, loaded.weights_hash,
                                                      loaded.scheduler, stamp))
            model_id = con.execute("SELECT id FROM models WHERE ref = ? AND weights_hash = ?",
                                   (loaded.ref, loaded.weights_hash)).fetchone()["id"]
            row = con.execute("SELECT id FROM triage_runs WHERE model_id = ? AND method = ? AND params = ?",
                              (model_id, params.method, params.key())).fetchone()
            if row is None:
                cur = con.execute("INSERT INTO triage_runs(model_id, method, params, provenance, created_at, updated_at) "
                                  "VALUES (?, ?, ?, ?, ?, ?)", (model_id, params.method, params.key(),
                                                                json.dumps(_provenance(loaded), sort_keys=True), stamp, stamp))
                run_id = int(cur.lastrowid)
            else:
                run_id = int(row["id"])
        for text, score in zip(prompts, scores):
            pid = ws.prompt_id(text, con)
            con.execute("INSERT OR IGNORE INTO triage_scores(run_id, prompt_id, score, note, created_at) VALUES (?, ?, ?, ?, ?)",
                        (run_id, pid, float(score), notes.get(text, ""), stamp))
        con.execute("UPDATE triage_runs SET updated_at = ? WHERE id = ?", (stamp, run_id))
    return run_id


def triage(ws: Workspace, model_ref: str, prompts: Sequence[str], params: TriageParams, *, batch_size: int = 16,
           device: str = "auto", progress: Callable[[int, int], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> TriageReport:
    """Score every prompt with ``params`` and store the scores as a triage run; skip prompts already scored.

    ``batch_size`` counts denoiser inputs per call (prompts x samples); ``progress(done, total)``
    counts prompts (skipped ones included) and is called before the first batch and after every
    batch; ``should_stop()`` is asked before every batch.
    """
    from tqdm import tqdm

    from .generate import load_pipeline

    t0 = time.perf_counter()
    try:
        batch_size = config.check("batch_size", batch_size)
    except ValueError as e:
        raise InputError(str(e)) from None
    texts = list(dict.fromkeys(p.strip() for p in prompts if p and p.strip()))
    if not texts:
        raise InputError("no prompts to triage; give a prompts file with one prompt per line")
    loaded = load_pipeline(model_ref, device)
    scorer = scorer_for(loaded)
    if isinstance(scorer, _CaptionScorer):
        scorer.pipe.caption_ids(texts)  # an unknown caption fails before anything is scored
    model_id = _model_row(ws, loaded)
    run_id = _find_run(ws, model_id, params) if model_id is not None else None
    done = _scored(ws, run_id)
    pending = [t for t in texts if t not in done]
    skipped = len(texts) - len(pending)
    scheduler = trajectory_scheduler(loaded.pipeline.scheduler, params.sampling_steps, loaded.device)
    per_call = max(1, batch_size // params.samples)
    scored, stopped, notes = 0, False, []
    if progress:
        progress(skipped, len(texts))
    bar = tqdm(total=len(texts), initial=skipped, unit="prompt", desc="triage", disable=None)
    try:
        for start in range(0, len(pending), per_call):
            if should_stop is not None and should_stop():
                stopped = True
                break
            batch = pending[start:start + per_call]
            try:
                scores, batch_notes = score_batch(scorer, scheduler, batch, params)
            except RuntimeError as e:
                if "out of memory" not in str(e).lower():
                    raise
                raise MemauditError(f"{loaded.device} ran out of memory at batch size {batch_size}; rerun with a smaller "
                                    "batch size (scored prompts are kept and skipped)") from None
            notes += list(batch_notes.values())
            run_id = _store(ws, loaded, params, run_id, batch, scores, batch_notes)
            scored += len(batch)
            bar.update(len(batch))
            if progress:
                progress(skipped + scored, len(texts))
    finally:
        bar.close()
    return TriageReport(run_id=run_id, planned=len(texts), skipped_existing=skipped, scored=scored,
                        seconds=time.perf_counter() - t0, stopped=stopped, notes=notes)


# ---------------------------------------------------------------------------------- reading
def _run_from_row(row: Any) -> TriageRun:
    return TriageRun(int(row["id"]), row["ref"], row["weights_hash"], TriageParams(**json.loads(row["params"])),
                     int(row["n"]), row["created_at"], row["updated_at"])


def list_runs(ws: Workspace) -> list[TriageRun]:
    """Every triage run, oldest first, with how many prompts it has scored."""
    with ws.connect() as con:
        rows = con.execute("SELECT r.*, m.ref, m.weights_hash, (SELECT COUNT(*) FROM triage_scores s WHERE s.run_id = r.id) AS n "
                           "FROM triage_runs r JOIN models m ON m.id = r.model_id ORDER BY r.id").fetchall()
    return [_run_from_row(r) for r in rows]


def get_run(ws: Workspace, run_id: int | None = None) -> TriageRun:
    """One triage run (default: the latest); InputError naming the known ones when it does not exist."""
    runs = list_runs(ws)
    if not runs:
        raise InputError(f"{ws.root} has no triage run yet; score prompts first with `memaudit triage {ws.root} --model M --prompts F`")
    if run_id is None:
        return runs[-1]
    for r in runs:
        if r.id == int(run_id):
            return r
    raise InputError(f"no triage run {run_id} in {ws.root}; known runs: {', '.join(str(r.id) for r in runs)}")


def ranked(ws: Workspace, run_id: int | None = None) -> list[TriageScore]:
    """The run's prompts, most suspicious first (ties in prompt order)."""
    run = get_run(ws, run_id)
    with ws.connect() as con:
        rows = con.execute("SELECT s.prompt_id, p.text, s.score, s.note FROM triage_scores s JOIN prompts p ON p.id = s.prompt_id "
                           "WHERE s.run_id = ? ORDER BY s.score DESC, p.text", (run.id,)).fetchall()
    return [TriageScore(i + 1, int(r["prompt_id"]), r["text"], float(r["score"]), r["note"]) for i, r in enumerate(rows)]


def top_prompts(ws: Workspace, run_id: int | None, top: int | None = None) -> list[str]:
    """The ``top`` highest-scoring prompts of a run (all of them when ``top`` is None)."""
    if top is not None and int(top) < 1:
        raise InputError(f"--top must be >= 1, got {top}")
    rows = ranked(ws, run_id)
    return [r.prompt for r in (rows if top is None else rows[:int(top)])]


def write_prompts(ws: Workspace, run_id: int | None, out: str | Path, top: int | None = None) -> int:
    """Write the run's prompts, most suspicious first, one per line, to ``out``; returns how many."""
    prompts = top_prompts(ws, run_id, top)
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(f"{out.parent} does not exist; create it or choose another --out")
    write_text_atomic(out, "".join(p + "\n" for p in prompts))
    return len(prompts)


def export(ws: Workspace) -> list[dict[str, Any]]:
    """Every triage run with its model, parameters, provenance and ranked scores (for the JSON export)."""
    out = []
    with ws.connect() as con:
        prov = {int(r["id"]): json.loads(r["provenance"]) for r in con.execute("SELECT id, provenance FROM triage_runs")}
    for run in list_runs(ws):
        out.append({"id": run.id, "model": run.model_ref, "weights_hash": run.weights_hash, "parameters": run.params.to_dict(),
                    "provenance": prov.get(run.id, {}), "created_at": run.created_at, "updated_at": run.updated_at,
                    "scores": [{"rank": s.rank, "prompt": s.prompt, "score": s.score, **({"note": s.note} if s.note else {})}
                               for s in ranked(ws, run.id)]})
    return out


def ranking_table(ws: Workspace, run_id: int | None = None, audit_run: int | None = None) -> list[dict[str, Any]]:
    """The run's ranked prompts with the audit run's verdict on each ('' where it has none), for display."""
    from . import results

    verdicts: dict[int, str] = {}
    if audit_run is not None:
        for r in results.prompt_results(ws, audit_run):
            verdicts[r.prompt_id] = "extracted" if r.extracted else "flagged" if r.flagged else "not flagged"
    return [{"rank": r.rank, "prompt": r.prompt, "score": r.score, "audit": verdicts.get(r.prompt_id, ""), "note": r.note}
            for r in ranked(ws, run_id)]


# ---------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class TriageValidation:
    """A triage run's scores against an audit run's verdicts on the prompts both hold."""
    triage_run: int
    audit_run: int
    verdict: str  # extracted | flagged: what counts as memorised
    prompts: int  # prompts with both a score and a verdict
    positives: int
    negatives: int
    not_audited: int  # scored prompts the audit run has no verdict for
    calibration: Any  # core.calibrate.Calibration of the score (None without both classes)
    keep_all_threshold: float | None  # the lowest score of a positive prompt: score >= it keeps every one
    keep_all_rank: int | None  # prompts (of those audited) scoring >= that threshold
    scores: np.ndarray  # (prompts,) in rank order
    positive: np.ndarray  # (prompts,) bool
    texts: list[str]

    @property
    def auc(self) -> float | None:
        return None if self.calibration is None else self.calibration.auc

    @property
    def tpr_at_1pct_fpr(self) -> float | None:
        return None if self.calibration is None else self.calibration.tpr_at_1pct_fpr

    def summary(self) -> str:
        if self.prompts == 0:
            return f"triage run {self.triage_run} and audit run {self.audit_run} share no prompt"
        head = (f"triage run {self.triage_run} against audit run {self.audit_run}: {self.prompts} prompts, "
                f"{self.positives} {self.verdict}")
        if self.calibration is None:
            return head + f"; ROC needs both {self.verdict} prompts and others"
        return (head + f"; AUC {self.auc:.3f}, TPR at 1% FPR {self.tpr_at_1pct_fpr:.3f}; every {self.verdict} prompt scores "
                f">= {self.keep_all_threshold:.4g}, which keeps the top {self.keep_all_rank} of {self.prompts}")


def validate(ws: Workspace, triage_run: int | None = None, audit_run: int | None = None,
             verdict: str = "extracted") -> TriageValidation:
    """The triage score against the audit's verdict per prompt: ROC, AUC, TPR at 1% FPR, and the
    lowest threshold that keeps every memorised prompt (how far down the ranking to generate)."""
    from . import results, runs
    from .calibrate import calibrate

    if verdict not in VERDICTS:
        raise InputError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    run = get_run(ws, triage_run)
    audit_id = audit_run if audit_run is not None else runs.latest_run(ws)
    if audit_id is None:
        raise InputError(f"{ws.root} has no audit run yet to check triage against; generate from the top prompts and audit them first")
    runs.run_params(ws, int(audit_id))  # an unknown run fails here, naming it
    results = {r.prompt_id: (r.extracted if verdict == "extracted" else r.flagged) for r in results.prompt_results(ws, audit_id)}
    rows = ranked(ws, run.id)
    both = [r for r in rows if r.prompt_id in results]
    scores = np.array([r.score for r in both], dtype=np.float64)
    positive = np.array([bool(results[r.prompt_id]) for r in both], dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    cal = calibrate(scores, positive, metric="triage score", higher_is_positive=True) if n_pos and n_neg else None
    keep, keep_rank = None, None
    if n_pos:
        keep = float(scores[positive].min())
        keep_rank = int((scores >= keep).sum())
    return TriageValidation(run.id, audit_id, verdict, len(both), n_pos, n_neg, len(rows) - len(both), cal, keep, keep_rank,
                            scores, positive, [r.prompt for r in both])
