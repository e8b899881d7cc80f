"""A workspace of a million generations: what the commands and pages cost as a workspace grows.

Two synthetic workspaces are built in the real schema (``Workspace.init``), the small one the
baseline of the large one (full run: 1,000 prompts x 100 generations and 10,000 training
images, then 10,000 x 100 and 100,000; ``--smoke``: 20 x 10 / 200 and 200 x 10 / 2,000):

* rows written in bulk with SQL: training images (captions; a tenth duplicated 2 to 300
  times), prompts (each a training caption, as in the paper), generations with a full
  provenance row each and paths in the layout ``generate`` writes (no image files: the read
  side reads rows and cached arrays only);
* one finished audit run made by the audit's own storing code (``core.audit.RunArrays`` filled
  with synthetic nearest-neighbour arrays, then ``core.audit.store_results``): prompt results,
  1 to 3 candidates per prompt (3% of prompts flagged, half of those extracted), members,
  10 neighbours each; the run's curves.npz and the distance matrices of a few prompts at
  every cached grid;
* label events by two reviewers on the 2% most suspicious candidates, some relabelled or undone.

Then each command and page query runs in a fresh process (``--measure``; in-process for
``--smoke``): its best time of 3 (the first call timed apart) and its peak resident memory
above the process's memory before it. Printed: both sizes and their ratio (about 1: does not
grow with the workspace; about 10: grows with it), the database and cache size per million
generations, the audit's storing stage (time and memory of the run's driver), and the largest
folder of the generation layout for 1M generations over 10,000 prompts and for 1M of one
unconditional model, with the layout before the shard folders for comparison.

    python -m benchmarks.bench_scale [--smoke] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import ROOT, peak_rss_mb, print_table, reset_peak_rss, rss_mb, write_json

SIZES = {False: ((1_000, 100, 10_000), (10_000, 100, 100_000)), True: ((20, 10, 200), (200, 10, 2_000))}
NEIGHBOURS = 10
FLAGGED_SHARE, LABELLED_SHARE = 0.03, 0.02
MATRICES = 4  # prompts whose distance matrices are written (prompt_groups reads one)


# ---------------------------------------------------------------------------------------- building
def _provenance_json() -> str:
    """A generated row's provenance as ``core.generate.provenance`` writes it (scheduler config and all),
    without the per-row keys; rows splice theirs in."""
    scheduler = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.31.0", "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                 "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
                 "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
                 "set_alpha_to_one": False, "steps_offset": 1, "thresholding": False, "timestep_spacing": "leading",
                 "trained_betas": None}
    base = {"model_ref": "/models/sd-finetune", "model_path": "/models/sd-finetune", "hub_revision": None,
            "kind": "text2image", "weights_hash": "ab" * 32, "pipeline_class": "StableDiffusionPipeline",
            "scheduler_class": "DDIMScheduler", "scheduler_config": scheduler, "steps": 50, "guidance": 7.5,
            "dtype": "float16", "device": "cuda", "generator_device": "cpu",
            "seed_rule": "seed = base_seed + j for image j of each prompt", "diffusers_version": "0.31.0",
            "torch_version": "2.5.1", "base_seed": 0, "batch_size": 64, "class_label": None, "height": 64, "width": 64}
    return json.dumps(base, sort_keys=True)[:-1]


def _caption(i: int) -> str:
    return f"a photograph of item {i}, {('red', 'blue', 'green', 'grey')[i % 4]} background, style {i % 97}"


def build(root: Path, prompts: int, per_prompt: int, training: int, seed: int = 0) -> dict[str, Any]:
    """Build the synthetic workspace and its audit run; return what was built and the storing stage's cost."""
    from core import duplicates
    from core.audit import PromptPlan, RunArrays, cached_grids, params_from, plan, store_results
    from core.curves import run_taus
    from core.records import CliqueGroup
    from core.runs import cache_dir, distance_file
    from core.store import Workspace, generation_folder, now

    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    t0 = time.perf_counter()
    ws = Workspace.init(root)
    stamp = now()
    model_id = ws.model_id("/models/sd-finetune", "text2image", "StableDiffusionPipeline", "ab" * 32, "DDIMScheduler")
    dup = np.ones(training, np.int64)
    some = rng.random(training) < 0.1
    dup[some] = rng.choice([2, 3, 5, 10, 40, 300], size=int(some.sum()))
    with ws.transaction() as con:
        rows = []
        for i in range(1, training + 1):
            sha = f"{pyrng.getrandbits(256):064x}"
            rows.append((i, f"training/{sha[:2]}/{sha}.png", f"/data/train/{i:08d}.jpg", _caption(i), sha, 64, 64,
                         int(dup[i - 1]), i if dup[i - 1] > 1 else None, stamp))
        con.executemany("INSERT INTO training_images(id, path, source_path, caption, sha256, width, height, duplicate_count, "
                        "duplicate_group, added_at, duplicates_checked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)", rows)
        con.execute("INSERT INTO duplicate_params(id, params, groups_current) VALUES (1, ?, 1)",
                    (json.dumps(duplicates.current_params(ws.settings())),))
        step = training // prompts
        con.executemany("INSERT INTO prompts(id, text) VALUES (?, ?)", [(p, _caption(1 + (p - 1) * step)) for p in range(1, prompts + 1)])
    seconds = {"training_rows": time.perf_counter() - t0}

    t0 = time.perf_counter()
    head = _provenance_json()
    for p0 in range(1, prompts + 1, 500):
        with ws.transaction() as con:
            rows = []
            for pid in range(p0, min(p0 + 500, prompts + 1)):
                text = json.dumps(_caption(1 + (pid - 1) * step))
                for s in range(per_prompt):
                    sha = f"{pyrng.getrandbits(256):064x}"
                    params = f'{head}, "created_at": "{stamp}", "index": {s}, "prompt": {text}, "seed": {s}, "batch_position": {s % 64}}}'
                    rows.append((pid, model_id, s, f"{generation_folder(pid, 's', s)}/{s}-{sha[:12]}.png", sha, params, stamp))
            con.executemany("INSERT INTO generations(prompt_id, model_id, seed, path, sha256, width, height, steps, guidance, "
                            "scheduler, source, params, created_at) VALUES (?, ?, ?, ?, ?, 64, 64, 50, 7.5, 'DDIMScheduler', "
                            "'generate', ?, ?)", rows)
    seconds["generation_rows"] = time.perf_counter() - t0

    # the run, stored by the audit's own code from synthetic per-generation arrays and clique groups
    t0 = time.perf_counter()
    params = params_from(ws, working_size=64)
    grids = cached_grids(64, params)
    plans, _ = plan(ws)
    n = sum(p.count for p in plans)
    with ws.transaction() as con:
        run_id = con.execute("INSERT INTO audit_runs(created_at, status, params) VALUES (?, 'running', ?)",
                             (now(), json.dumps(params.to_dict()))).lastrowid
    cache = cache_dir(ws, run_id)
    cache.mkdir(parents=True)
    arrays = RunArrays(cache, n, NEIGHBOURS, grids, params.grid)
    with ws.connect() as con:
        cur = con.execute("SELECT id FROM generations ORDER BY prompt_id, seed, id")  # the audit's row order
        at = 0
        while chunk := cur.fetchmany(200_000):
            m = len(chunk)
            arrays.gen_ids[at:at + m] = [r[0] for r in chunk]
            arrays.ids[at:at + m] = rng.integers(1, training + 1, size=(m, NEIGHBOURS))
            l2 = np.sort(rng.uniform(0.2, 0.6, size=(m, NEIGHBOURS)).astype(np.float32), axis=1)
            arrays.l2[at:at + m] = l2
            arrays.sim[at:at + m] = 1 - l2
            arrays.rel[at:at + m] = rng.uniform(1.2, 2.0, m)
            arrays.certified[at:at + m] = rng.random(m) < 0.99
            arrays.lower[at:at + m] = l2[:, 0] * 0.9
            arrays.exact[at:at + m] = rng.integers(5, 200, m)
            for a in arrays.tiled.values():
                a[at:at + m] = l2 * 1.1
            at += m
    groups: dict[int, list[CliqueGroup]] = {}
    flagged_prompts = set(rng.choice([p.prompt_id for p in plans], size=max(1, int(FLAGGED_SHARE * len(plans))), replace=False).tolist())
    for pp in plans:
        big = pp.prompt_id in flagged_prompts
        sizes = [min(pp.count, int(rng.integers(params.min_clique, 6 * params.min_clique)) if big else int(rng.integers(1, 6)))]
        for _ in range(int(rng.integers(0, 3))):
            left = pp.count - sum(sizes)
            if left >= params.group_min_size and sizes[0] >= params.group_min_size:
                sizes.append(int(rng.integers(params.group_min_size, min(sizes[0], left) + 1)))
        start, gs = 0, []
        for s in sizes:
            gs.append(CliqueGroup(tuple(range(start, start + s)), start, float(rng.uniform(0.02, 0.09)), True))
            start += s
        groups[pp.prompt_id] = gs
        if big and rng.random() < 0.5:  # extracted: the medoid lies within delta of a training image
            arrays.l2[pp.base, 0] = params.delta / 2
    arrays.flush()
    taus = run_taus(params)
    ratio = np.minimum(2.0, taus / params.edge_threshold)
    size = np.zeros((len(grids), len(plans), len(taus)), np.int32)
    for i, pp in enumerate(plans):
        size[:, i] = np.clip(np.floor(groups[pp.prompt_id][0].size * ratio), 1, pp.count)
    size[:, :, int(np.searchsorted(taus, params.edge_threshold))] = [g[0].size for g in (groups[p.prompt_id] for p in plans)]
    medoid = np.broadcast_to(np.array([pp.base for pp in plans], np.int64)[None, :, None], size.shape)
    np.savez(cache / "curves.npz", taus=taus, prompt_ids=np.asarray([p.prompt_id for p in plans], np.int64),
             grids=np.asarray(grids, np.int64), size=size, medoid=medoid,
             mean=np.broadcast_to((0.5 * taus).astype(np.float32), size.shape), exact=np.ones(size.shape, bool))
    largest = max(plans, key=lambda p: groups[p.prompt_id][0].size)
    shown = [largest] + [p for p in plans if p is not largest][:MATRICES - 1]
    for pp in shown:
        d = rng.uniform(0.2, 0.5, size=(pp.count, pp.count)).astype(np.float32)
        for g in groups[pp.prompt_id]:
            idx = np.array(g.members)
            d[np.ix_(idx, idx)] = rng.uniform(0.02, 0.08, size=(len(idx), len(idx)))
        d = np.minimum(d, d.T)
        np.fill_diagonal(d, 0.0)
        for g in grids:
            path = cache / distance_file(pp.prompt_id, g, params.grid)
            path.parent.mkdir(exist_ok=True)
            np.save(path, d)
    seconds["run_arrays"] = time.perf_counter() - t0

    # the audit driver's storing stage: its Python and numpy allocations (tracemalloc; the per-generation
    # arrays are memory-mapped files, read a row at a time), timed under tracemalloc
    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    store_results(ws, run_id, params, plans, groups, arrays)
    store = {"seconds": time.perf_counter() - t0, "peak_mb": tracemalloc.get_traced_memory()[1] / 2**20}
    tracemalloc.stop()

    with ws.connect() as con:
        cands = con.execute("SELECT id, medoid_generation_id, nearest_training_id FROM candidates WHERE run_id = ? "
                            "ORDER BY score, id", (run_id,)).fetchall()
    labelled = cands[:max(2, int(LABELLED_SHARE * len(cands)))]
    choices = ("exact_copy", "near_copy", "not_memorized", "unsure")
    with ws.transaction() as con:
        for j, (cid, g, t) in enumerate(labelled):
            for reviewer in ("alice", "bob"):
                con.execute("INSERT INTO label_events(candidate_id, generation_id, training_id, reviewer, label, created_at) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (cid, g, t, reviewer, choices[(j + (reviewer == "bob") * (j % 3 == 0)) % 4], stamp))
            if j % 10 == 0:  # a relabel, then an undo of it
                eid = con.execute("INSERT INTO label_events(candidate_id, generation_id, training_id, reviewer, label, created_at) "
                                  "VALUES (?, ?, ?, 'alice', 'unsure', ?)", (cid, g, t, stamp)).lastrowid
                con.execute("INSERT INTO label_events(candidate_id, generation_id, training_id, reviewer, label, created_at, undoes) "
                            "VALUES (?, ?, ?, 'alice', NULL, ?, ?)", (cid, g, t, stamp, eid))
    with ws.connect() as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {"run_id": run_id, "generations": n, "prompts": len(plans), "training": training, "candidates": len(cands),
            "label_events": ws.counts()["label_events"], "seconds": seconds, "store": store,
            "shown_prompt": largest.prompt_id, "grids": grids}


# ---------------------------------------------------------------------------------------- what is measured
def _cli(*argv: str) -> Callable[[], object]:
    from core import cli

    def run() -> int:
        with open(os.devnull, "w") as null:
            old, sys.stdout = sys.stdout, null
            try:
                code = cli.main(list(argv))
            finally:
                sys.stdout = old
        if code != 0:
            raise RuntimeError(f"memaudit {' '.join(argv)} exited {code}")
        return code
    return run


def _op(name: str, ws, run_id: int, info: dict, out: Path) -> Callable[[], object]:
    """Set up (untimed) what operation ``name`` needs; return the call that is timed."""
    from core import labels, results
    from core.audit import plan
    from core.rethreshold import RunCache, prompt_groups

    root = str(ws.root)
    s = ws.settings()
    if name == "memaudit status":
        return _cli("status", root)
    if name == "memaudit runs":
        return _cli("runs", root)
    if name == "memaudit export json":
        return _cli("export", root, "--format", "json", "--out", str(out / "export.json"))
    if name == "memaudit export csv":
        return _cli("export", root, "--format", "csv", "--out", str(out / "export.csv"))
    if name == "overview":
        return lambda: results.overview(ws, run_id)
    if name == "prompt_results":
        return lambda: results.prompt_results(ws, run_id)
    if name == "candidates":
        return lambda: results.candidates(ws, run_id)
    if name == "candidate + neighbours":
        cid = results.candidates(ws, run_id, flagged_only=True)[0].id
        return lambda: (results.get_candidate(ws, cid), results.neighbours(ws, cid))
    if name == "RunCache load":
        return lambda: RunCache(ws, run_id)
    if name in ("recount, run's tau", "recount, other tau"):
        cache = RunCache(ws, run_id)
        tau = s["edge_threshold"] if name == "recount, run's tau" else 0.2
        return lambda: cache.recount(tau, s["min_clique"], s["delta"])
    if name == "prompt_groups (1 prompt)":
        cache = RunCache(ws, run_id)
        return lambda: prompt_groups(ws, run_id, info["shown_prompt"], tau=s["edge_threshold"], min_size=s["group_min_size"],
                                     max_groups=s["max_groups"], cache=cache)
    if name == "labelled_prompts":
        return lambda: results.labelled_prompts(ws, run_id)
    if name == "current_labels":
        return lambda: labels.current_labels(ws)
    if name == "review_queue":
        return lambda: labels.review_queue(ws, run_id, "alice")
    if name == "Review page (review_state)":
        return lambda: labels.review_state(ws, run_id, "alice")
    if name == "agreement":
        return lambda: labels.agreement(ws)
    if name == "candidate_scores":
        return lambda: results.candidate_scores(ws, run_id)
    if name == "Figure 5 (extraction_by_duplicates)":
        return lambda: results.extraction_by_duplicates(ws, run_id)
    if name == "Figure 5 (nearest image's duplicates)":
        return lambda: results.duplicate_extraction_table(ws, run_id)
    if name == "largest_clique_sizes":
        return lambda: results.largest_clique_sizes(ws, run_id)
    if name == "audit plan":
        return lambda: plan(ws)
    raise KeyError(name)


OPS = ("memaudit status", "memaudit runs", "memaudit export json", "memaudit export csv", "overview", "prompt_results",
       "candidates", "candidate + neighbours", "RunCache load", "recount, run's tau", "recount, other tau",
       "prompt_groups (1 prompt)", "labelled_prompts", "current_labels", "review_queue", "Review page (review_state)", "agreement", "candidate_scores",
       "Figure 5 (extraction_by_duplicates)", "Figure 5 (nearest image's duplicates)", "largest_clique_sizes", "audit plan")


def measure(name: str, root: Path, run_id: int, info: dict, repeat: int = 3) -> dict[str, float]:
    """Time ``name`` (first call, then best of ``repeat``) and its peak resident memory above the memory before it."""
    from core.store import Workspace

    ws = Workspace.open(root)
    with tempfile.TemporaryDirectory() as out:
        fn = _op(name, ws, run_id, info, Path(out))
        before = rss_mb()
        reset_peak_rss()
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        peak = peak_rss_mb() - before
        times = []
        for _ in range(repeat - 1):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"first_s": first, "best_s": min([first, *times]), "peak_mb": max(0.0, peak)}


