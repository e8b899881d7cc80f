"""The `memaudit` command: a map of subcommand -> function, each calling the same core
functions the dashboard calls. Errors a user can cause print one line and exit 1."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Callable

from . import __version__, config
from .errors import MemauditError

DEFAULT_DEMO_WS = "demo-workspace"


# ---------------------------------------------------------------------------- helpers
def _setting_flag(p: argparse.ArgumentParser, name: str, flag: str | None = None) -> None:
    spec = config.SETTINGS[name]
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": f"{spec.help} (default: {spec.default!r})"}
    if spec.choices:
        kwargs["choices"] = spec.choices
    else:
        kwargs["type"] = spec.type
        kwargs["metavar"] = spec.type.__name__.upper()
    p.add_argument(flag or "--" + name.replace("_", "-"), **kwargs)


def _emit(args: argparse.Namespace, summary: str, data: dict[str, Any]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(summary)


def _progress_printer(enabled: bool, unit: str = "prompt") -> Callable[[str, int, int], None] | None:
    if not enabled:
        return None
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit=unit, leave=False, file=sys.stderr)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close() -> None:  # clear unfinished bars, so that an error message starts its own line
        for bar in bars.values():
            bar.close()

    progress.close = close  # type: ignore[attr-defined]
    return progress


def _ws(path: str):
    from .store import Workspace

    return Workspace.open(path)


# ---------------------------------------------------------------------------- commands
def cmd_init(args: argparse.Namespace) -> None:
    from .store import Workspace

    ws = Workspace.init(args.workspace)
    _emit(args, f"workspace ready at {ws.root}", {"workspace": str(ws.root), "schema_version": ws.schema_version()})


def cmd_add_training(args: argparse.Namespace) -> None:
    from .training import add_training

    ws = _ws(args.workspace)
    report = add_training(ws, args.folder, captions=args.captions)
    skipped = [{"path": str(p), "reason": r} for p, r in report.skipped]
    lines = [f"added {report.added} training images from {args.folder}"]
    if skipped:
        lines.append(f"skipped {len(skipped)}:")
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped]
    _emit(args, "\n".join(lines), {"added": report.added, "skipped": skipped, "total": ws.counts()["training_images"]})


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import generate, read_prompts

    ws = _ws(args.workspace)
    s = ws.settings()
    opt = lambda name: s[name] if getattr(args, name) is None else config.check(name, getattr(args, name))  # noqa: E731
    if args.prompts and args.prompts_from_triage is not None:
        raise MemauditError("give --prompts or --prompts-from-triage, not both")
    if args.top is not None and args.prompts_from_triage is None:
        raise MemauditError("--top picks prompts of a triage run; give --prompts-from-triage RUN with it")
    bound = ""
    if args.prompts_from_triage is not None:
        from .triage import get_run, top_prompts

        prompts = top_prompts(ws, args.prompts_from_triage, args.top)
        scored = get_run(ws, args.prompts_from_triage).prompts
        if len(prompts) < scored:
            bound = (f"; these are the top {len(prompts)} of the {scored} prompts of triage run {args.prompts_from_triage}: "
                     "the rest are not generated, so an audit of them is a lower bound on what the model memorised")
    else:
        prompts = read_prompts(args.prompts) if args.prompts else None  # None: an unconditional model
    try:
        address = opt("ray_address")
    except ValueError as e:
        raise MemauditError(str(e)) from None
    run: Callable[..., Any] = generate
    if address:
        from .generate_ray import generate_on_ray

        run = functools.partial(generate_on_ray, address=address, workers=opt("ray_workers"))
    report = run(ws, args.model, prompts, opt("per_prompt"), steps=opt("steps"), guidance=opt("guidance"),
                 batch_size=opt("batch_size"), seed=opt("seed"), device=opt("device"))
    data = {k: getattr(report, k) for k in report.__dataclass_fields__}
    _emit(args, f"generated {report.generated} images for {len(prompts) if prompts else 1} prompts "
                f"({report.skipped_existing} already in the workspace) in {report.seconds:.1f} s{bound}",
          {**data, **({"note": bound[2:]} if bound else {})})


def cmd_triage(args: argparse.Namespace) -> None:
    from .generate import read_prompts
    from .triage import make_params, ranked, triage, write_prompts

    ws = _ws(args.workspace)
    s = ws.settings()
    prompts = read_prompts(args.prompts)
    params = make_params(ws, method=args.triage_method, steps=args.triage_steps, samples=args.triage_samples,
                         seed=args.seed, guidance=args.guidance, sampling_steps=args.steps)
    batch = s["batch_size"] if args.batch_size is None else config.check("batch_size", args.batch_size)
    device = s["device"] if args.device is None else args.device
    report = triage(ws, args.model, prompts, params, batch_size=batch, device=device)
    for note in report.notes:
        print(f"memaudit: note: {note}", file=sys.stderr)
    asked = set(prompts)
    rows = [r for r in ranked(ws, report.run_id) if r.prompt in asked] if report.run_id is not None else []
    written = None
    if args.out:
        if report.stopped:
            raise MemauditError("triage stopped before every prompt was scored; rerun it before writing --out")
        written = write_prompts(ws, report.run_id, args.out, args.top)
    lines = [f"{i + 1:5d}  {r.score:10.4g}  {r.prompt}" for i, r in enumerate(rows)]
    lines.append(f"triage run {report.run_id} ({params.method}, {params.steps} step(s), {params.samples} samples, seed {params.seed}): "
                 f"scored {report.scored} prompts ({report.skipped_existing} already scored) in {report.seconds:.1f} s")
    if written is not None:
        lines.append(f"wrote the {written} highest-scoring prompts to {args.out}")
    data = {"run_id": report.run_id, "parameters": params.to_dict(), "scored": report.scored,
            "skipped_existing": report.skipped_existing, "seconds": report.seconds, "notes": report.notes,
            "prompts": [{"rank": i + 1, "prompt": r.prompt, "score": r.score} for i, r in enumerate(rows)],
            **({"written": written, "out": args.out} if written is not None else {})}
    _emit(args, "\n".join(lines), data)


def cmd_triage_runs(args: argparse.Namespace) -> None:
    from .runs import latest_run
    from .triage import list_runs, validate

    ws = _ws(args.workspace)
    audit_run = args.audit_run if args.audit_run is not None else latest_run(ws)
    out, lines = [], []
    for r in list_runs(ws):
        p = r.params
        entry: dict[str, Any] = {"id": r.id, "model": r.model_ref, "weights_hash": r.weights_hash, "prompts": r.prompts,
                                 "parameters": p.to_dict(), "created_at": r.created_at}
        line = (f"triage run {r.id}  {r.created_at}  {p.method} steps={p.steps} samples={p.samples} seed={p.seed}  "
                f"{r.prompts} prompts  {r.model_ref}")
        if audit_run is not None:
            v = validate(ws, r.id, audit_run, args.verdict)
            entry["validation"] = {"audit_run": v.audit_run, "verdict": v.verdict, "prompts": v.prompts,
                                   "positives": v.positives, "auc": v.auc, "tpr_at_1pct_fpr": v.tpr_at_1pct_fpr,
                                   "keep_all_threshold": v.keep_all_threshold, "keep_all_rank": v.keep_all_rank}
            line += "\n    " + v.summary()
        out.append(entry)
        lines.append(line)
    _emit(args, "\n".join(lines) or "no triage runs yet", {"runs": out})


def cmd_import(args: argparse.Namespace) -> None:
    from .importer import import_generations

    ws = _ws(args.workspace)
    report = import_generations(ws, args.manifest)
    skipped = [{"path": str(p), "reason": r} for p, r in report.skipped]
    lines = [f"imported {report.imported} generations from {args.manifest}"]
    if skipped:
        lines.append(f"skipped {len(skipped)}:")
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped]
    _emit(args, "\n".join(lines), {"imported": report.imported, "skipped": skipped})


AUDIT_SETTINGS = ("edge_threshold", "min_clique", "group_min_size", "max_groups", "grid", "grid_choices", "delta", "neighbours",
                  "nearest_budget", "embedder", "relative_alpha", "relative_n", "working_size")


def cmd_audit(args: argparse.Namespace) -> None:
    from .audit import params_from, run_audit
    from .results import count_summary

    ws = _ws(args.workspace)
    params = params_from(ws, **{name: getattr(args, name) for name in AUDIT_SETTINGS})
    try:
        address = ws.get_setting("ray_address") if args.ray_address is None else config.check("ray_address", args.ray_address)
        workers = ws.get_setting("ray_workers") if args.ray_workers is None else config.check("ray_workers", args.ray_workers)
    except ValueError as e:
        raise MemauditError(str(e)) from None
    progress = _progress_printer(not args.json, unit="generation")
    try:
        run_id = run_audit(ws, params, progress=progress, ray_address=address or None, ray_workers=workers)
    finally:
        if progress is not None:
            progress.close()  # type: ignore[attr-defined]
    summary = count_summary(ws, run_id)
    text = (f"audit run {run_id}: {summary['prompts']} prompts, {summary['flagged_prompts']} flagged "
            f"(largest clique >= {params.min_clique} at tau {params.edge_threshold}), "
            f"{summary['extracted_candidates']} candidates extracted (l2 <= {params.delta}) covering "
            f"{summary['extracted_training_images']} training images")
    if summary["clique_bounds"]:
        text += (f"\nwarning: {summary['clique_bounds']} prompts' largest clique is a lower bound (the search stopped at "
                 f"clique_node_budget); raise it or lower tau to make them exact")
    if summary["uncertified_nearest"]:
        text += (f"\nwarning: {summary['uncertified_nearest']} flagged candidates' nearest training image is not certified "
                 f"(the search stopped at nearest_budget), {summary['uncertain_verdicts']} of them could be extractions; "
                 f"raise nearest_budget to settle them")
    _emit(args, text, {**summary, "parameters": params.to_dict()})


def cmd_inpaint(args: argparse.Namespace) -> None:
    from .inpaint import run_inpainting, summary

    ws = _ws(args.workspace)
    progress = _progress_printer(not args.json, unit="image")
    try:
        report = run_inpainting(ws, args.model, args.images, args.nonmembers, mask=args.inpaint_mask,
                                samples=args.inpaint_samples, steps=args.inpaint_steps, seed=args.seed,
                                batch_size=args.batch_size, device=args.device, score_draws=args.inpaint_score_draws,
                                score_max_t=args.inpaint_score_max_t,
                                progress=None if progress is None else lambda d, t: progress("inpainting", d, t))
    finally:
        if progress is not None:
            progress.close()  # type: ignore[attr-defined]
    s = summary(ws, report.run_id)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"inpainting run {report.run_id}: {report.images} images x {report.samples} completions, mask {s['mask']}, "
             f"{report.seconds:.1f} s", "normalised L2 on the masked region, median   members   non-members   gap   AUC"]
    for kind, what in (("chosen", "model-chosen (lowest loss)"), ("best", "best of N (oracle bound)"), ("mean", "mean of N")):
        b = s[kind]
        lines.append(f"  {what:28s} {fmt(b['members']['median']):>7s}   {fmt(b['nonmembers']['median']):>11s}   "
                     f"{fmt(b['median_gap']):>5s}   {fmt(b['auc'])}")
    _emit(args, "\n".join(lines), {**s, "seconds": report.seconds})


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_csv, export_json, write_export

    ws = _ws(args.workspace)
    if args.out == "-":
        sys.stdout.write(json.dumps(export_json(ws, args.run), indent=2) + "\n" if args.format == "json" else export_csv(ws, args.run))
        return
    out = write_export(ws, args.format, args.out, args.run)
    _emit(args, f"wrote {args.format.upper()} export to {out}", {"out": str(out), "format": args.format})


def cmd_label(args: argparse.Namespace) -> None:
    from .labels import add_label

    ws = _ws(args.workspace)
    event = add_label(ws, args.candidate_id, args.label, args.reviewer, args.note or "")
    _emit(args, f"label event {event}: candidate {args.candidate_id} = {args.label} by {args.reviewer}",
          {"event_id": event, "candidate_id": args.candidate_id, "label": args.label, "reviewer": args.reviewer})


def cmd_undo(args: argparse.Namespace) -> None:
    from .labels import undo_last

    ws = _ws(args.workspace)
    event = undo_last(ws, args.reviewer)
    _emit(args, "nothing to undo" if event is None else f"undo event {event} by {args.reviewer}", {"event_id": event})


def cmd_duplicates(args: argparse.Namespace) -> None:
    from .training import top_duplicated, write_prompts_file

    ws = _ws(args.workspace)
    rows = top_duplicated(ws, args.top)
    data = {"groups": [{"caption": c, "count": n, "training_id": t} for c, n, t in rows]}
    lines = [f"{n:6d}  {c}" for c, n, _ in rows]
    if args.out:
        written = write_prompts_file(ws, args.top, args.out)
        data["written"] = written
        lines.append(f"wrote {written} captions to {args.out}")
    _emit(args, "\n".join(lines) if lines else "no training images", data)


def cmd_runs(args: argparse.Namespace) -> None:
    from .results import count_summary
    from .runs import list_runs

    ws = _ws(args.workspace)
    runs = [{"id": r.id, "created_at": r.created_at, "parameters": r.params.to_dict(), **count_summary(ws, r.id)} for r in list_runs(ws)]
    lines = [f"run {r['id']}  {r['created_at']}  tau={r['parameters']['edge_threshold']} k={r['parameters']['min_clique']} "
             f"delta={r['parameters']['delta']}  flagged={r['flagged_prompts']}  extracted={r['extracted_candidates']}" for r in runs]
    _emit(args, "\n".join(lines) or "no audit runs yet", {"runs": runs})


def cmd_status(args: argparse.Namespace) -> None:
    ws = _ws(args.workspace)
    counts = ws.counts()
    _emit(args, "\n".join(f"{k:16s} {v}" for k, v in counts.items()), {"workspace": str(ws.root), **counts})


def cmd_settings(args: argparse.Namespace) -> None:
    ws = _ws(args.workspace)
    if args.name is not None:
        if args.value is None:
            raise MemauditError("give a value to set, e.g. `memaudit settings WS edge_threshold 0.08`")
        if args.name not in config.SETTINGS:
            raise MemauditError(f"unknown setting {args.name!r}; `memaudit settings WS` lists them")
        ws.set_setting(args.name, args.value)
    values = ws.settings()
    _emit(args, "\n".join(f"{k:20s} {v!r}" for k, v in values.items()), values)


def cmd_backup(args: argparse.Namespace) -> None:
    from .maintenance import backup

    out = backup(_ws(args.workspace), args.out)
    _emit(args, f"backed up {args.workspace} to {out}", {"out": str(out)})


def cmd_verify(args: argparse.Namespace) -> None:
    from .maintenance import verify

    report = verify(_ws(args.workspace))
    data = {"ok": report.ok, "checked_files": report.checked_files, "missing": report.missing,
            "integrity": report.integrity, "orphans": report.orphans}
    lines = [f"database integrity: {report.integrity}", f"files checked: {report.checked_files}, missing: {len(report.missing)}"]
    lines += [f"  missing: {m}" for m in report.missing]
    if report.orphans:
        lines.append(f"{len(report.orphans)} files no row refers to (harmless; left by an interrupted run)")
    _emit(args, "\n".join(lines), data)
    if not report.ok:
        raise SystemExit(1)


def cmd_dashboard(args: argparse.Namespace) -> None:
    from .launch import launch

    _ws(args.workspace)
    raise SystemExit(launch(args.workspace, port=args.port, host=args.host))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import runner as demo

    if args.workspace == "train-digits":
        from .demo.digits import train_model

        report = train_model()
        _emit(args, f"trained the digits model in {report.total_seconds:.0f} s (shadows: python -m core.demo.digits shadows)",
              {"out": str(report.out_dir), "seconds": report.total_seconds, "final_loss": report.final_loss})
        return
    if args.workspace == "train":
        report = demo.train_demo_model(steps=args.train_steps, seed=args.seed)
        _emit(args, f"trained the demo model: {report}", {"report": str(report)})
        return
    result = demo.build_demo(args.workspace, progress=True)
    lines = [result.summary, "", f"open the dashboard:  memaudit dashboard {args.workspace}"]
    _emit(args, "\n".join(lines), result.as_dict())
    if args.open:
        from .launch import launch

        raise SystemExit(launch(args.workspace, port=args.port, host="127.0.0.1", open_browser=True))


# ---------------------------------------------------------------------------- membership inference
def _mia_lines(run) -> list[str]:
    m = run.metrics
    lines = [f"membership run {run.id}: {run.attack} at t={run.timestep}, {m['members']} members / {m['nonmembers']} "
             f"non-members: AUC {m['auc']:.3f}, TPR {m['tpr_at_1pct_fpr']:.1%} at 1% FPR, {m['tpr_at_0_1pct_fpr']:.1%} "
             f"at 0.1% FPR, balanced accuracy {m['balanced_accuracy']:.3f}"]
    if "offline" in m:
        o = m["offline"]
        lines.append(f"  LiRA offline: AUC {o['auc']:.3f}, TPR {o['tpr_at_1pct_fpr']:.1%} at 1% FPR")
    if run.quality is not None:
        lines.append(f"  quality ({run.quality_measure}): {run.quality:.5f}")
    return lines + [f"  note: {n}" for n in m.get("notes", [])]


def cmd_mia(args: argparse.Namespace) -> None:
    from .membership_runs import get_run, run_membership

    ws = _ws(args.workspace)
    bars = _progress_printer(not args.json, unit="image")
    try:
        run_id = run_membership(ws, args.model, args.members, args.nonmembers, attack=args.mia_attack,
                                timestep=args.mia_timestep, noise_draws=args.mia_noise_draws, seed=args.mia_seed,
                                shadow_dir=args.shadow_dir, quality=args.quality, device=ws.settings()["device"],
                                progress=None if bars is None else (lambda done, total: bars("scoring", done, total)))
    finally:
        if bars is not None:
            bars.close()  # type: ignore[attr-defined]
    run = get_run(ws, run_id)
    _emit(args, "\n".join(_mia_lines(run)), {"run_id": run.id, "attack": run.attack, "timestep": run.timestep,
                                              "metrics": run.metrics, "quality": run.quality, "parameters": run.params})


def cmd_mia_trend(args: argparse.Namespace) -> None:
    from .membership_runs import get_run, run_checkpoints

    ws = _ws(args.workspace)
    runs = [get_run(ws, r) for r in run_checkpoints(ws, args.checkpoints, args.members, args.nonmembers,
                                                     final_model=args.model, timestep=args.mia_timestep,
                                                     noise_draws=args.mia_noise_draws, seed=args.mia_seed,
                                                     device=ws.settings()["device"], inception=args.inception,
                                                     fid_samples=args.fid_samples, fid_steps=args.fid_steps)]
    lines = [f"step      {'FID' if args.inception else 'held-out loss':15s} AUC     TPR@1%FPR"]
    lines += [f"{r.step:<9} {r.quality:<15.5f} {r.metrics['auc']:<7.3f} {r.metrics['tpr_at_1pct_fpr']:.1%}" for r in runs]
    _emit(args, "\n".join(lines), {"runs": [{"run_id": r.id, "step": r.step, "quality": r.quality,
                                             "auc": r.metrics["auc"], "tpr_at_1pct_fpr": r.metrics["tpr_at_1pct_fpr"]}
                                            for r in runs]})


def cmd_mia_runs(args: argparse.Namespace) -> None:
    from .membership_runs import list_runs

    runs = list_runs(_ws(args.workspace))
    _emit(args, "\n".join(f"{r.label}  {r.model_ref}" for r in runs) or "no membership runs yet",
          {"runs": [{"id": r.id, "attack": r.attack, "timestep": r.timestep, "model": r.model_ref, "step": r.step,
                     "metrics": r.metrics} for r in runs]})


def cmd_train_shadows(args: argparse.Namespace) -> None:
    from .shadows import recipe_of, train_shadows

    recipe = recipe_of(args.like) if args.like else {}
    for key in ("steps", "size", "batch_size"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    if args.unconditional:
        recipe["unconditional"] = True
    if "steps" not in recipe:
        raise MemauditError("give --like MODEL (a model trained by memaudit) or --steps to say how to train the shadows")
    try:
        count = config.check("shadow_count", config.default("shadow_count") if args.shadow_count is None else args.shadow_count)
    except ValueError as e:
        raise MemauditError(str(e)) from None

    def say(i: int, k: int, seconds: float) -> None:
        if not args.json:
            print(f"shadow {i + 1} of {k} trained in {seconds:.0f} s", file=sys.stderr, flush=True)

    result = train_shadows(args.pool, args.out, count=count, seed=args.seed, recipe=recipe, threads=args.threads,
                           progress=say)
    _emit(args, f"{len(result.models)} of {result.count} shadow models trained in {args.out} "
                f"(seeds {', '.join(map(str, result.seeds))}); each of the {len(result.rel)} pool images is IN for "
                f"{result.count // 2} of them",
          {"out": str(args.out), "trained": len(result.models), "count": result.count, "seeds": list(result.seeds),
           "pool_images": len(result.rel), "recipe": result.recipe})


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memaudit",
        description="Audit an image diffusion model for memorised training data: generate many images per prompt, "
                    "find prompts whose generations collapse into cliques of near-identical images, and check them "
                    "against the training set (Carlini et al. 2023).")
    parser.add_argument("--version", action="version", version=f"memaudit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a summary")
        p.set_defaults(func=func)
        return p

    p = add("init", cmd_init, "Create an empty workspace (a folder with audit.db).")
    p.add_argument("workspace", help="workspace folder to create")

    p = add("add-training", cmd_add_training, "Ingest a folder of training images (recursive; png/jpg/webp), index them and update every image's "
                "duplicate count (the training images within duplicate_threshold of it).")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("folder", help="folder of training images")
    p.add_argument("--captions", help="CSV (file,caption) or JSONL captions file")

    p = add("generate", cmd_generate, "Generate images with a diffusers pipeline, one seed per image; resumable.")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("--model", required=True, help="local diffusers directory, or a hub id (needs network)")
    p.add_argument("--prompts", help="text file with one prompt per line (omit for unconditional models)")
    for name, flag in (("per_prompt", "--per-prompt"), ("steps", None), ("guidance", None), ("batch_size", "--batch-size"),
                       ("seed", None), ("device", None)):
        _setting_flag(p, name, flag)
    p.add_argument("--ray", dest="ray_address", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: --ray alone or --ray auto joins the one running on this machine, --ray local "
                        "starts a private one, --ray HOST:PORT joins the head node at that address; one actor per GPU "
                        "(or CPU) samples, this process alone writes the database (needs pip install 'memaudit[ray]'; "
                        f"default: the ray_address setting, {config.default('ray_address')!r} for none)")
    _setting_flag(p, "ray_workers", "--ray-workers")

    p.add_argument("--prompts-from-triage", type=int, metavar="RUN", help="take the prompts from this triage run, highest score first")
    p.add_argument("--top", type=int, help="with --prompts-from-triage: only the N highest-scoring prompts")

    p = add("triage", cmd_triage, "Score prompts for memorisation from a few denoising steps (no generation); "
                                  "stores a triage run, resumable. Generate from the top ones afterwards.")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("--model", required=True, help="local diffusers directory, or a hub id (needs network)")
    p.add_argument("--prompts", required=True, help="text file with one prompt per line")
    _setting_flag(p, "triage_method", "--method")
    _setting_flag(p, "triage_steps", "--steps")
    _setting_flag(p, "triage_samples", "--samples")
    for name, flag in (("seed", None), ("guidance", None), ("steps", "--sampling-steps"), ("batch_size", "--batch-size"),
                       ("device", None)):
        _setting_flag(p, name, flag)
    p.add_argument("--out", help="also write the run's prompts, highest score first, to this file (a prompts file for generate)")
    p.add_argument("--top", type=int, help="with --out: only the N highest-scoring prompts")

    p = add("triage-runs", cmd_triage_runs, "List triage runs, each checked against an audit run's verdicts (AUC, TPR at 1% FPR, "
                                            "the score that keeps every extracted prompt).")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("--audit-run", type=int, help="audit run to check against (default: the latest)")
    p.add_argument("--verdict", choices=("extracted", "flagged"), default="extracted", help="what counts as memorised (default extracted)")

    p = add("import-generations", cmd_import, "Import generations made elsewhere from a manifest (CSV or JSONL: path,prompt[,seed]; paths relative to the manifest).")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("manifest", help="CSV or JSONL manifest")

    p = add("audit", cmd_audit, "Find clique groups per prompt, verify them against the training set, store an audit run.")
    p.add_argument("workspace", help="workspace folder")
    for name in AUDIT_SETTINGS:
        _setting_flag(p, name)
    p.add_argument("--ray", dest="ray_address", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster (auto, local or HOST:PORT, as for generate): one actor per CPU (or GPU) audits "
                        "prompts and chunks of generations, this process alone writes the run; the result is the local run's "
                        f"(default: the ray_address setting, {config.default('ray_address')!r} for none)")
    _setting_flag(p, "ray_workers", "--ray-workers")

    p = add("inpaint", cmd_inpaint, "Inpainting attack (the paper's Figure 12): mask part of each image, let the model "
                                    "complete it N times, measure how close it comes for members and non-members; stores an inpainting run.")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("--model", required=True, help="pixel-space DDPM/DDIM model folder (RePaint), or a diffusers inpainting pipeline")
    p.add_argument("--images", required=True, help="folder of member images, or a CSV manifest (path[,member])")
    p.add_argument("--nonmembers", help="folder or CSV manifest of images the model was not trained on")
    for name, flag in (("inpaint_mask", "--mask"), ("inpaint_samples", "--samples"), ("inpaint_steps", "--steps"), ("seed", None),
                       ("batch_size", "--batch-size"), ("device", None), ("inpaint_score_draws", "--score-draws"),
                       ("inpaint_score_max_t", "--score-max-t")):
        _setting_flag(p, name, flag)

    p = add("export", cmd_export, "Export an audit run (JSON: everything; CSV: one row per candidate).")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("--format", choices=("json", "csv"), default="json", help="json: the whole run; csv: one row per candidate")
    p.add_argument("--out", required=True, help="output file, or - for standard output")
    p.add_argument("--run", type=int, help="audit run id (default: the latest)")

    p = add("label", cmd_label, "Label a candidate by hand (the same action as the dashboard's label buttons).")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("candidate_id", type=int, help="candidate id (see `memaudit export` or the dashboard)")
    p.add_argument("label", choices=("exact_copy", "near_copy", "not_memorized", "unsure"), help="the judgement")
    p.add_argument("--reviewer", required=True, help="who labels (kept with every event)")
    p.add_argument("--note", default="", help="free text kept with the label")

    p = add("undo", cmd_undo, "Undo a reviewer's latest label (appends an undo event).")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("--reviewer", required=True, help="whose latest label to undo")

    p = add("duplicates", cmd_duplicates, "List the most duplicated training images, one per group of copies, with their duplicate counts, and "
                "write their captions as a prompts file (prompt selection by duplicate count, as in the paper).")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("--top", type=int, default=100, help="how many images, one per group of copies (default 100)")
    p.add_argument("--out", help="write the captions here, one per line")

    p = add("runs", cmd_runs, "List the workspace's audit runs with their parameters and counts.")
    p.add_argument("workspace", help="workspace folder")

    p = add("status", cmd_status, "Show what the workspace holds.")
    p.add_argument("workspace", help="workspace folder")

    p = add("settings", cmd_settings, "Show the workspace's settings, or set one (NAME VALUE).")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("name", nargs="?", help="setting to set")
    p.add_argument("value", nargs="?", help="its new value")

    p = add("backup", cmd_backup, "Make a consistent copy of a live workspace (SQLite online backup plus the files it names).")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("out", help="new, empty folder for the copy")

    p = add("verify", cmd_verify, "Check the database's integrity and that every file it names exists; exit 1 if not.")
    p.add_argument("workspace", help="workspace folder")

    p = add("dashboard", cmd_dashboard, "Start the review dashboard (Streamlit) on a workspace.")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("--port", type=int, default=config.DASHBOARD_PORT, help=f"port (default {config.DASHBOARD_PORT})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; anything else exposes the training set)")

    p = add("mia", cmd_mia, "Membership inference: score member and non-member images against a model (loss at a "
                            "timestep, or LiRA with shadow models) and store a membership run.")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("--model", required=True, help="local diffusers directory, or a hub id (needs network)")
    p.add_argument("--members", required=True, help="folder or manifest (CSV/JSONL: path[,caption|label]) of training images")
    p.add_argument("--nonmembers", required=True, help="folder or manifest of images the model was not trained on")
    _setting_flag(p, "mia_attack", "--attack")
    _setting_flag(p, "mia_timestep", "--timestep")
    _setting_flag(p, "mia_noise_draws", "--noise-draws")
    _setting_flag(p, "mia_seed", "--seed")
    p.add_argument("--shadow-dir", help="with --attack lira: the folder `memaudit train-shadows` wrote")
    p.add_argument("--quality", action="store_true", help="also measure the held-out denoising loss of the non-members")

    p = add("mia-trend", cmd_mia_trend, "Membership against quality along training (Figure 11): the loss attack on every "
                                        "step-<N> checkpoint, with the non-members' held-out denoising loss.")
    p.add_argument("workspace", help="workspace folder")
    p.add_argument("--checkpoints", required=True, help="folder of step-<N> diffusers folders")
    p.add_argument("--model", help="the final model too (its steps from training.json)")
    p.add_argument("--members", required=True, help="folder or manifest of training images")
    p.add_argument("--nonmembers", required=True, help="folder or manifest of held-out images")
    p.add_argument("--inception", help="a local torchvision inception_v3 state dict: quality is FID against the members "
                                       "(default: the held-out denoising loss, no weights needed)")
    p.add_argument("--fid-samples", type=int, default=256, help="with --inception: images generated per checkpoint")
    p.add_argument("--fid-steps", type=int, default=20, help="with --inception: sampling steps")
    _setting_flag(p, "mia_timestep", "--timestep")
    _setting_flag(p, "mia_noise_draws", "--noise-draws")
    _setting_flag(p, "mia_seed", "--seed")

    p = add("mia-runs", cmd_mia_runs, "List the workspace's membership runs with their metrics.")
    p.add_argument("workspace", help="workspace folder")

    p = add("train-shadows", cmd_train_shadows, "Train LiRA shadow models on random halves of a pool (each image IN for "
                                                "half of them), resumable, seeds recorded in OUT/shadows.json.")
    p.add_argument("pool", help="folder or manifest of every image the attack will score (members and non-members)")
    p.add_argument("out", help="folder for the shadow models")
    p.add_argument("--like", help="a model trained by memaudit: train the shadows with its recipe (training.json)")
    _setting_flag(p, "shadow_count", "--count")
    p.add_argument("--steps", type=int, help="training steps (overrides --like)")
    p.add_argument("--size", type=int, help="image side (overrides --like)")
    p.add_argument("--batch-size", type=int, help="batch size (overrides --like)")
    p.add_argument("--unconditional", action="store_true", help="unconditional shadows (no captions)")
    p.add_argument("--seed", type=int, default=0, help="seed of the IN/OUT assignment; shadow i trains with seed*1000+i")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")

    p = add("demo", cmd_demo, "Build the embedded demo workspace (shipped data and models), `demo train` to retrain the shipped model, "
                          "or `demo train-digits` the membership demo's digits model.")
    p.add_argument("workspace", nargs="?", default=DEFAULT_DEMO_WS, help=f"workspace folder (default {DEFAULT_DEMO_WS}), 'train' or 'train-digits'")
    p.add_argument("--open", action="store_true", help="start the dashboard on the result")
    p.add_argument("--port", type=int, default=config.DASHBOARD_PORT,
                   help=f"dashboard port with --open (default {config.DASHBOARD_PORT})")
    p.add_argument("--train-steps", type=int, default=None, help="with `demo train`: training steps")
    p.add_argument("--seed", type=int, default=None, help="with `demo train`: training seed (default: the shipped model's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MemauditError as e:
        print(f"memaudit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("memaudit: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
