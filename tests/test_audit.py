"""The audit on planted data: exactly the planted prompts are flagged and extracted."""

from pathlib import Path

import numpy as np
import pytest
import torch

from core import audit, curves, labels, results, rethreshold, runs
from core.errors import InputError, MemauditError
from workspaces import FLAGGED, NOT_FLAGGED, planted_workspace


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_workspace(tmp_path_factory.mktemp("planted"))


def test_exactly_the_planted_prompts_are_flagged_and_extracted(planted):
    ws, run_id = planted
    rows = {r.prompt: r for r in results.prompt_results(ws, run_id)}
    assert set(rows) == set(FLAGGED) | set(NOT_FLAGGED)
    assert {p for p, r in rows.items() if r.flagged} == set(FLAGGED)
    assert {p for p, r in rows.items() if r.extracted and r.flagged} == set(FLAGGED)
    assert rows["copy astronaut"].largest_clique == 12
    assert rows["six copies"].largest_clique == 6
    assert rows["flat trap"].largest_clique == 1  # plain L2 would link all 12


def test_flagged_candidates_point_at_the_copied_training_image(planted):
    ws, run_id = planted
    flagged = results.candidates(ws, run_id, flagged_only=True)
    found = {}
    for c in flagged:
        name = c.nearest_training_path and results.get_training(ws, [c.nearest_training_id])[c.nearest_training_id].caption
        found.setdefault(c.prompt, set()).add(name.replace("a photo of ", ""))
        assert c.extracted and c.l2 < 0.05 and c.tiled_l2 >= c.l2
    assert found == {p: set(v) for p, v in FLAGGED.items()}
    # a prompt that copies two training images shows both as separate groups
    two = [c for c in flagged if c.prompt == "two copies"]
    assert sorted(c.clique_size for c in two) == [10, 10] and sorted(c.group_rank for c in two) == [0, 1]


def test_candidates_are_ranked_flagged_first_by_mean_distance(planted):
    ws, run_id = planted
    cands = results.candidates(ws, run_id)
    flags = [c.flagged for c in cands]
    assert flags == sorted(flags, reverse=True)
    means = [c.mean_distance for c in cands if c.flagged]
    assert means == sorted(means)


def test_neighbours_are_sorted_by_exact_distance(planted):
    ws, run_id = planted
    c = results.candidates(ws, run_id, flagged_only=True)[0]
    nbrs = results.neighbours(ws, c.id)
    assert len(nbrs) == min(runs.run_params(ws, run_id).neighbours, 8)
    l2s = [n.l2 for n in nbrs]
    assert l2s == sorted(l2s) and nbrs[0].training.id == c.nearest_training_id


def test_recount_from_cache_matches_a_fresh_run(planted, tmp_path):
    ws, run_id = planted
    cache = rethreshold.RunCache(ws, run_id)
    base = cache.recount(0.1, 10, 0.15)
    assert base.flagged == 3 and base.extracted == 3
    # a lower k flags the six-copy prompt too
    assert {r.prompt for r in cache.recount(0.1, 6, 0.15).prompts if r.flagged} == set(FLAGGED) | {"six copies"}
    # a tiny tau breaks every clique; a tiny delta keeps the cliques but extracts nothing
    assert cache.recount(0.01, 10, 0.15).flagged == 0
    assert cache.recount(0.1, 10, 0.001).extracted == 0
    # the same thresholds through a full audit run agree with the cached recount
    fresh = audit.run_audit(ws, audit.params_from(ws, min_clique=6))
    assert {r.prompt for r in results.prompt_results(ws, fresh) if r.flagged} == set(FLAGGED) | {"six copies"}


