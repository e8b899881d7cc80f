"""Training ingest, captions and duplicate groups on real photographs, real SQLite and real faiss."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from core.errors import InputError
from core.index import TrainingIndex
from core.store import Workspace
from core import duplicates
from core.training import add_training, read_captions, top_duplicated, training_images, write_prompts_file

# Structured photographs, all at least 0.23 apart at 16 x 16 (flat textures would sit within 0.1 of one another).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "coins")


def photo(name: str, size: int = 64) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.asarray(Image.fromarray(img[..., :3]).resize((size, size), Image.Resampling.BOX))


def noisy(img: np.ndarray, seed: int, sigma: float = 4.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.float64) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def save(img: np.ndarray, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **kw)
    return path


def rows(ws: Workspace) -> list[dict]:
    with ws.connect() as con:
        return [dict(r) for r in con.execute("SELECT * FROM training_images ORDER BY id")]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.init(tmp_path / "ws")


# ---------------------------------------------------------------------------- captions

def test_read_captions_csv(tmp_path: Path):
    f = tmp_path / "c.csv"
    f.write_text('\ufeffFile, Caption ,score\n'
                 'a.png,a red bus,1\n'
                 './sub/b.jpg,"two lines\nand a ""quote"", too",2\n'
                 'sub\\c.webp,  padded  ,3\n'
                 'd.png,,4\n'
                 '\n'
                 'a.png,a red bus,5\n', encoding="utf-8")
    assert read_captions(f) == {"a.png": "a red bus", "sub/b.jpg": 'two lines\nand a "quote", too', "sub/c.webp": "padded"}
    g = tmp_path / "g.csv"
    g.write_text("path,caption\nx/y.png,hello\n")
    assert read_captions(g) == {"x/y.png": "hello"}


def test_read_captions_jsonl(tmp_path: Path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"file": "a.png", "caption": "one"}) + "\n\n"
                 + json.dumps({"path": "./s/b.png", "caption": "two\u2028lines", "extra": 1}, ensure_ascii=False) + "\r\n"
                 + json.dumps({"file": "c.png", "caption": None}) + "\n", encoding="utf-8")
    assert read_captions(f) == {"a.png": "one", "s/b.png": "two\u2028lines"}
    # without a telling suffix, the first character decides
    g = tmp_path / "captions.txt"
    g.write_text(json.dumps({"file": "a.png", "caption": "one"}) + "\n")
    assert read_captions(g) == {"a.png": "one"}


segment = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_ .,'-]{0,10}[A-Za-z0-9_])?", fullmatch=True)
keys = st.lists(segment, min_size=1, max_size=3).map("/".join)
captions = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=40)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(keys, captions, max_size=12), st.booleans())
def test_captions_round_trip_through_csv_and_jsonl(tmp_path_factory: pytest.TempPathFactory, table: dict[str, str],
                                                    ascii_json: bool):
    folder = tmp_path_factory.mktemp("captions")
    expected = {k: v.strip() for k, v in table.items() if v.strip()}
    with open(folder / "c.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        w.writerows(table.items())
    assert read_captions(folder / "c.csv") == expected
    with open(folder / "c.jsonl", "w", encoding="utf-8") as f:
        for k, v in table.items():
            f.write(json.dumps({"file": k, "caption": v}, ensure_ascii=ascii_json) + "\n")
    if table:
        assert read_captions(folder / "c.jsonl") == expected


@pytest.mark.parametrize("name, content, message", [
    ("c.csv", "name,text\na.png,hi\n", "needs a 'caption' column and a 'file' or 'path' column"),
    ("c.csv", "file,score\na.png,1\n", "needs a 'caption' column"),
    ("c.csv", "file,caption\na.png\n", "line 2: 1 fields, the header has 2"),
    ("c.csv", "file,caption\n,orphan\n", "line 2: empty or missing file name"),
    ("c.csv", "file,caption\na.png,one\na.png,two\n", "line 3: 'a.png' already has a different caption"),
    ("c.csv", "", "empty captions file"),
    ("c.jsonl", '{"file": "a.png", "caption": "x"}\n{"file": "b.png", caption}\n', "line 2: not valid JSON"),
    ("c.jsonl", '["a.png", "x"]\n', "line 1: each line must be a JSON object"),
    ("c.jsonl", '{"name": "a.png", "caption": "x"}\n', "line 1: needs a 'caption' key and a 'file' or 'path' key"),
    ("c.jsonl", '{"file": "a.png", "caption": 3}\n', "line 1: caption must be text"),
    ("c.jsonl", "\n\n", "empty captions file"),
])
def test_bad_captions_files(tmp_path: Path, name: str, content: str, message: str):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_captions(f)


def test_non_utf8_and_missing_captions_files(tmp_path: Path):
    f = tmp_path / "c.csv"
    f.write_bytes("file,caption\na.png,ok\nb.png,caf\u00e9\n".encode("cp1252"))
    with pytest.raises(InputError, match=r"not UTF-8 text \(byte 0xe9 on line 3\); save it as UTF-8"):
        read_captions(f)
    with pytest.raises(InputError, match="no such captions file"):
        read_captions(tmp_path / "missing.csv")
    with pytest.raises(InputError, match="is a folder"):
        read_captions(tmp_path)


# ---------------------------------------------------------------------------- ingest

def test_add_training_copies_files_and_records_rows(ws: Workspace, tmp_path: Path):
    src = tmp_path / "train"
    save(photo("astronaut"), src / "astronaut.png")
    save(photo("coffee"), src / "drinks" / "coffee.JPEG", quality=95)
    save(photo("chelsea"), src / "cats" / "chelsea.webp", lossless=True)
    save(photo("rocket", 48), src / "rocket.jpg", quality=90)
    (src / "astronaut-again.png").write_bytes((src / "astronaut.png").read_bytes())
    (src / "notes.txt").write_text("not an image suffix: ignored")
    (tmp_path / "caps.csv").write_text("file,caption\nastronaut.png,an astronaut\ndrinks/coffee.JPEG,a cup of coffee\n"
                                       "chelsea.webp,a cat\nmissing.png,nobody\n")
    calls: list[tuple[int, int]] = []
    report = add_training(ws, src, tmp_path / "caps.csv", progress=lambda d, t: calls.append((d, t)))
    assert report.added == 5 and report.skipped == [] and report.already_present == 0
    assert report.captioned == 3 and report.unmatched_captions == 1
    assert calls[-1] == (5, 5) and len(calls) == 5

    by_source = {Path(r["source_path"]).relative_to(src.resolve()).as_posix(): r for r in rows(ws)}
    assert set(by_source) == {"astronaut.png", "astronaut-again.png", "cats/chelsea.webp", "drinks/coffee.JPEG", "rocket.jpg"}
    for rel, r in by_source.items():
        content = (src / rel).read_bytes()
        sha = hashlib.sha256(content).hexdigest()
        assert r["sha256"] == sha
        assert r["path"] == f"training/{sha[:2]}/{sha}.{ {'png': 'png', 'webp': 'webp', 'JPEG': 'jpg', 'jpg': 'jpg'}[rel.rsplit('.', 1)[1]] }"
        assert ws.resolve(r["path"]).read_bytes() == content
    assert by_source["astronaut.png"]["path"] == by_source["astronaut-again.png"]["path"]  # stored once
    assert len(list((ws.root / "training").rglob("*.*"))) == 4
    assert (by_source["rocket.jpg"]["width"], by_source["rocket.jpg"]["height"]) == (48, 48)
    assert by_source["drinks/coffee.JPEG"]["caption"] == "a cup of coffee"  # by relative path
    assert by_source["cats/chelsea.webp"]["caption"] == "a cat"  # by bare file name
    assert by_source["astronaut-again.png"]["caption"] is None
    assert [t.id for t in training_images(ws, [3, 1, 99])] == [3, 1]

    index = TrainingIndex.open(ws, "pixel")
    assert index.count == 5 and index.messages == []


def test_readding_adds_nothing_and_another_folder_is_incremental(ws: Workspace, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    for name in PHOTOS[:3]:
        save(photo(name), a / f"{name}.png")
    for name in PHOTOS[3:5]:
        save(photo(name), b / f"{name}.png")
    assert add_training(ws, a).added == 3
    again = add_training(ws, a)
    assert (again.added, again.already_present) == (0, 3)
    assert len(rows(ws)) == 3
    more = add_training(ws, b)
    assert (more.added, more.already_present) == (2, 0)
    assert [r["id"] for r in rows(ws)] == [1, 2, 3, 4, 5]
    index = TrainingIndex.open(ws, "pixel")
    assert index.count == 5 and index.messages == []
    camera = next(r["id"] for r in rows(ws) if r["source_path"].endswith("camera.png"))
    assert index.search_images([Image.open(b / "camera.png")], 1)[0][0, 0] == camera


def test_captions_are_filled_in_on_readding(ws: Workspace, tmp_path: Path):
    save(photo("astronaut"), tmp_path / "t" / "a.png")
    save(photo("coffee"), tmp_path / "t" / "b.png")
    add_training(ws, tmp_path / "t")
    (tmp_path / "c.jsonl").write_text('{"file": "a.png", "caption": "an astronaut"}\n')
    report = add_training(ws, tmp_path / "t", tmp_path / "c.jsonl")
    assert (report.added, report.captions_filled) == (0, 1)
    assert [r["caption"] for r in rows(ws)] == ["an astronaut", None]


def test_bad_files_are_skipped_and_listed(ws: Workspace, tmp_path: Path):
    src = tmp_path / "train"
    good = save(photo("astronaut"), src / "good.png")
    save(photo("coffee"), src / "photo.jpg", quality=90)
    (src / "empty.png").write_bytes(b"")
    (src / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (src / "truncated.jpg").write_bytes((src / "photo.jpg").read_bytes()[:600])
    (src / "text.webp").write_text("hello, not an image")
    (src / "photo.jpg").unlink()
    report = add_training(ws, src)
    assert report.added == 1
    reasons = {Path(p).name: r for p, r in report.skipped}
    assert set(reasons) == {"empty.png", "truncated.png", "truncated.jpg", "text.webp"}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["truncated.png"].startswith("corrupt or truncated image")
    assert reasons["truncated.jpg"].startswith("corrupt or truncated image")
    assert reasons["text.webp"] == "not an image file PIL can read"
    assert [Path(r["source_path"]).name for r in rows(ws)] == ["good.png"]


def test_missing_folder_is_an_input_error(ws: Workspace, tmp_path: Path):
    with pytest.raises(InputError, match="no such folder; pass the folder that holds the training images"):
        add_training(ws, tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(InputError, match="not a folder"):
        add_training(ws, tmp_path / "file.png")


# ---------------------------------------------------------------------------- duplicates

@pytest.fixture
def planted(ws: Workspace, tmp_path: Path) -> Workspace:
    """Five distinct photographs plus planted exact, re-encoded and noisy copies, with captions."""
    src = tmp_path / "train"
    for name in PHOTOS[:5]:
        save(photo(name), src / f"{name}.png")
    astronaut = (src / "astronaut.png").read_bytes()
    for i in range(3):
        (src / f"mirror{i}" / "astronaut.png").parent.mkdir(parents=True)
        (src / f"mirror{i}" / "astronaut.png").write_bytes(astronaut)  # exact copies (same bytes)
    save(photo("astronaut"), src / "astronaut-reencoded.jpg", quality=92)  # near copy
    save(noisy(photo("coffee"), 1), src / "coffee-noisy1.png")  # near copies
    save(noisy(photo("coffee"), 2), src / "coffee-noisy2.png")
    (src / "chelsea-copy.png").write_bytes((src / "chelsea.png").read_bytes())
    save(noisy(photo("rocket"), 3), src / "rocket-noisy.png")
    (tmp_path / "captions.csv").write_text(
        "file,caption\n"
        "astronaut.png,an astronaut\nmirror0/astronaut.png,an astronaut\nmirror1/astronaut.png,astronaut portrait\n"
        "mirror2/astronaut.png,an astronaut\ncoffee.png,a cup of coffee\ncoffee-noisy1.png,coffee\n"
        "coffee-noisy2.png,a cup of coffee\n"
        "chelsea-copy.png,a cat\ncamera.png,a photographer\n")
    report = add_training(ws, src, tmp_path / "captions.csv")
    assert report.added == 13 and report.duplicate_groups == 4
    return ws


def groups_by_source(ws: Workspace) -> dict[str, tuple[int, int]]:
    id_to_name = {r["id"]: Path(r["source_path"]).parent.name + "/" + Path(r["source_path"]).name for r in rows(ws)}
    return {id_to_name[r["id"]]: (r["duplicate_count"], r["duplicate_group"]) for r in rows(ws)}


def test_planted_copies_form_groups(planted: Workspace):
    ws = planted
    all_rows = rows(ws)
    assert all(r["duplicate_group"] is not None for r in all_rows)
    names = {r["id"]: Path(r["source_path"]).parent.name + "/" + Path(r["source_path"]).name for r in all_rows}
    groups: dict[int, set[str]] = {}
    for r in all_rows:
        groups.setdefault(r["duplicate_group"], set()).add(names[r["id"]])
        assert r["duplicate_group"] == min(x["id"] for x in all_rows if x["duplicate_group"] == r["duplicate_group"])
    sizes = sorted((len(v), sorted(v)) for v in groups.values())
    assert sizes == [
        (1, ["train/camera.png"]),
        (2, ["train/chelsea-copy.png", "train/chelsea.png"]),
        (2, ["train/rocket-noisy.png", "train/rocket.png"]),
        (3, ["train/coffee-noisy1.png", "train/coffee-noisy2.png", "train/coffee.png"]),
        (5, ["mirror0/astronaut.png", "mirror1/astronaut.png", "mirror2/astronaut.png", "train/astronaut-reencoded.jpg",
             "train/astronaut.png"]),
    ]
    for r in all_rows:
        assert r["duplicate_count"] == sum(1 for x in all_rows if x["duplicate_group"] == r["duplicate_group"])


def test_top_duplicated_and_prompts_file(planted: Workspace, tmp_path: Path):
    ws = planted
    top = top_duplicated(ws, 10)
    assert [(c, n) for c, n, _ in top] == [("an astronaut", 5), ("a cup of coffee", 3), ("a cat", 2), ("", 2),
                                           ("a photographer", 1)]
    ids = {r["id"]: r for r in rows(ws)}
    assert all(ids[t]["caption"] == (c or None) for c, _, t in top)
    group = ids[top[0][2]]["duplicate_group"]  # the representative: the first image with the most common caption
    assert top[0][2] == min(i for i, r in ids.items() if r["duplicate_group"] == group and r["caption"] == "an astronaut")
    assert top[0][2] != group  # the group's smallest id (the re-encoded copy) has no caption
    assert top_duplicated(ws, 2) == top[:2]
    out = tmp_path / "out" / "prompts.txt"
    assert write_prompts_file(ws, 3, out) == 3
    assert out.read_text(encoding="utf-8") == "an astronaut\na cup of coffee\na cat\n"  # rocket's group has no caption
    assert write_prompts_file(ws, 100, out) == 4
    assert out.read_text(encoding="utf-8").splitlines()[-1] == "a photographer"
    with pytest.raises(InputError, match="at least 1"):
        write_prompts_file(ws, 0, out)
    with pytest.raises(InputError, match="at least 1"):
        top_duplicated(ws, 0)


def test_prompts_are_one_line_each_and_not_repeated(ws: Workspace, tmp_path: Path):
    src = tmp_path / "t"
    for name in PHOTOS[:3]:
        save(photo(name), src / f"{name}.png")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"file": "astronaut.png", "caption": "a photo"}, {"file": "coffee.png", "caption": "a\nphoto"},
        {"file": "chelsea.png", "caption": "a  multi\nline\tcaption"}]) + "\n")
    add_training(ws, src, tmp_path / "c.jsonl")
    assert write_prompts_file(ws, 5, tmp_path / "p.txt") == 2
    assert (tmp_path / "p.txt").read_text() == "a photo\na multi line caption\n"


def test_no_captions_means_no_prompts(ws: Workspace, tmp_path: Path):
    assert top_duplicated(ws, 5) == []
    save(photo("astronaut"), tmp_path / "t" / "a.png")
    add_training(ws, tmp_path / "t")
    assert top_duplicated(ws, 5) == [("", 1, 1)]
    with pytest.raises(InputError, match="no training image has a caption"):
        write_prompts_file(ws, 5, tmp_path / "p.txt")


def test_incremental_groups_equal_a_full_recomputation(ws: Workspace, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    for name in PHOTOS:
        save(photo(name), a / f"{name}.png")
    save(noisy(photo("coins"), 5), a / "coins-noisy.png")
    save(noisy(photo("coffee"), 6), b / "coffee-noisy.png")  # joins a group from the first folder
    save(noisy(photo("coins"), 7), b / "coins-noisy2.png")  # joins an existing pair
    (b / "astronaut-copy.png").write_bytes((a / "astronaut.png").read_bytes())
    add_training(ws, a)
    assert add_training(ws, b).duplicate_groups == 3
    incremental = groups_by_source(ws)
    with ws.transaction() as con:  # forget every pair: the next update checks every image against every image
        con.execute("DELETE FROM duplicate_pairs")
        con.execute("UPDATE training_images SET duplicate_count = 1, duplicate_group = NULL, duplicates_checked = 0")
    assert duplicates.update(ws).groups == 3
    assert groups_by_source(ws) == incremental
    assert incremental["b/coins-noisy2.png"][0] == 3 and incremental["b/coffee-noisy.png"][0] == 2


def test_threshold_changes_regroup(planted: Workspace):
    ws = planted
    ws.set_setting("duplicate_threshold", 0.0)
    top = top_duplicated(ws, 20)  # recomputed for the new threshold
    # only identical pixels remain linked; identical files always are
    assert [(c, n) for c, n, _ in top[:2]] == [("an astronaut", 4), ("a cat", 2)]
    assert [n for _, n, _ in top[2:]] == [1] * 7
    ws.set_setting("duplicate_threshold", 0.9)
    assert top_duplicated(ws, 1)[0][1] == 13
