"""Importing generations from a manifest: good files copied, every bad one skipped with a reason."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from core import importer
from core.errors import InputError, MemauditError
from core.importer import import_generations, parse_manifest
from core.store import Workspace


def image_bytes(seed: int, fmt: str = "PNG", size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_csv(path: Path, header: list[str], records: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(records)
    return path


def rows(ws: Workspace) -> list[dict]:
    with ws.connect() as con:
        return [dict(r) for r in con.execute(
            "SELECT g.*, p.text AS prompt FROM generations g JOIN prompts p ON p.id = g.prompt_id ORDER BY g.id")]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.init(tmp_path / "ws")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A manifest folder with two good images and one file of every bad kind."""
    d = tmp_path / "gens"
    (d / "sub").mkdir(parents=True)
    (d / "good.png").write_bytes(image_bytes(1))
    (d / "sub" / "good.jpg").write_bytes(image_bytes(2, "JPEG"))
    valid = image_bytes(3)
    (d / "truncated.png").write_bytes(valid[: len(valid) // 2])
    (d / "corrupt.png").write_bytes(valid[:16] + bytes(range(256)) * 4)
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_text("these are notes, not pixels\n")
    (tmp_path / "outside.png").write_bytes(image_bytes(4))
    (d / "link.png").symlink_to(tmp_path / "outside.png")
    return d


def test_good_images_are_copied_and_every_bad_row_listed(ws, folder, tmp_path):
    manifest = write_csv(folder / "manifest.csv", ["path", "prompt", "seed"], [
        ["good.png", "  a red cube ", "7"],
        ["sub/good.jpg", "a blue ball", ""],
        ["truncated.png", "a red cube", "1"],
        ["corrupt.png", "a red cube", "2"],
        ["empty.png", "a red cube", "3"],
        ["notes.png", "a red cube", "4"],
        ["missing.png", "a red cube", "5"],
        ["../outside.png", "a red cube", "6"],
        [str(tmp_path / "outside.png"), "a red cube", "8"],
        ["link.png", "a red cube", "9"],
        ["sub/../good.png", "a red cube", "7"],
        ["sub", "a red cube", ""],
    ])
    report = import_generations(ws, manifest)
    assert report.imported == 2
    reasons = dict(report.skipped)
    assert len(report.skipped) == 10
    assert "corrupt or truncated" in reasons["truncated.png"]
    assert "corrupt or truncated" in reasons["corrupt.png"] or "not an image" in reasons["corrupt.png"]
    assert "empty file" in reasons["empty.png"]
    assert "not an image file" in reasons["notes.png"]
    assert "no such file" in reasons["missing.png"]
    assert "outside the manifest's folder (..)" in reasons["../outside.png"]
    assert "absolute path refused" in reasons[str(tmp_path / "outside.png")]
    assert "through a symlink" in reasons["link.png"]
    assert "same file as line 2" in reasons["sub/../good.png"]
    assert "is a folder" in reasons["sub"]

    got = {r["origin"]: r for r in rows(ws)}
    assert set(got) == {str(folder / "good.png"), str(folder / "sub" / "good.jpg")}
    png, jpg = got[str(folder / "good.png")], got[str(folder / "sub" / "good.jpg")]
    assert (png["prompt"], png["seed"], png["width"], png["height"]) == ("a red cube", 7, 28, 24)
    assert (jpg["prompt"], jpg["seed"], jpg["source"], jpg["model_id"]) == ("a blue ball", None, "import", None)
    for original, r in ((folder / "good.png", png), (folder / "sub" / "good.jpg", jpg)):
        copy = ws.resolve(r["path"])
        assert copy.read_bytes() == original.read_bytes()
        assert r["sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
        assert r["path"].startswith(f"generations/p0/{r['prompt_id']}/i0/import-") and copy.suffix == original.suffix
        assert json.loads(r["params"])["manifest"] == str(manifest.resolve())


def test_importing_again_skips_what_is_there(ws, folder):
    manifest = write_csv(folder / "m.csv", ["path", "prompt"], [["good.png", "a"], ["sub/good.jpg", ""]])
    assert import_generations(ws, manifest).imported == 2
    again = import_generations(ws, manifest)
    assert again.imported == 0 and [r for _, r in again.skipped] == ["line 2: already imported", "line 3: already imported"]
    assert len(rows(ws)) == 2


def test_identical_files_are_two_generations(ws, folder):
    (folder / "twin.png").write_bytes((folder / "good.png").read_bytes())
    manifest = write_csv(folder / "m.csv", ["path", "prompt"], [["good.png", "a"], ["twin.png", "a"]])
    assert import_generations(ws, manifest).imported == 2
    got = rows(ws)
    assert got[0]["sha256"] == got[1]["sha256"] and got[0]["path"] != got[1]["path"]


def test_jsonl_manifest_with_null_prompt_and_seed(ws, folder):
    manifest = folder / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"path": "good.png", "prompt": None, "seed": 3}),
        "",
        json.dumps({"path": "sub/good.jpg", "prompt": "a blue ball", "extra": [1, 2]}),
    ]) + "\n", encoding="utf-8")
    report = import_generations(ws, manifest)
    assert report.imported == 2 and report.skipped == []
    assert [(r["prompt"], r["seed"]) for r in rows(ws)] == [("", 3), ("a blue ball", None)]