def test_prompt_groups_at_any_tau(planted):
    ws, run_id = planted
    pid = next(r.prompt_id for r in results.prompt_results(ws, run_id) if r.prompt == "two copies")
    groups = rethreshold.prompt_groups(ws, run_id, pid, tau=0.1, min_size=3, max_groups=5)
    assert [g.size for g in groups] == [10, 10]
    assert all(g.medoid in g.members for g in groups)
    assert groups[0].neighbours[0].l2 < 0.05
    assert rethreshold.prompt_groups(ws, run_id, pid, tau=0.01, min_size=3, max_groups=5) == []


def test_every_cached_grid_recounts_like_a_run_at_that_grid(planted):
    """The grid slider: a run caches grids 1, 2, 4, 8; recounting at any of them gives what a
    fresh audit at that grid gives, prompt by prompt, and the same clique groups."""
    ws, run_id = planted
    cache = rethreshold.RunCache(ws, run_id)
    size = runs.run_params(ws, run_id).working_size
    assert cache.grid == 4 and cache.grids == [g for g in (1, 2, 4, 8) if size % g == 0] == [1, 2, 4, 8]
    # plain L2 (grid 1) links the flat-texture trap that tiled L2 keeps apart: PAPER.md's reason for tiles
    assert {r.prompt for r in cache.recount(0.1, 10, 0.15, grid=1).prompts if r.flagged} == set(FLAGGED) | {"flat trap"}
    assert {r.prompt for r in cache.recount(0.1, 10, 0.15).prompts if r.flagged} == set(FLAGGED)
    two = next(r.prompt_id for r in results.prompt_results(ws, run_id) if r.prompt == "two copies")
    for g in cache.grids:
        fresh = rethreshold.RunCache(ws, audit.run_audit(ws, audit.params_from(ws, grid=g, grid_choices="")))
        assert fresh.grids == [g]
        for tau, k, delta in ((0.1, 10, 0.15), (0.05, 6, 0.15), (0.2, 3, 0.05)):
            mine, theirs = cache.recount(tau, k, delta, grid=g), fresh.recount(tau, k, delta)
            assert mine.grid == theirs.grid == g
            assert [(r.prompt, r.largest_clique, r.flagged, r.extracted) for r in mine.prompts] == \
                   [(r.prompt, r.largest_clique, r.flagged, r.extracted) for r in theirs.prompts]
        for pid in cache.prompt_ids:
            np.testing.assert_allclose(cache.distances(int(pid), g), fresh.distances(int(pid)), atol=1e-5, rtol=0)
        ours = rethreshold.prompt_groups(ws, run_id, two, tau=0.1, min_size=3, max_groups=5, grid=g, cache=cache)
        again = rethreshold.prompt_groups(ws, fresh.run_id, two, tau=0.1, min_size=3, max_groups=5, cache=fresh)
        assert [sorted(m.id for m in x.members) for x in ours] == [sorted(m.id for m in x.members) for x in again]
        for x, y in zip(ours, again):
            assert [n.training.id for n in x.neighbours] == [n.training.id for n in y.neighbours]
            np.testing.assert_allclose([n.tiled_l2 for n in x.neighbours], [n.tiled_l2 for n in y.neighbours], atol=1e-6)
            assert all(n.tiled_l2 >= n.l2 - 1e-6 for n in x.neighbours)


def test_an_uncached_grid_says_how_to_get_it(planted):
    ws, _ = planted
    run = audit.run_audit(ws, audit.params_from(ws, grid_choices=""))
    cache = rethreshold.RunCache(ws, run)
    assert cache.grids == [4]
    assert not list(cache.dir.glob("*-g*.npy"))  # nothing cached beyond the run's grid
    with pytest.raises(InputError, match=r"cached tile grids 4, not 2; audit again with --grid-choices including 2"):
        cache.recount(0.1, 10, 0.15, grid=2)
    with pytest.raises(ValueError, match="grid_choices must be grids separated by commas"):
        audit.params_from(ws, grid_choices="1,two")


