"""Per-image duplicate counts (core.duplicates) on real photographs, real SQLite and real faiss.

Every count is checked against brute force: the exact normalised L2 of every pair of training
images at the working size, computed here from the stored files independently of the code.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import duplicates
from core.cli import main
from core.embed import PixelEmbedder
from core.images import load_image, to_working
from core.store import Workspace
from core.training import add_training, top_duplicated

SIZE = 64  # the default duplicate_size


def brute_force_counts(ws: Workspace, threshold: float | None = None, size: int = SIZE) -> dict[str, int]:
    """Source file name -> number of training images within ``threshold`` of it (itself included)."""
    threshold = float(ws.get_setting("duplicate_threshold")) if threshold is None else threshold
    with ws.connect() as con:
        rows = con.execute("SELECT source_path, path FROM training_images ORDER BY id").fetchall()
    x = np.stack([np.rint(to_working(load_image(ws.resolve(r[1])), size) * 255).reshape(-1) for r in rows]).astype(np.float64)
    sq = (x * x).sum(axis=1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T)  # integers, exact in float64 at these sizes
    l2 = np.sqrt(np.maximum(d2, 0) / x.shape[1]) / 255.0
    return {Path(r[0]).name: int(c) for r, c in zip(rows, (l2 <= threshold).sum(axis=1))}


def stored_counts(ws: Workspace) -> dict[str, int]:
    with ws.connect() as con:
        return {Path(r[0]).name: int(r[1]) for r in con.execute("SELECT source_path, duplicate_count FROM training_images")}


def save(arr: np.ndarray, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def texture_crops(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` distinct 64 x 64 crops of scikit-image's grass and gravel photographs (160 x 160 windows, area-resized).

    At 16 x 16 pooling they look alike (one chain of pooled L2 <= 0.1 links joins most of them),
    while any two are more than 0.13 apart in exact normalised L2 at 64 x 64."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [np.stack([data.grass()] * 3, -1), np.stack([data.gravel()] * 3, -1)]
    out = []
    for i in range(n):
        src = sources[i % 2]
        y, x = int(rng.integers(0, src.shape[0] - 160)), int(rng.integers(0, src.shape[1] - 160))
        out.append(np.asarray(Image.fromarray(src[y:y + 160, x:x + 160]).resize((64, 64), Image.Resampling.BOX)))
    return out


def brighter(arr: np.ndarray, levels: int) -> np.ndarray:
    return np.clip(arr.astype(np.int16) + levels, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def chain_folder(tmp_path_factory) -> tuple[Path, Path, dict[str, int]]:
    return write_chain_folder(tmp_path_factory.mktemp("chains"))


def write_chain_folder(root: Path) -> tuple[Path, Path, dict[str, int]]:
    """The measured case: 200 distinct crops, ten present 20 times, ten 5 times, the rest once.

    Copies are byte copies, brightness shifts (+-2 levels) and JPEG re-encodes; every copy has its
    original's caption. Returns (folder, captions file, expected count by file name)."""
    folder = root / "train"
    crops = texture_crops(200)
    expected: dict[str, int] = {}
    captions = [("file", "caption")]
    for i, crop in enumerate(crops):
        copies = 20 if i < 10 else 5 if i < 20 else 1
        names = [f"crop{i:03d}.png"]
        save(crop, folder / names[0])
        for j in range(1, copies):
            kind = j % 4
            if kind == 0:
                name = f"copies/crop{i:03d}-{j}.png"
                (folder / name).parent.mkdir(exist_ok=True)
                (folder / name).write_bytes((folder / names[0]).read_bytes())
            elif kind == 1:
                name = f"copies/crop{i:03d}-{j}.jpg"
                save(crop, folder / name, quality=90)
            else:
                name = f"copies/crop{i:03d}-{j}.png"
                save(brighter(crop, 2 if kind == 2 else -2), folder / name)
            names.append(name)
        for name in names:
            expected[Path(name).name] = copies
            captions.append((name, f"texture {i}"))
    buf = io.StringIO()
    csv.writer(buf).writerows(captions)
    (root / "captions.csv").write_text(buf.getvalue())
    return folder, root / "captions.csv", expected