def measure_all(root: Path, info: dict, fresh: bool) -> dict[str, dict[str, float]]:
    out = {}
    for name in OPS:
        if not fresh:
            out[name] = measure(name, root, info["run_id"], info)
            continue
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "--measure", name, str(root), json.dumps(info)],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {name!r} failed:\n{proc.stderr}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------------- sizes and folders
def database_size(root: Path) -> dict[str, float]:
    """The database file's size and its largest tables and indexes (MB), from SQLite's dbstat where built in."""
    import sqlite3

    db = root / "audit.db"
    out = {"audit.db": db.stat().st_size / 1e6}
    con = sqlite3.connect(db)
    try:
        for name, size in con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC LIMIT 8"):
            out[name] = size / 1e6
    except sqlite3.OperationalError:  # SQLite built without dbstat
        pass
    finally:
        con.close()
    return out


def cache_size(root: Path, run_id: int, info: dict) -> dict[str, float]:
    """The run's per-generation arrays and curves as written (MB), and every prompt's distance matrices at
    every cached grid as the audit writes them (n^2 float32 each; here computed, a few written)."""
    d = root / "cache" / f"run-{run_id}"
    arrays = sum(p.stat().st_size for p in d.glob("*.np[yz]"))
    with __import__("sqlite3").connect(root / "audit.db") as con:
        counts = [r[0] for r in con.execute("SELECT generations FROM prompt_results WHERE run_id = ?", (run_id,))]
    matrices = sum(128 + 4 * c * c for c in counts) * len(info["grids"])
    return {"arrays_mb": arrays / 1e6, "distance_matrices_mb": matrices / 1e6}


