"""A workspace that holds millions: the page and command queries search indexes instead of scanning
(checked on the plans SQLite makes for the statements they really run), no folder of the layout
grows past about a thousand entries, and workspaces written under the earlier layout stay readable.
Their cost at a million generations is measured in benchmarks/bench_scale.py."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3

import numpy as np
import pytest

import core.store
from core import audit, duplicates, importer, maintenance, results, rethreshold, runs
from core.store import FILES_PER_FOLDER, Workspace, generation_folder
from workspaces import planted_files, planted_workspace


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_workspace(tmp_path_factory.mktemp("scale-planted"))


def query_plans(ws: Workspace, monkeypatch, fn) -> list[tuple[str, str]]:
    """Run ``fn()`` and return (statement, its query plan) for every SELECT it ran on ``ws``."""
    statements: list[str] = []
    real = Workspace.connect

    @contextlib.contextmanager
    def traced(self):
        with real(self) as con:
            con.set_trace_callback(statements.append)  # the statement with its parameters bound
            yield con

    monkeypatch.setattr(Workspace, "connect", traced)
    fn()
    monkeypatch.setattr(Workspace, "connect", real)
    con = sqlite3.connect(ws.db_path)
    try:
        return [(s, " | ".join(r[3] for r in con.execute("EXPLAIN QUERY PLAN " + s)))
                for s in statements if s.lstrip().upper().startswith("SELECT")]
    finally:
        con.close()


def plan_of(plans: list[tuple[str, str]], fragment: str) -> str:
    found = [p for s, p in plans if fragment in s]
    assert found, f"no statement containing {fragment!r} ran"
    return " || ".join(found)


def test_the_migration_adds_the_indexes_a_large_workspace_needs(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    with ws.connect() as con:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        applied = {r[0] for r in con.execute("SELECT name FROM migrations")}
    assert {"candidates_prompt", "training_caption", "training_unchecked"} <= names
    assert "indexes for large workspaces" in applied


def test_prompt_table_and_figure5_probe_candidates_per_prompt(planted, monkeypatch):
    """One index search per prompt, not a scan of the run's candidates per prompt (quadratic in prompts)."""
    ws, run_id = planted
    want = results.prompt_results(ws, run_id)
    plans = query_plans(ws, monkeypatch, lambda: results.prompt_results(ws, run_id))
    plan = plan_of(plans, "FROM prompt_results r")
    assert plan.count("candidates_prompt") == 3 and "SCAN c" not in plan, plan
    assert results.prompt_results(ws, run_id) == want

    plans = query_plans(ws, monkeypatch, lambda: results.duplicate_extraction_table(ws, run_id))
    plan = plan_of(plans, "t.duplicate_count AS k")
    assert "candidates_prompt" in plan and "SCAN c" not in plan, plan


def test_figure5_by_caption_searches_the_caption_index(planted, monkeypatch):
    """Prompts that are training captions meet their images through an index, not a pass over the training set per prompt."""
    ws, run_id = planted
    plans = query_plans(ws, monkeypatch, lambda: results.caption_duplicate_table(ws, run_id))
    plan = plan_of(plans, "t.caption = p.text")
    assert "training_caption" in plan and "SCAN t" not in plan, plan


def test_status_and_the_run_cache_do_not_pass_over_every_generation(planted, monkeypatch):
    ws, run_id = planted
    plans = query_plans(ws, monkeypatch, ws.counts)
    plan = plan_of(plans, "FROM prompts p WHERE EXISTS")
    assert "SEARCH g USING COVERING INDEX generations_prompt" in plan, plan
    assert ws.counts()["prompts"] == len(results.prompt_results(ws, run_id))

    plans = query_plans(ws, monkeypatch, lambda: rethreshold.RunCache(ws, run_id))
    assert not [s for s, p in plans if ("JOIN generations" in s or "FROM generations" in s) and "SCAN" in p], plans


def test_duplicate_counts_check_asks_the_unchecked_index(planted, monkeypatch):
    ws, _ = planted
    plans = query_plans(ws, monkeypatch, lambda: duplicates.is_current(ws))
    plan = plan_of(plans, "duplicates_checked = 0")
    assert "SCAN training_images USING INDEX training_unchecked" in plan, plan  # the partial index: empty once all are checked


def test_the_run_cache_counts_the_generations_the_run_audited(planted, tmp_path):
    """A generation added after the run does not change the run's counts (the prompt table agrees)."""
    src, run_id = planted
    ws = Workspace.open(shutil.copytree(src.root, tmp_path / "ws"))
    pid = results.prompt_results(ws, run_id)[0].prompt_id
    before = rethreshold.RunCache(ws, run_id).prompt_count
    with ws.transaction() as con:
        con.execute("INSERT INTO generations(prompt_id, path, sha256, width, height, source, origin, created_at) "
                    "VALUES (?, 'generations/late.png', 'x', 64, 64, 'import', '/late.png', 'now')", (pid,))
    after = rethreshold.RunCache(ws, run_id).prompt_count
    assert after == before == {r.prompt_id: r.generations for r in results.prompt_results(ws, run_id)}


# ------------------------------------------------------------------------------------------ layout
def test_generation_folders_shard_prompts_and_images_by_the_thousand():
    assert generation_folder(7, "s", 12) == "generations/p0/7/s0"
    assert generation_folder(12_345, "s", 2_500) == "generations/p12/12345/s2"
    assert generation_folder(12_345, "i", 999) == "generations/p12/12345/i0"
    folders = {generation_folder(1, "s", s) for s in range(1_000_000)}  # one unconditional model, a million seeds
    assert len(folders) == 1_000_000 // FILES_PER_FOLDER
    with pytest.raises(ValueError, match="kind"):
        generation_folder(1, "x", 0)