def test_chains_of_look_alike_images_do_not_merge(chain_folder, tmp_path, capsys):
    folder, captions, expected = chain_folder
    ws = Workspace.init(tmp_path / "ws")
    report = add_training(ws, folder, captions)
    assert report.added == 430
    truth = brute_force_counts(ws)
    assert truth == expected  # the construction holds: copies within 0.1 of each other, distinct crops farther
    assert stored_counts(ws) == expected

    # under 16 x 16 pooling, links chain most distinct crops together (what connected components counted)
    with ws.connect() as con:
        originals = [r[1] for r in con.execute("SELECT source_path, path FROM training_images ORDER BY id")
                     if Path(r[0]).parent == folder.resolve()]
    assert len(originals) == 200
    pooled = PixelEmbedder(16).embed([load_image(ws.resolve(p)) for p in originals])
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    dist = np.sqrt(((pooled[:, None] - pooled[None]) ** 2).sum(-1))
    _, labels = connected_components(csr_matrix(dist <= 0.1))
    assert np.bincount(labels).max() > 150

    # `memaudit duplicates --top 10` names the ten 20-copy captions, each with its own count
    assert main(["duplicates", str(ws.root), "--top", "10", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert sorted(g["caption"] for g in groups) == sorted(f"texture {i}" for i in range(10))
    assert {g["count"] for g in groups} == {20}
    top = top_duplicated(ws, 20)
    assert [n for _, n, _ in top] == [20] * 10 + [5] * 10
    # browsing groups are the copies of one crop, never a chain
    with ws.connect() as con:
        sizes = sorted(r[0] for r in con.execute("SELECT COUNT(*) FROM training_images GROUP BY duplicate_group"))
    assert sizes == [1] * 180 + [5] * 10 + [20] * 10


def chain_of_three(root: Path) -> dict[str, np.ndarray]:
    """A photograph at three brightness levels 15/255 apart (no clipping): neighbours 0.059 apart, the ends 0.118."""
    from skimage import data

    base = np.asarray(Image.fromarray(data.astronaut()[100:356, 150:406]).resize((64, 64), Image.Resampling.BOX))
    base = (40 + base.astype(np.float64) * 0.6).astype(np.uint8)
    images = {"dark.png": brighter(base, -15), "mid.png": base, "light.png": brighter(base, 15)}
    for name, arr in images.items():
        save(arr, root / name)
    return images


def test_counts_are_per_image_not_per_chain(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    chain_of_three(tmp_path / "a")
    add_training(ws, tmp_path / "a")
    assert stored_counts(ws) == {"dark.png": 2, "mid.png": 3, "light.png": 2}
    with ws.connect() as con:
        pairs = con.execute("SELECT a, b, l2 FROM duplicate_pairs ORDER BY a, b").fetchall()
        names = {r[0]: Path(r[1]).name for r in con.execute("SELECT id, source_path FROM training_images")}
    assert sorted(tuple(sorted((names[a], names[b]))) for a, b, _ in pairs) == [("dark.png", "mid.png"), ("light.png", "mid.png")]
    assert all(abs(l2 - 15 / 255) < 1e-12 for _, _, l2 in pairs)  # exact: every pixel moved by 15 levels
    # a threshold between the two distances counts the ends too; one below every distance counts nothing
    ws.set_setting("duplicate_threshold", 0.12)
    duplicates.ensure(ws)
    assert stored_counts(ws) == {"dark.png": 3, "mid.png": 3, "light.png": 3}
    ws.set_setting("duplicate_threshold", 0.05)
    duplicates.ensure(ws)
    assert stored_counts(ws) == {"dark.png": 1, "mid.png": 1, "light.png": 1}


def test_exact_and_near_duplicates_at_threshold_zero_and_default(tmp_path):
    from skimage import data

    ws = Workspace.init(tmp_path / "ws")
    src = tmp_path / "t"
    coffee = np.asarray(Image.fromarray(data.coffee()).resize((96, 64), Image.Resampling.BOX))
    save(coffee, src / "coffee.png")
    (src / "same-bytes.png").write_bytes((src / "coffee.png").read_bytes())
    save(coffee, src / "coffee-q85.jpg", quality=85)
    save(brighter(coffee, 5), src / "coffee-brighter.png")
    save(np.asarray(Image.fromarray(data.chelsea()).resize((96, 64), Image.Resampling.BOX)), src / "cat.png")
    ws.set_setting("duplicate_threshold", 0.0)
    add_training(ws, src)
    assert stored_counts(ws) == brute_force_counts(ws) == {"coffee.png": 2, "same-bytes.png": 2, "coffee-q85.jpg": 1,
                                                           "coffee-brighter.png": 1, "cat.png": 1}
    ws.set_setting("duplicate_threshold", 0.1)
    duplicates.ensure(ws)
    assert stored_counts(ws) == brute_force_counts(ws) == {"coffee.png": 4, "same-bytes.png": 4, "coffee-q85.jpg": 4,
                                                           "coffee-brighter.png": 4, "cat.png": 1}


def test_adding_images_later_updates_the_counts_of_existing_images(chain_folder, tmp_path):
    folder, _, expected = chain_folder
    first = tmp_path / "first"
    second = tmp_path / "second"
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            # originals and a few copies first; the remaining copies arrive in a second ingest
            dest = (first if path.parent == folder or path.name.endswith("-1.jpg") else second) / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
    ws = Workspace.init(tmp_path / "ws")
    add_training(ws, first)
    before = stored_counts(ws)
    assert before == brute_force_counts(ws)
    assert before["crop000.png"] == 2 and before["crop199.png"] == 1
    add_training(ws, second)
    after = stored_counts(ws)
    assert after == brute_force_counts(ws) == expected  # crop000.png: 2 -> 20, without re-ingesting it
    with ws.connect() as con:
        incremental = {r[0]: r[1] for r in con.execute("SELECT source_path, duplicate_group FROM training_images")}
        con.execute("DELETE FROM duplicate_pairs")
        con.execute("UPDATE training_images SET duplicate_count = 1, duplicate_group = NULL, duplicates_checked = 0")
    duplicates.update(ws)
    assert stored_counts(ws) == after
    with ws.connect() as con:
        assert {r[0]: r[1] for r in con.execute("SELECT source_path, duplicate_group FROM training_images")} == incremental


def test_a_run_stopped_between_batches_is_finished_by_the_next(tmp_path, monkeypatch):
    """Counts committed batch by batch stay consistent; the next update checks only what is left."""
    folder = tmp_path / "t"
    for i, crop in enumerate(texture_crops(12, seed=3)):
        save(crop, folder / f"c{i:02d}.png")
        if i % 3 == 0:
            save(brighter(crop, 3), folder / f"c{i:02d}-b.png")
    ws = Workspace.init(tmp_path / "ws")
    monkeypatch.setattr(duplicates, "QUERY_BATCH", 5)
    batches = []

    def stop_after_two(stage, done, total):
        if stage == "comparing":
            batches.append(done)
            if len(batches) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(duplicates, "update", _wrap_update(duplicates.update, stop_after_two))
    with pytest.raises(KeyboardInterrupt):
        add_training(ws, folder)
    with ws.connect() as con:
        checked = con.execute("SELECT COUNT(*) FROM training_images WHERE duplicates_checked = 1").fetchone()[0]
        rows = con.execute("SELECT id, duplicate_count FROM training_images").fetchall()
        pair_counts = {r[0]: 1 + con.execute("SELECT COUNT(*) FROM duplicate_pairs WHERE a = ? OR b = ?", (r[0], r[0])).fetchone()[0]
                       for r in rows}
    assert checked == 10
    assert {r[0]: r[1] for r in rows} == pair_counts  # consistent at the interruption
    monkeypatch.undo()
    assert not duplicates.is_current(ws)
    report = duplicates.update(ws)
    assert report.checked == 16 - checked
    assert stored_counts(ws) == brute_force_counts(ws)
    assert duplicates.is_current(ws)


def _wrap_update(update, progress):
    def wrapped(ws, **kw):
        return update(ws, progress=progress, **{k: v for k, v in kw.items() if k != "progress"})
    return wrapped


def test_pooled_bounds_never_exceed_the_exact_distance(chain_folder, tmp_path):
    """The 8 x 8 and 16 x 16 bounds, pooled from the working arrays, are below the exact L2 for every pair."""
    folder, _, _ = chain_folder
    files = sorted(folder.glob("*.png"))[:60] + sorted((folder / "copies").glob("*"))[:60]
    arrays = np.stack([duplicates.working_array(load_image(f), SIZE) for f in files])
    i, j = np.triu_indices(len(files), 1)
    exact = duplicates.exact_l2(arrays[i], arrays[j])
    for side in (duplicates.COARSE, duplicates.FINE):
        p = duplicates.pooled(arrays, side).astype(np.float64)
        bound = np.sqrt(((p[i] - p[j]) ** 2).sum(axis=1))
        assert (bound <= exact + duplicates.FINE_TOLERANCE).all()
    # the exact measure agrees with a float64 computation on [0, 1] pixels
    x = arrays.reshape(len(files), -1).astype(np.float64) / 255.0
    ref = np.sqrt(((x[i] - x[j]) ** 2).mean(axis=1))
    assert np.allclose(exact, ref, rtol=0, atol=1e-12)


def test_clip_similarity_confirms_pairs_when_set(tmp_path):
    """With duplicate_clip_similarity, a pixel pair counts only when its CLIP cosine similarity is also high enough."""
    import open_clip
    import torch

    from core.embed import get_embedder
    from core.errors import ModelError

    ws = Workspace.init(tmp_path / "ws")
    chain_of_three(tmp_path / "a")
    (tmp_path / "a" / "mid-copy.png").write_bytes((tmp_path / "a" / "mid.png").read_bytes())
    add_training(ws, tmp_path / "a")
    pixel_only = stored_counts(ws)
    assert pixel_only == brute_force_counts(ws) == {"dark.png": 3, "mid.png": 4, "mid-copy.png": 4, "light.png": 3}

    ws.set_setting("duplicate_clip_similarity", 0.5)
    with pytest.raises(ModelError, match="clip_pretrained"):
        duplicates.ensure(ws)  # no checkpoint configured: one clear error
    torch.manual_seed(0)
    name = "ViT-S-32-alt"
    ckpt = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(name).state_dict(), ckpt)
    ws.set_setting("clip_model", name)
    ws.set_setting("clip_pretrained", str(ckpt))
    embedder = get_embedder("clip", {**ws.settings(), "device": "cpu"})
    with ws.connect() as con:
        rows = con.execute("SELECT source_path, path FROM training_images ORDER BY id").fetchall()
    vec = embedder.embed([load_image(ws.resolve(r[1])) for r in rows])
    names = [Path(r[0]).name for r in rows]
    sim = {(names[a], names[b]): float(vec[a] @ vec[b]) for a in range(4) for b in range(4)}
    # a cut between the similarities of the two pixel pairs (dark, mid) and (mid, light)
    s1, s2 = sim[("dark.png", "mid.png")], sim[("mid.png", "light.png")]
    assert s1 != s2
    cut = (s1 + s2) / 2
    ws.set_setting("duplicate_clip_similarity", cut)
    duplicates.ensure(ws)
    kept = "dark.png" if s1 > cut else "light.png"
    dropped = "light.png" if kept == "dark.png" else "dark.png"
    assert stored_counts(ws) == {kept: 3, dropped: 1, "mid.png": 3, "mid-copy.png": 3}  # identical files always count
    with ws.connect() as con:
        assert con.execute("SELECT COUNT(*) FROM duplicate_pairs WHERE similarity IS NULL").fetchone()[0] == 0


def test_training_page_shows_per_image_counts(tmp_path):
    """The Training data page: the largest count, the captions by count, and the groups with their first image's count."""
    from streamlit.testing.v1 import AppTest

    from dashboard import ui

    ws = Workspace.init(tmp_path / "ws")
    chain_of_three(tmp_path / "a")
    for i in range(3):
        (tmp_path / "a" / f"mid-copy{i}.png").write_bytes((tmp_path / "a" / "mid.png").read_bytes())
    (tmp_path / "c.csv").write_text("file,caption\ndark.png,a dark astronaut\nmid.png,an astronaut\n"
                                    "light.png,a light astronaut\n")
    add_training(ws, tmp_path / "a", tmp_path / "c.csv")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=60)
    at.session_state[ui.WS_KEY] = str(ws.root)
    at.switch_page("app_pages/training.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Largest duplicate count"] == "6" and metrics["With near-duplicates"] == "6"
    table = at.dataframe[0].value
    # one row per group: the middle image (within the threshold of all five others) and its own count
    assert table["caption"].tolist() == ["an astronaut"] and table["duplicate count"].tolist() == [6]
    cards = [m.value for m in at.markdown if m.value.startswith("**duplicate count")]
    assert cards == ["**duplicate count 6** · 6 images in this group · “a dark astronaut” · “a light astronaut” · “an astronaut”"]


def test_block_pooling_equals_the_area_filter_embedder():
    """The integer block means used when the side divides S are the pixel embedder's area pooling."""
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    for side in (8, 16):
        np.testing.assert_allclose(duplicates.pooled(arrays, side), PixelEmbedder(side).embed(arrays), rtol=0, atol=1e-6)
    odd = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)  # 16 does not divide 40: fractional weights
    np.testing.assert_allclose(duplicates.pooled(odd, 16), PixelEmbedder(16).embed(odd), rtol=0, atol=1e-6)


def test_figure5_reads_counts_brought_up_to_date(tmp_path):
    """After a threshold change, Figure 5's rows (results.extraction_by_duplicates) use the recounted duplicate counts."""
    from core import results

    ws = Workspace.init(tmp_path / "ws")
    chain_of_three(tmp_path / "a")
    add_training(ws, tmp_path / "a")
    ws.set_setting("duplicate_threshold", 0.12)
    assert not duplicates.is_current(ws)
    import dataclasses

    from core import config
    from core.records import AuditParams

    params = {f.name: config.default(f.name) for f in dataclasses.fields(AuditParams) if f.name in config.SETTINGS}
    with ws.transaction() as con:  # a finished run needs no generations to exercise the count refresh
        con.execute("INSERT INTO audit_runs(created_at, status, params) VALUES ('now', 'done', ?)", (json.dumps(params),))
    results.extraction_by_duplicates(ws, 1)
    assert duplicates.is_current(ws) and stored_counts(ws) == {"dark.png": 3, "mid.png": 3, "light.png": 3}