@pytest.mark.parametrize("name, content, match", [
    ("m.csv", "file,caption\ngood.png,a\n", "lacks the column"),
    ("m.csv", "path\ngood.png\n", r"lacks the column\(s\) prompt"),
    ("m.csv", "", "is empty"),
    ("m.csv", "path,prompt\n", "lists no images"),
    ("m.csv", "path,prompt,seed\ngood.png,a,seven\n", "seed 'seven' is not a whole number"),
    ("m.jsonl", '{"path": "good.png", "prompt": "a"}\n{"path": "sub/good.jpg"}\n', r"line 2 lacks the key\(s\) prompt"),
    ("m.jsonl", '{"path": "good.png", "prompt": "a"}\nnot json\n', "line 2: not valid JSON"),
    ("m.jsonl", '["good.png", "a"]\n', "expected a JSON object"),
])
def test_bad_manifests_fail_before_anything_is_imported(ws, folder, name, content, match):
    (folder / name).write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=match):
        import_generations(ws, folder / name)
    assert rows(ws) == [] and not list((ws.root / "generations").iterdir())


def test_non_utf8_and_missing_manifests(ws, folder):
    (folder / "latin1.csv").write_bytes("path,prompt\ngood.png,café\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.csv is not UTF-8"):
        import_generations(ws, folder / "latin1.csv")
    with pytest.raises(InputError, match="no such manifest"):
        import_generations(ws, folder / "nope.csv")
    assert rows(ws) == []


def test_disk_full_stops_and_keeps_complete_copies(ws, folder, monkeypatch):
    real = importer.tempfiles.write_bytes_atomic
    calls = []

    def fill_up(dest, data):
        calls.append(dest)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(dest, data)

    monkeypatch.setattr(importer.tempfiles, "write_bytes_atomic", fill_up)
    manifest = write_csv(folder / "m.csv", ["path", "prompt"], [["good.png", "a"], ["sub/good.jpg", "b"]])
    with pytest.raises(MemauditError, match="disk is full"):
        import_generations(ws, manifest)
    assert [r["origin"] for r in rows(ws)] == [str(folder / "good.png")]
    monkeypatch.setattr(importer.tempfiles, "write_bytes_atomic", real)
    assert import_generations(ws, manifest).imported == 1


def test_imported_rows_cannot_be_regenerated(ws, folder):
    from core.generate import regenerate

    import_generations(ws, write_csv(folder / "m.csv", ["path", "prompt"], [["good.png", "a"]]))
    with pytest.raises(InputError, match="imported, not generated"):
        regenerate(ws, rows(ws)[0]["id"], "cpu")


# ------------------------------------------------------------------------------ the parser, as a property
field = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
manifest_rows = st.lists(st.tuples(field.filter(lambda s: s.strip()), field,
                                   st.none() | st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(records=manifest_rows, order=st.permutations(["path", "prompt", "seed", "extra"]))
def test_csv_manifest_round_trips(records, order):
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow([c.upper() if c == "prompt" else c for c in order])
    for path, prompt, seed in records:
        values = {"path": path, "prompt": prompt, "seed": "" if seed is None else str(seed), "extra": "x,y"}
        w.writerow([values[c] for c in order])
    parsed = parse_manifest(buf.getvalue(), "csv")
    assert [(r.path, r.prompt, r.seed) for r in parsed] == [(p.strip(), q.strip(), s) for p, q, s in records]
    assert [r.line for r in parsed] == sorted({r.line for r in parsed})


@settings(max_examples=60, deadline=None)
@given(records=manifest_rows, ascii_only=st.booleans())
def test_jsonl_manifest_round_trips(records, ascii_only):
    text = "\n".join(json.dumps({"prompt": q, "path": p, **({} if s is None else {"seed": s})}, ensure_ascii=ascii_only)
                     for p, q, s in records)
    parsed = parse_manifest(text, "jsonl")
    assert [(r.path, r.prompt, r.seed) for r in parsed] == [(p.strip(), q.strip(), s) for p, q, s in records]
    assert [r.line for r in parsed] == list(range(1, len(records) + 1))