def test_runs_cached_before_the_grid_slider_still_load(planted):
    """A cache written before grids were cached (2-D curves, no grids key) reads as its own grid alone."""
    ws, run_id = planted
    run = audit.run_audit(ws)
    d = ws.root / "cache" / f"run-{run}"
    c = dict(np.load(d / "curves.npz"))
    g = c.pop("grids").tolist().index(4)
    np.savez(d / "curves.npz", **{k: (v[g] if k in ("size", "medoid", "mean") else v) for k, v in c.items()})
    for f in d.rglob("*-g*.npy"):
        f.unlink()
    old, new = rethreshold.RunCache(ws, run), rethreshold.RunCache(ws, run_id)
    assert old.grids == [4]
    assert old.recount(0.1, 10, 0.15).prompts == new.recount(0.1, 10, 0.15).prompts


def test_curve_workers_give_exactly_the_inline_curves(planted):
    """Tau curves from two worker processes equal those of the audit's own process, bit for bit."""
    ws, _ = planted
    caches = []
    for workers in (0, 2):
        ws.set_setting("audit_workers", workers)
        caches.append(rethreshold.RunCache(ws, audit.run_audit(ws)))
    ws.set_setting("audit_workers", -1)
    inline, pooled = caches
    for name in ("size", "medoid", "mean"):
        assert np.array_equal(getattr(inline, name), getattr(pooled, name)), name
    assert inline.recount(0.1, 10, 0.15).prompts == pooled.recount(0.1, 10, 0.15).prompts


def test_curve_workers_are_chosen_by_setting_cores_and_work(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert curves.curve_workers(-1, 400, 500) == 8           # automatic: one per core, at most 8
    assert curves.curve_workers(-1, 400, 12) == 0            # tiny prompts: curves take milliseconds
    assert curves.curve_workers(-1, 12, 500) == 3            # no more workers than 4 curves each
    assert curves.curve_workers(3, 400, 12) == 3             # an explicit number is used as given
    assert curves.curve_workers(0, 400, 500) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert curves.curve_workers(-1, 400, 500) == 0           # one core: nothing to overlap with


def test_a_curve_worker_that_dies_fails_the_audit_in_one_line_and_leaves_no_run(planted, monkeypatch):
    import subprocess
    import sys

    ws, _ = planted
    before = [r.id for r in runs.list_runs(ws)]

    def start(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True) for _ in range(self.workers)]

    monkeypatch.setattr(curves.Curves, "_start", start)
    ws.set_setting("audit_workers", 2)
    try:
        with pytest.raises(MemauditError, match=r"a tau-curve worker process ended unexpectedly \(exit code 3\); "
                                                r"set audit_workers to 0"):
            audit.run_audit(ws)
    finally:
        ws.set_setting("audit_workers", -1)
    assert [r.id for r in runs.list_runs(ws)] == before
    with ws.connect() as con:
        assert con.execute("SELECT COUNT(*) FROM audit_runs WHERE status = 'running'").fetchone()[0] == 0
    assert sorted(p.name for p in (ws.root / "cache").iterdir()) == sorted(f"run-{r}" for r in before)