def test_import_starts_a_new_folder_every_thousand_images_of_a_prompt_and_carries_on_after(tmp_path, monkeypatch):
    """(With the thousand made 4:) a prompt's imports fill i0, i1, ... in order, across imports."""
    monkeypatch.setattr(core.store, "FILES_PER_FOLDER", 4)
    files = planted_files(tmp_path / "files")
    ws = Workspace.init(tmp_path / "ws")
    manifest = files["manifest"]
    lines = manifest.read_text().splitlines()
    first = manifest.with_name("first.csv")
    first.write_text("\n".join(lines[:11]) + "\n")  # header + 10 rows
    assert importer.import_generations(ws, first).imported == 10
    assert importer.import_generations(ws, manifest).imported == len(lines) - 11
    with ws.connect() as con:
        rows = con.execute("SELECT prompt_id, path FROM generations ORDER BY id").fetchall()
    per_folder: dict[str, int] = {}
    for r in rows:
        folder = r["path"].rsplit("/", 1)[0]
        per_folder[folder] = per_folder.get(folder, 0) + 1
        assert folder.startswith(f"generations/p{r['prompt_id'] // 4}/{r['prompt_id']}/i")
    assert max(per_folder.values()) == 4
    for pid in {r["prompt_id"] for r in rows}:  # consecutive folders, each full but the last
        counts = [per_folder[generation_folder(pid, "i", 4 * k)] for k in range(len([f for f in per_folder if f"/{pid}/" in f]))]
        assert all(c == 4 for c in counts[:-1]) and 1 <= counts[-1] <= 4
    assert maintenance.verify(ws).ok


def test_a_workspace_written_under_the_earlier_layout_stays_readable(planted, tmp_path, monkeypatch):
    """Generation files at generations/<prompt_id>/ and a run's distance matrices directly in its folder
    (the layout before shard folders) are read where they are, and new imports go beside them."""
    src, run_id = planted
    ws = Workspace.open(shutil.copytree(src.root, tmp_path / "ws"))
    cache = runs.cache_dir(ws, run_id)
    pid = next(r.prompt_id for r in results.prompt_results(ws, run_id) if r.prompt == "two copies")
    want = rethreshold.prompt_groups(ws, run_id, pid, tau=0.1, min_size=3, max_groups=5)
    for f in list(cache.glob("p*/prompt-*.npy")):  # distance matrices back where earlier runs kept them
        f.rename(cache / f.name)
    with ws.transaction() as con:  # generation files back at generations/<prompt_id>/
        for gid, path, p in con.execute("SELECT id, path, prompt_id FROM generations").fetchall():
            old = f"generations/{p}/{path.rsplit('/', 1)[1]}"
            (ws.root / old).parent.mkdir(parents=True, exist_ok=True)
            (ws.root / path).rename(ws.root / old)
            con.execute("UPDATE generations SET path = ? WHERE id = ?", (old, gid))
    assert not list(cache.glob("p*/prompt-*.npy"))
    got = rethreshold.prompt_groups(ws, run_id, pid, tau=0.1, min_size=3, max_groups=5)
    assert [(g.size, g.medoid.id, g.mean_distance) for g in got] == [(g.size, g.medoid.id, g.mean_distance) for g in want]
    assert all(ws.resolve(m.path).is_file() for g in got for m in g.members)
    assert maintenance.verify(ws).ok
    again = audit.run_audit(ws)  # an audit reads the old files and writes its cache in the new layout
    assert [r.flagged for r in results.prompt_results(ws, again)] == [r.flagged for r in results.prompt_results(ws, run_id)]
    assert list(runs.cache_dir(ws, again).glob("p0/prompt-*.npy"))
    assert np.array_equal(rethreshold.RunCache(ws, again).distances(pid), rethreshold.RunCache(ws, run_id).distances(pid))


def test_the_review_page_reads_the_runs_candidates_once(planted, tmp_path, monkeypatch):
    """The queue, its flagged-only filter and the reviewer's progress come from one read of the candidates."""
    from core import labels

    src, run_id = planted
    ws = Workspace.open(shutil.copytree(src.root, tmp_path / "ws"))
    cands = results.candidates(ws, run_id)
    labels.add_label(ws, cands[0].id, "exact_copy", "ann")
    labels.add_label(ws, cands[-1].id, "unsure", "ann")
    labels.add_label(ws, cands[1].id, "near_copy", "ben")
    reads = []
    real = results.candidates
    monkeypatch.setattr(results, "candidates", lambda *a, **k: reads.append(1) or real(*a, **k))
    for unlabelled in (True, False):
        for flagged in (True, False):
            reads.clear()
            state = labels.review_state(ws, run_id, "ann", unlabeled_only=unlabelled, flagged_only=flagged)
            assert len(reads) == 1
            done = {cands[0].id, cands[-1].id}
            assert [c.id for c in state.queue] == [c.id for c in cands if not (unlabelled and c.id in done)
                                                   and (c.flagged or not flagged)]
            assert (state.candidates, state.labelled_by_reviewer) == (len(cands), 2)
            assert state.labels == labels.current_labels(ws)
    assert [c.id for c in labels.review_queue(ws, run_id, "ann")] == [c.id for c in cands if c.id not in done]