def largest_folders(paths: list[str]) -> tuple[int, str]:
    """The most entries (files and subfolders) any folder holds, given every file's path; and that folder."""
    entries: dict[str, set[str]] = {}
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), set()).add(parts[i])
    folder = max(entries, key=lambda f: len(entries[f]))
    return len(entries[folder]), folder


def layouts(prompts: int, per_prompt: int) -> list[dict[str, Any]]:
    """The largest folder of ``generate``'s and ``import-generations``' layouts (and the one before shard
    folders) for ``prompts`` x ``per_prompt`` generations and for as many of one unconditional model."""
    from core.store import generation_folder

    total = prompts * per_prompt
    cases = {f"{prompts:,} prompts x {per_prompt}": [(p, s) for p in range(1, prompts + 1) for s in range(per_prompt)],
             f"1 unconditional prompt x {total:,}": [(1, s) for s in range(total)]}
    rows = []
    for case, items in cases.items():
        layouts_ = {"generate": [f"{generation_folder(p, 's', s)}/{s}-x.png" for p, s in items],
                    "import-generations": [f"{generation_folder(p, 'i', s)}/import-{s}.png" for p, s in items],
                    "before shard folders": [f"generations/{p}/{s}-x.png" for p, s in items]}
        for layout, paths in layouts_.items():
            n, folder = largest_folders(paths)
            rows.append({"workload": case, "layout": layout, "largest_folder": n, "folder": folder})
    return rows