def test_a_curve_worker_reports_bad_input_and_budget_bounds(tmp_path):
    """The worker as a process: a missing file is an error line, a tiny budget a warning, EOF ends it."""
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    x = rng.random((40, 40)).astype(np.float32) * 0.2
    dist = np.minimum(x, x.T)
    np.fill_diagonal(dist, 0)
    np.save(tmp_path / "d.npy", dist)
    proc = subprocess.run([sys.executable, "-m", "core.curves"], capture_output=True, text=True, timeout=120,
                          input="\n".join(json.dumps({**t, "taus": curves.TAU_GRID.tolist()}) for t in (
                              {"dist": str(tmp_path / "d.npy"), "budget": 500000},
                              {"dist": str(tmp_path / "gone.npy"), "budget": 10},
                              {"dist": str(tmp_path / "d.npy"), "budget": 1})) + "\n",
                          cwd=str(Path(audit.__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr
    good, missing, starved = (json.loads(line) for line in proc.stdout.splitlines())
    size, medoid, mean, exact = curves.tau_curve(dist)
    assert good["size"] == size.tolist() and good["medoid"] == medoid.tolist() and all(good["exact"]) and exact.all()
    assert np.array_equal(np.asarray(good["mean"], np.float32), mean)
    assert missing["error"].startswith("FileNotFoundError") and "Traceback" in missing["traceback"]
    # a budget too small to finish marks the curve's points as lower bounds instead of passing them for exact
    assert not all(starved["exact"])
    assert all(s <= t for s, t in zip(starved["size"], size.tolist()))


def test_figure5_table_counts_prompts_by_duplicate_count(planted):
    ws, run_id = planted
    table = results.duplicate_extraction_table(ws, run_id)
    assert sum(r["prompts"] for r in table) == len(FLAGGED) + len(NOT_FLAGGED)
    assert sum(r["extracted"] or 0 for r in table) >= len(FLAGGED)


def test_audit_without_inputs_says_what_to_do(tmp_path):
    from core.store import Workspace

    ws = Workspace.init(tmp_path / "ws")
    with pytest.raises(InputError, match="no generations"):
        audit.run_audit(ws)
    with pytest.raises(InputError, match="no audit run"):
        results.candidates(ws)


def test_bad_grid_is_refused_before_any_work(planted):
    ws, _ = planted
    before = len(runs.list_runs(ws))
    with pytest.raises(InputError, match="grid 3 does not divide"):
        audit.run_audit(ws, audit.params_from(ws, grid=3))
    assert len(runs.list_runs(ws)) == before


def _runs_agree(ws, a: int, b: int, atol: float) -> None:
    """Two audit runs of the same workspace: the same verdicts, cliques and curves; distances within atol."""
    ca, cb = rethreshold.RunCache(ws, a), rethreshold.RunCache(ws, b)
    assert ca.grids == cb.grids and np.array_equal(ca.gen_ids, cb.gen_ids)
    for g in ca.grids:
        for pid in ca.prompt_ids:
            da, db = ca.distances(int(pid), g), cb.distances(int(pid), g)
            np.testing.assert_allclose(db, da, atol=atol, rtol=0)
            assert np.all(np.diag(db) == 0) and np.array_equal(db == 0, da == 0)  # identical images exactly 0
        np.testing.assert_allclose(cb.nn_tiled[g], ca.nn_tiled[g], atol=atol, rtol=0)
    np.testing.assert_allclose(cb.nn_l2, ca.nn_l2, atol=atol, rtol=0)
    assert np.array_equal(ca.nn_ids, cb.nn_ids) and np.array_equal(ca.size, cb.size)
    verdicts = lambda c: [(r.prompt, r.largest_clique, r.flagged, r.extracted) for r in c.recount(0.1, 10, 0.15).prompts]  # noqa: E731
    assert verdicts(ca) == verdicts(cb)


def test_audit_device_setting_picks_the_device_and_refuses_a_missing_gpu_before_any_work(planted):
    ws, run_id = planted
    cuda = torch.cuda.is_available()
    assert audit.audit_device("cpu") == "cpu"
    assert audit.audit_device("auto") == ("cuda" if cuda else "cpu")
    assert ws.settings()["audit_device"] == "cpu"  # the default: distances stay on the CPU unless asked
    ws.set_setting("audit_device", "auto")
    try:
        _runs_agree(ws, run_id, audit.run_audit(ws), atol=1e-4 if cuda else 0.0)
        if not cuda:
            before = len(runs.list_runs(ws))
            ws.set_setting("audit_device", "cuda")
            with pytest.raises(InputError, match="no CUDA GPU is usable here"):
                audit.run_audit(ws)
            assert len(runs.list_runs(ws)) == before
    finally:
        ws.set_setting("audit_device", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_audit_on_cuda_agrees_with_the_cpu(planted):
    """Distances on the GPU (pairwise and to training images): the CPU run's verdicts, 1e-4 of its distances."""
    ws, run_id = planted
    ws.set_setting("audit_device", "cuda")
    try:
        _runs_agree(ws, run_id, audit.run_audit(ws), atol=1e-4)
    finally:
        ws.set_setting("audit_device", "cpu")


def test_labels_are_append_only_with_undo_and_agreement(planted):
    ws, run_id = planted
    cands = results.candidates(ws, run_id, flagged_only=True)
    a, b = cands[0], cands[1]
    e1 = labels.add_label(ws, a.id, "exact_copy", "alice", token="t1")
    assert labels.add_label(ws, a.id, "exact_copy", "alice", token="t1") == e1  # retried click stored once
    labels.add_label(ws, a.id, "near_copy", "bob")
    labels.add_label(ws, b.id, "not_memorized", "alice")
    current = labels.current_labels(ws)
    assert current[(a.medoid_generation_id, a.nearest_training_id)] == {"alice": "exact_copy", "bob": "near_copy"}
    undo = labels.undo_last(ws, "alice")
    assert undo is not None
    assert (b.medoid_generation_id, b.nearest_training_id) not in labels.current_labels(ws)
    events = labels.label_events(ws)
    assert [e.label for e in events][-1] is None and events[-1].undoes is not None
    assert len([c for c in labels.review_queue(ws, run_id, "alice") if c.id == a.id]) == 0
    with pytest.raises(InputError, match="label must be one of"):
        labels.add_label(ws, a.id, "maybe", "alice")
    with pytest.raises(InputError, match="reviewer name is required"):
        labels.add_label(ws, a.id, "unsure", "  ")
    agreement = labels.agreement(ws)
    assert agreement.pairs[("alice", "bob")][1] == 1


def test_cohen_kappa_hand_computed():
    # 10 items: p_o = 0.7; a: 5 yes 5 no; b: 6 yes 4 no -> p_e = 0.5*0.6 + 0.5*0.4 = 0.5 -> kappa = 0.4
    a = ["y"] * 5 + ["n"] * 5
    b = ["y", "y", "y", "y", "n", "y", "y", "n", "n", "n"]
    assert sum(x == y for x, y in zip(a, b)) == 7
    assert labels.cohen_kappa(a, b) == pytest.approx(0.4)
    assert labels.cohen_kappa(["y"] * 3, ["y"] * 3) == 1.0
    assert labels.cohen_kappa([], []) is None


def test_unconditional_generations_use_relative_l2(tmp_path):
    """Generations with no prompt: extracted when rel = l2 / (alpha * mean l2 to n nearest) < 1."""
    import csv

    from PIL import Image

    from core.importer import import_generations
    from core.store import Workspace
    from core.training import add_training
    from workspaces import planted_files, training_arrays

    files = planted_files(tmp_path / "data")
    ws = Workspace.init(tmp_path / "ws")
    add_training(ws, files["train"], captions=files["captions"])
    train = training_arrays()
    rng = np.random.default_rng(1)
    gdir = tmp_path / "uncond"
    gdir.mkdir()
    with open(gdir / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "prompt"])
        Image.fromarray(np.clip(train["coffee"] + rng.normal(0, 3, train["coffee"].shape), 0, 255).astype(np.uint8)).save(gdir / "copy.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(gdir / "noise.png")
        w.writerow(["copy.png", ""])
        w.writerow(["noise.png", ""])
    import_generations(ws, gdir / "m.csv")
    run = audit.run_audit(ws, audit.params_from(ws, relative_n=5))
    cands = {c.medoid_path.split("/")[-1]: c for c in results.candidates(ws, run) if c.prompt is None}
    copy = next(c for c in cands.values() if c.extracted)
    assert copy.relative_l2 < 0.5 and copy.l2 < 0.05
    assert sum(c.extracted for c in cands.values()) == 1


def test_recount_at_the_runs_thresholds_equals_the_run_when_a_second_group_is_the_extraction(tmp_path):
    """A prompt whose largest clique copies nothing in the training set and whose second group copies a
    training image: the run counts it extracted, and so must the recount at the run's own thresholds."""
    import csv

    from PIL import Image

    from core.importer import import_generations
    from core.store import Workspace
    from core.training import add_training
    from workspaces import _faces, _noisy, planted_files, training_arrays

    files = planted_files(tmp_path / "data")
    ws = Workspace.init(tmp_path / "ws")
    add_training(ws, files["train"], captions=files["captions"])
    import_generations(ws, files["manifest"])
    rng = np.random.default_rng(5)
    face = _faces(1, rng)[0]  # not in the training set
    images = [_noisy(face, rng) for _ in range(14)] + [_noisy(training_arrays()["rocket"], rng) for _ in range(10)]
    gdir = tmp_path / "second"
    gdir.mkdir()
    with open(gdir / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "prompt", "seed"])
        for j, arr in enumerate(images):
            Image.fromarray(arr).save(gdir / f"s{j}.png")
            w.writerow([f"s{j}.png", "second group copies", j])
    import_generations(ws, gdir / "m.csv")
    run_id = audit.run_audit(ws, audit.params_from(ws, grid_choices=""))
    rows = {r.prompt: r for r in results.prompt_results(ws, run_id)}
    second = rows["second group copies"]
    assert second.flagged and second.extracted and second.largest_clique == 14 and second.best_l2 > 0.15
    p = runs.run_params(ws, run_id)
    r = rethreshold.RunCache(ws, run_id).recount(p.edge_threshold, p.min_clique, p.delta)
    assert r.flagged == sum(x.flagged for x in rows.values())
    assert r.extracted == sum(x.extracted for x in rows.values())
    assert {x.prompt: (x.flagged, x.extracted) for x in r.prompts} == {k: (v.flagged, v.extracted) for k, v in rows.items()}
    # off the run's tau only the largest clique is known: this prompt then counts as not extracted
    off = rethreshold.RunCache(ws, run_id).recount(p.edge_threshold + 0.005, p.min_clique, p.delta)
    assert not next(x for x in off.prompts if x.prompt == "second group copies").extracted


def test_the_run_tau_is_on_the_curve_and_the_setting_stops_where_the_curve_does(planted):
    from core import config

    ws, _ = planted
    run_id = audit.run_audit(ws, audit.params_from(ws, edge_threshold=0.1234, grid_choices=""))
    cache = rethreshold.RunCache(ws, run_id)
    assert 0.1234 in cache.taus.tolist() and cache.taus.max() == pytest.approx(config.TAU_MAX)
    assert cache.recount(0.1234, 10, 0.15).tau == pytest.approx(0.1234)
    with pytest.raises(ValueError, match="edge_threshold must be <= 0.3"):
        config.check("edge_threshold", 0.35)


def test_the_search_and_measuring_every_training_image_give_the_same_run(planted, monkeypatch):
    """A small training set is measured whole (exact integer products); the certified search gives the
    same run: the same neighbours, verdicts and curves, distances within float rounding."""
    from core import nearest

    ws, run_id = planted
    monkeypatch.setattr(nearest, "EXHAUSTIVE_PER_SHOWN", 0)  # the certified search for every generation
    searched = audit.run_audit(ws)
    _runs_agree(ws, run_id, searched, atol=1e-6)
    exact = [np.load(runs.cache_dir(ws, r) / "nn_exact.npy") for r in (run_id, searched)]
    assert rethreshold.RunCache(ws, run_id).nn_certified.all() and (exact[0] == len(results.get_training(ws))).all()
    assert (exact[1] <= exact[0]).all()