# ---------------------------------------------------------------------------------------- main
def main(smoke: bool = False, keep: str | None = None) -> dict:
    base = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="memaudit-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    built, measured, sizes = [], [], []
    try:
        for prompts, per_prompt, training in SIZES[smoke]:
            root = base / f"ws-{prompts * per_prompt}"
            if (root / "build.json").is_file():
                from core.store import Workspace

                info = json.loads((root / "build.json").read_text())
                t0 = time.perf_counter()
                Workspace.open(root)  # applies the migrations this memaudit adds to a workspace built by an earlier one
                info["open_s"] = time.perf_counter() - t0
                print(f"reusing {root}: opened (and migrated) in {info['open_s']:.1f} s")
            else:
                shutil.rmtree(root, ignore_errors=True)
                info = build(root, prompts, per_prompt, training)
                (root / "build.json").write_text(json.dumps(info))
            print(f"{info['generations']:,} generations, {info['prompts']:,} prompts, {info['training']:,} training images, "
                  f"{info['candidates']:,} candidates, {info['label_events']:,} label events: built in "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in info["seconds"].items())
                  + f"; store_results {info['store']['seconds']:.1f} s, {info['store']['peak_mb']:.1f} MB peak (tracemalloc)\n", flush=True)
            built.append(info)
            measured.append(measure_all(root, info, fresh=not smoke))
            sizes.append({"database": database_size(root), "cache": cache_size(root, info["run_id"], info)})
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)

    small, large = measured
    grow = built[1]["generations"] / built[0]["generations"]
    rows = []
    for name in OPS:
        a, b = small[name], large[name]
        rows.append({"operation": name, "small_s": a["best_s"], "large_s": b["best_s"], "large_first_s": b["first_s"],
                     "time_ratio": b["best_s"] / max(a["best_s"], 1e-9), "small_mb": a["peak_mb"], "large_mb": b["peak_mb"]})
    n_small, n_large = (f"{b['generations']:,}" for b in built)
    print_table(rows, ["operation", "small_s", "large_s", "large_first_s", "time_ratio", "small_mb", "large_mb"],
                title=f"best of 3 (s) and peak memory above the process's (MB): small = {n_small} generations, "
                      f"large = {n_large} ({grow:.0f}x); time_ratio about 1: flat, about {grow:.0f}: grows with the workspace")
    per_million = 1e6 / built[1]["generations"]
    size_rows = []
    for info, sz in zip(built, sizes):
        size_rows.append({"generations": info["generations"], "audit.db_mb": sz["database"]["audit.db"],
                          "db_mb_per_million": sz["database"]["audit.db"] * 1e6 / info["generations"],
                          "cache_arrays_mb": sz["cache"]["arrays_mb"], "distance_matrices_mb": sz["cache"]["distance_matrices_mb"],
                          "store_s": info["store"]["seconds"], "store_peak_mb": info["store"]["peak_mb"]})
    print_table(size_rows, list(size_rows[0]), title="database, run cache (matrices at every cached grid), and the audit's storing "
                "stage (store_results under tracemalloc: its peak Python and numpy allocations)")
    print_table([{"object": k, "mb": v, "mb_per_million": v * per_million} for k, v in sizes[1]["database"].items()],
                ["object", "mb", "mb_per_million"], title=f"the largest workspace's database by table and index")
    folder_rows = layouts(*SIZES[smoke][1][:2])
    print_table(folder_rows, ["workload", "layout", "largest_folder", "folder"], title="largest folder under generations/")
    return write_json("scale", smoke, {"built": built, "operations": rows, "sizes": size_rows, "database": sizes[1]["database"],
                                       "layouts": folder_rows})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="200 and 2,000 generations, seconds")
    p.add_argument("--keep", metavar="DIR", help="build the workspaces in DIR and keep them (a second run reuses them)")
    p.add_argument("--measure", nargs=3, metavar=("OP", "WS", "INFO"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        name, root, info = args.measure
        info = json.loads(info)
        print(json.dumps(measure(name, Path(root), info["run_id"], info)))
    else:
        main(args.smoke, args.keep)
