"""Bad input of every kind, through the CLI a user runs: one clear line, exit 1 for errors (or one
line per skipped file), and nothing lost or half-imported.

Core-level checks of the same inputs live beside their modules (test_importer, test_training,
test_generate, test_store, test_embed, test_index); here each goes through ``memaudit``, the
workspace is compared before and after, and mixed image modes go all the way through a real
audit. Properties of the parsers are checked with hypothesis.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.cli import main
from core.errors import ImageError, InputError
from core.images import MAX_PIXELS, load_image
from core.store import Workspace
from reliability import ENV, ROOT, assert_consistent, sha256, small_audited_workspace
from workspaces import _noisy, training_arrays


def run(capsys, *argv: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # verify exits 1 through SystemExit
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def shown(text: str) -> list[str]:
    """The lines a terminal shows: a carriage return starts its line again (progress bars), blank lines dropped."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    lines = shown(err)
    assert len(lines) == 1 and lines[0].startswith("memaudit: error: "), err
    err = lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def snapshot(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The database's content and every other file of the workspace (name, size)."""
    con = sqlite3.connect(root / "audit.db")
    try:
        dump = list(con.iterdump())
    finally:
        con.close()
    files = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*")
                   if p.is_file() and not p.name.startswith("audit.db"))
    return dump, files


# ---------------------------------------------------------------------------- crafted files
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(array: np.ndarray) -> bytes:
    """A 16-bit-per-sample PNG (RGB or RGBA; Pillow cannot write these) from uint16 (H, W, 3|4)."""
    h, w, c = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def png_bomb(width: int, height: int) -> bytes:
    """A 100-byte PNG that declares ``width`` x ``height`` RGB pixels (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def jpeg_bomb(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


BOMBS = {  # name -> bytes: past our limit only; past Pillow's warning; past Pillow's error; a JPEG
    "bomb-9000.png": png_bomb(9000, 9000),
    "bomb-10000.png": png_bomb(10_000, 10_000),
    "bomb-100000.png": png_bomb(100_000, 100_000),
    "bomb-60000.jpg": jpeg_bomb(60_000),
}


def bad_files(folder: Path) -> dict[str, bytes]:
    """Every kind of bad image file (and one good one) written to ``folder``; returns name -> bytes."""
    good = io.BytesIO()
    Image.fromarray(training_arrays(32)["astronaut"]).save(good, "PNG")
    valid = good.getvalue()
    files = {"good.png": valid, "empty.png": b"", "truncated.png": valid[: len(valid) // 2],
             "corrupt.png": valid[:40] + bytes(range(256)) * 3, "notes.jpg": b"a text file named like a photo\n", **BOMBS}
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


REASONS = {"empty.png": "empty file", "truncated.png": "corrupt or truncated", "corrupt.png": "",
           "notes.jpg": "not an image file", **{name: "decompression bomb" for name in BOMBS}}


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    assert 9000 * 9000 > MAX_PIXELS  # the smallest bomb is refused by memaudit's own limit, below Pillow's
    for name, data in BOMBS.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(path)


def test_every_bad_file_is_listed_by_name_and_nothing_of_it_is_kept(tmp_path, capsys):
    """add-training and import-generations: each bad file is one line naming it and why; only the good one lands."""
    folder = tmp_path / "in"
    files = bad_files(folder)
    ws = Workspace.init(tmp_path / "ws").root

    code, out, err = run(capsys, "add-training", ws, folder)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"added 1 training images from {folder}" and lines[1] == f"skipped {len(files) - 1}:"
    listed = {Path(line.strip().split(": ", 1)[0]).name: line for line in lines[2:]}
    assert set(listed) == set(REASONS)  # every bad file, named
    for name, reason in REASONS.items():
        assert reason in listed[name], listed[name]

    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "prompt"])
        w.writerows([[name, "a prompt"] for name in files])
    code, out, err = run(capsys, "import-generations", ws, folder / "manifest.csv")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("imported 1 generations") and lines[1] == f"skipped {len(files) - 1}:"
    listed = {line.strip().split(": ", 1)[0]: line for line in lines[2:]}
    assert set(listed) == set(REASONS)
    for name, reason in REASONS.items():
        assert reason in listed[name], listed[name]

    report = assert_consistent(ws)
    assert report["checked_files"] == 2  # the good image, once as training, once as a generation
    for sub in ("training", "generations"):
        (copy,) = [p for p in (ws / sub).rglob("*") if p.is_file()]
        assert copy.read_bytes() == files["good.png"]


# ---------------------------------------------------------------------------- modes and sizes
def write_mode(arr: np.ndarray, path: Path, mode: str) -> Path:
    """Save an (H, W, 3) uint8 image in ``mode``; pixel values are kept exactly unless the mode is lossy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    if mode == "RGB16":
        path.write_bytes(png16(arr.astype(np.uint16) * 257))
    elif mode == "RGBA16":
        path.write_bytes(png16(np.concatenate([arr.astype(np.uint16) * 257, np.full((*arr.shape[:2], 1), 65535, np.uint16)], -1)))
    elif mode == "RGBA":
        rgba = np.concatenate([arr, np.full((*arr.shape[:2], 1), 255, np.uint8)], -1)
        rgba[:2, :2, 3] = 0  # a transparent corner: composited over white
        Image.fromarray(rgba).save(path)
    elif mode == "P":
        img.quantize(256, method=Image.Quantize.MEDIANCUT).save(path)
    elif mode == "L":
        img.convert("L").save(path)
    elif mode == "LA":
        img.convert("LA").save(path)
    elif mode == "I;16":
        Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257).save(path)
    elif mode == "CMYK":
        img.convert("CMYK").save(path, quality=95)
    elif mode == "WEBP":
        img.save(path, lossless=True)
    elif mode == "x2":  # twice the size: shrinks back to the same pixels
        img.resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.Resampling.NEAREST).save(path)
    elif mode == "wide":  # padded to 96 x 64: the centre crop is the image
        wide = np.full((arr.shape[0], arr.shape[1] + 32, 3), 17, np.uint8)
        wide[:, 16:-16] = arr
        Image.fromarray(wide).save(path)
    else:
        img.save(path)
    return path


TRAINING_MODES = {"astronaut": "RGB16", "coffee": "P", "chelsea": "RGBA16", "rocket": "CMYK", "camera": "I;16",
                  "coins": "L", "immunohistochemistry": "LA", "hubble_deep_field": "WEBP"}
SUFFIX = {"CMYK": ".jpg", "WEBP": ".webp"}
GEN_MODES = ("RGB", "RGBA", "P", "RGB16", "RGBA16", "x2", "wide", "RGB", "RGBA", "x2", "RGB16", "RGB")


def test_mixed_modes_and_sizes_import_ingest_and_audit(tmp_path, capsys):
    """16-bit, palette, alpha, grayscale, CMYK and WebP training files and generations of mixed modes and
    sizes go through add-training, import-generations and a real audit: the planted copies are found."""
    train = training_arrays(64)
    for name, mode in TRAINING_MODES.items():
        write_mode(train[name], tmp_path / "train" / f"{name}{SUFFIX.get(mode, '.png')}", mode)
    rng = np.random.default_rng(0)
    gens = tmp_path / "gens"
    records = []
    for prompt, source in (("copy astronaut", "astronaut"), ("copy camera", "camera")):
        for j, mode in enumerate(GEN_MODES):
            mode = {"RGB16": "I;16", "RGBA16": "LA", "P": "L"}.get(mode, mode) if source == "camera" else mode
            path = write_mode(_noisy(train[source], rng), gens / f"{source}-{j}.png", mode)
            records.append([path.name, prompt, j])
    from skimage import data

    faces = data.lfw_subset()[:12]
    for j, face in enumerate(faces):  # novel images, also in mixed modes
        arr = np.asarray(Image.fromarray((face * 255).astype(np.uint8)).resize((64, 64)).convert("RGB"))
        records.append([write_mode(arr, gens / f"face-{j}.png", GEN_MODES[j]).name, "novel faces", j])
    with open(gens / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "prompt", "seed"], *records])

    ws = Workspace.init(tmp_path / "ws").root
    code, out, _ = run(capsys, "add-training", ws, tmp_path / "train", "--json")
    assert code == 0 and json.loads(out)["added"] == len(TRAINING_MODES) and json.loads(out)["skipped"] == []
    code, out, _ = run(capsys, "import-generations", ws, gens / "manifest.csv", "--json")
    assert code == 0 and json.loads(out) == {"imported": len(records), "skipped": []}
    code, out, _ = run(capsys, "audit", ws, "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["flagged_prompts"] == 2 and summary["extracted_training_images"] == 2

    con = sqlite3.connect(ws / "audit.db")
    found = dict(con.execute(
        "SELECT p.text, t.source_path FROM candidates c JOIN prompts p ON p.id = c.prompt_id "
        "JOIN training_images t ON t.id = c.nearest_training_id WHERE c.extracted = 1").fetchall())
    stored = {Path(src).name: (sha, w, h) for src, sha, w, h in con.execute("SELECT source_path, sha256, width, height FROM training_images")}
    con.close()
    assert {p: Path(s).stem for p, s in found.items()} == {"copy astronaut": "astronaut", "copy camera": "camera"}
    for name, (sha, w, h) in stored.items():  # the original bytes, stored as they were
        assert sha == sha256(tmp_path / "train" / name) and (w, h) == (64, 64)
    assert_consistent(ws)


# ---------------------------------------------------------------------------- CLI errors change nothing
@pytest.fixture(scope="module")
def audited_ws(tmp_path_factory) -> Path:
    return small_audited_workspace(tmp_path_factory.mktemp("bad-input"), prompts=4)[0].root


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def _not_diffusers(d: Path) -> Path:
    _write(d / "model" / "config.json", "{}")
    return d / "model"


def _damaged_index(d: Path) -> Path:
    _write(d / "model" / "model_index.json", "{not json")
    return d / "model"


# (name, argv after the workspace with {d} = a scratch folder, what the message must say)
ERROR_CASES = [
    ("manifest without a prompt column", lambda d: ["import-generations", _write(d / "m.csv", "path,text\na.png,x\n")],
     "lacks the column(s) prompt"),
    ("manifest in Latin-1", lambda d: ["import-generations", _write(d / "m.csv", "path,prompt\na.png,café\n".encode("latin-1"))],
     "is not UTF-8"),
    ("empty manifest", lambda d: ["import-generations", _write(d / "m.csv", "")], "is empty"),
    ("manifest with a header only", lambda d: ["import-generations", _write(d / "m.csv", "path,prompt\n")], "lists no images"),
    ("JSONL manifest broken after a good line",
     lambda d: ["import-generations", _write(d / "m.jsonl", '{"path": "a.png", "prompt": "x"}\n{"path": \n')], "line 2: not valid JSON"),
    ("manifest that is a folder", lambda d: ["import-generations", d], "is a folder"),
    ("missing manifest", lambda d: ["import-generations", d / "nope.csv"], "no such manifest"),
    ("missing training folder", lambda d: ["add-training", d / "nope"], "no such folder"),
    ("captions in Latin-1", lambda d: ["add-training", d, "--captions", _write(d / "c.csv", "file,caption\na.png,café\n".encode("latin-1"))],
     "not UTF-8"),
    ("captions without a caption column", lambda d: ["add-training", d, "--captions", _write(d / "c.csv", "file,text\na.png,x\n")],
     "needs a 'caption' column"),
    ("one file with two captions", lambda d: ["add-training", d, "--captions", _write(d / "c.csv", "file,caption\na.png,x\na.png,y\n")],
     "already has a different caption"),
    ("empty prompts file", lambda d: ["generate", "--model", d, "--prompts", _write(d / "p.txt", "\n \n")], "holds no prompts"),
    ("prompts in Latin-1", lambda d: ["generate", "--model", d, "--prompts", _write(d / "p.txt", "café\n".encode("latin-1"))],
     "not UTF-8"),
    ("model folder that is not a diffusers model", lambda d: ["generate", "--model", _not_diffusers(d)], "not a diffusers model folder"),
    ("model folder with a damaged model_index.json", lambda d: ["generate", "--model", _damaged_index(d)], "is not valid JSON"),
    ("missing model folder", lambda d: ["generate", "--model", d / "nope"], "no such model folder"),
    ("hub id while offline", lambda d: ["generate", "--model", "memaudit-tests/no-such-model"], "pass a local directory"),
    ("unknown candidate", lambda d: ["label", 99999, "exact_copy", "--reviewer", "alice"], "no candidate 99999"),
    ("blank reviewer", lambda d: ["label", 1, "exact_copy", "--reviewer", "  "], "a reviewer name is required"),
    ("grid that does not divide the working size", lambda d: ["audit", "--grid", 5], "does not divide"),
    ("unknown setting", lambda d: ["settings", "no_such_setting", "1"], "unknown setting"),
    ("backup into a non-empty folder", lambda d: ["backup", _write(d / "keep.txt", "x").parent], "not empty"),
]


@pytest.mark.parametrize("name, argv, needle", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_cli_errors_are_one_line_and_change_nothing(audited_ws, tmp_path, capsys, name, argv, needle):
    ws = shutil.copytree(audited_ws, tmp_path / "ws")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = argv(scratch)
    before = snapshot(ws)
    code, out, err = run(capsys, args[0], ws, *args[1:])
    assert_one_line_error(code, err, needle)
    assert snapshot(ws) == before


def test_a_folder_that_is_no_workspace_is_refused_by_every_command(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    for argv in (["status"], ["audit"], ["add-training", tmp_path], ["label", 1, "unsure", "--reviewer", "a"], ["verify"]):
        code, _, err = run(capsys, argv[0], plain, *argv[1:])
        assert_one_line_error(code, err, "not a memaudit workspace")
    assert list(plain.iterdir()) == []


def test_a_workspace_from_a_newer_memaudit_is_refused_and_left_unchanged(audited_ws, tmp_path, capsys):
    ws = shutil.copytree(audited_ws, tmp_path / "ws")
    con = sqlite3.connect(ws / "audit.db")
    con.execute("INSERT INTO migrations(version, name, applied_at) VALUES (999, 'from the future', '2100-01-01')")
    con.commit()
    con.close()
    before = snapshot(ws)
    for argv in (["status"], ["audit"], ["add-training", tmp_path], ["import-generations", tmp_path / "m.csv"],
                 ["label", 1, "unsure", "--reviewer", "a"], ["undo", "--reviewer", "a"], ["export", "--out", "-"],
                 ["verify"], ["backup", tmp_path / "copy"], ["settings", "delta", "0.2"], ["runs"]):
        code, _, err = run(capsys, argv[0], ws, *argv[1:])
        assert_one_line_error(code, err, "newer memaudit (schema 999", "upgrade memaudit")
    assert snapshot(ws) == before


# ---------------------------------------------------------------------------- NaN and inf
def test_damaged_stored_vectors_cannot_change_a_verdict(audited_ws, tmp_path, capsys):
    """Verdicts come from exact pixels: a damaged pixel index does not touch them, and a damaged pooled
    cache (the certified search's bounds, where NaN would silently fail every bound test) is pooled again."""
    ws = shutil.copytree(audited_ws, tmp_path / "ws")
    code, out, _ = run(capsys, "audit", ws, "--json")
    assert code == 0
    clean = {k: v for k, v in json.loads(out).items() if k != "run_id"}
    vectors = np.load(ws / "index" / "pixel.npy")
    vectors[3, 5] = np.nan
    vectors[6, 0] = np.inf
    np.save(ws / "index" / "pixel.npy", vectors)
    pooled_file = next((ws / "index").glob("pooled-*.npz"))
    pooled = dict(np.load(pooled_file))
    pooled["coarse"][2, 1] = np.nan
    pooled["fine"][5, 0] = np.inf
    with open(pooled_file, "wb") as f:
        np.savez(f, **pooled)
    code, out, _ = run(capsys, "audit", ws, "--json")
    assert code == 0 and {k: v for k, v in json.loads(out).items() if k != "run_id"} == clean
    repaired = np.load(pooled_file)
    assert np.isfinite(repaired["coarse"]).all() and np.isfinite(repaired["fine"]).all()
    assert_consistent(ws)


def test_a_clip_checkpoint_with_nan_weights_fails_the_audit_in_one_line(audited_ws, tmp_path, capsys):
    import open_clip
    import torch

    torch.set_num_threads(1)
    name = "memaudit-tiny-nan-clip"
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    state = open_clip.create_model(name).state_dict()
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")

    ws = shutil.copytree(audited_ws, tmp_path / "ws")
    assert run(capsys, "settings", ws, "clip_model", name)[0] == 0
    assert run(capsys, "settings", ws, "clip_pretrained", tmp_path / "nan.pt")[0] == 0
    before = snapshot(ws)
    code, _, err = run(capsys, "audit", ws, "--embedder", "clip")
    assert_one_line_error(code, err, "NaN or inf")
    assert snapshot(ws) == before and not list((ws / "index").glob("clip*"))


def test_a_pipeline_that_outputs_nan_stores_no_black_images(tmp_path, tiny_unconditional, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(tiny_unconditional, tmp_path / "nan-model")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith("conv_out.bias"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, weights)
    ws = Workspace.init(tmp_path / "ws").root
    code, _, err = run(capsys, "generate", ws, "--model", model, "--per-prompt", 3, "--steps", 2, "--device", "cpu")
    assert_one_line_error(code, err, "non-finite pixels (NaN or inf) in 3 of 3 images")
    assert sqlite3.connect(ws / "audit.db").execute("SELECT COUNT(*) FROM generations").fetchone() == (0,)
    assert not [p for p in (ws / "generations").rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------- a really full disk
def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(sys.platform != "linux" or not _can_mount_tmpfs(),
                                 reason="needs `unshare -rm` (an unprivileged mount namespace) to mount a small tmpfs")

FULL_DISK_SCRIPT = """
set -u
mount -t tmpfs -o size={small} tmpfs "$DISK"
"$PY" -m core.cli init "$DISK/ws" > /dev/null
"$PY" -m core.cli {command} > "$OUT/first.out" 2> "$OUT/first.err"; echo $? > "$OUT/first.rc"
find "$DISK/ws" -name '.tmp*' > "$OUT/temp-after-full"
mount -o remount,size=16M "$DISK"
"$PY" -m core.cli verify "$DISK/ws" --json > "$OUT/after-full.json"
"$PY" -c "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(c.execute('SELECT COUNT(*) FROM generations').fetchone()[0])" "$DISK/ws/audit.db" > "$OUT/kept"
"$PY" -m core.cli {command} --json > "$OUT/second.json" 2> "$OUT/second.err"; echo $? > "$OUT/second.rc"
"$PY" -m core.cli verify "$DISK/ws" --json > "$OUT/final.json"
find "$DISK/ws" -name '.tmp*' > "$OUT/temp-final"
"""


def fill_the_disk(tmp_path: Path, argv: list[object], small: str) -> dict:
    """Run ``memaudit ARGV`` ("WS" for the workspace) on a tmpfs of ``small`` bytes, then grow it to 16 MB,
    check what the full disk left (verify, rows kept) and run the command again."""
    import shlex

    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    command = " ".join('"$DISK/ws"' if a == "WS" else shlex.quote(str(a)) for a in argv)
    script = FULL_DISK_SCRIPT.format(small=small, command=command)
    env = dict(ENV, DISK=str(disk), OUT=str(out), PY=sys.executable)
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=env, check=True, timeout=600)
    read = lambda name: (out / name).read_text()  # noqa: E731
    return {"first_rc": int(read("first.rc")), "first_err": read("first.err"), "first_out": read("first.out"),
            "after_full": json.loads(read("after-full.json")), "kept": int(read("kept")),
            "temp_after_full": read("temp-after-full").split(), "second_rc": int(read("second.rc")),
            "second": json.loads(read("second.json") or "null"), "second_err": read("second.err"),
            "final": json.loads(read("final.json")), "temp_final": read("temp-final").split()}


@needs_tmpfs
def test_a_full_disk_during_import_is_one_line_and_a_rerun_finishes(tmp_path):
    from workspaces import planted_files

    files = planted_files(tmp_path / "data")
    r = fill_the_disk(tmp_path, ["import-generations", "WS", files["manifest"]], "400k")
    assert r["first_rc"] == 1, r
    assert_one_line_error(1, r["first_err"], "free")  # names the full disk and says to free space
    assert r["after_full"]["ok"] and r["after_full"]["missing"] == []  # every row kept names a complete file
    assert r["second_rc"] == 0 and r["second"]["imported"] == 92 - r["kept"], r
    assert r["final"]["ok"] and r["final"]["checked_files"] == 92 and r["final"]["orphans"] == []
    assert r["temp_final"] == []


@needs_tmpfs
@pytest.mark.slow
def test_a_full_disk_during_generation_is_one_line_and_a_rerun_finishes(tmp_path, tiny_text2image):
    prompts = _write(tmp_path / "prompts.txt", "a red cube\na blue ball\n")
    r = fill_the_disk(tmp_path, ["generate", "WS", "--model", tiny_text2image, "--prompts", prompts, "--per-prompt", 150,
                                 "--steps", 1, "--batch-size", 8, "--device", "cpu"], "300k")
    assert r["first_rc"] == 1, r
    assert_one_line_error(1, r["first_err"], "free")
    assert r["after_full"]["ok"] and 0 < r["kept"] < 300
    assert r["second_rc"] == 0 and r["second"]["generated"] == 300 - r["kept"], r
    assert r["final"]["ok"] and r["final"]["checked_files"] == 300 and r["final"]["orphans"] == []
    assert r["temp_final"] == []


# ---------------------------------------------------------------------------- parser properties
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)
CSVISH = st.lists(st.sampled_from(["path", "prompt", "seed", ",", "\n", "\r\n", '"', "a.png", " ", "x", "1", "-3",
                                   "99999999999999999999", "é", "\t", "{", "}", ":", "null"]), max_size=60).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(TEXT, CSVISH), fmt=st.sampled_from(["csv", "jsonl"]))
def test_manifest_parser_gives_rows_or_one_input_error(text, fmt):
    """Any text: rows with stripped paths and prompts in file order, or an InputError of one line."""
    from core.importer import parse_manifest

    try:
        rows = parse_manifest(text, fmt, name="m")
    except InputError as e:
        assert "\n" not in str(e) and str(e).startswith("m")
        return
    assert rows and [r.line for r in rows] == sorted(r.line for r in rows)
    for r in rows:
        assert r.path == r.path.strip() and r.prompt == r.prompt.strip()
        assert r.seed is None or -(2**63) <= r.seed < 2**63


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(TEXT.map(lambda t: t.encode("utf-8")), st.binary(max_size=200), CSVISH.map(str.encode)),
       suffix=st.sampled_from([".csv", ".jsonl", ".txt"]))
def test_captions_parser_gives_captions_or_one_input_error(tmp_path, data, suffix):
    from core.training import read_captions

    path = tmp_path / f"captions{suffix}"
    path.write_bytes(data)
    try:
        captions = read_captions(path)
    except InputError as e:
        assert "\n" not in str(e)
        return
    for key, caption in captions.items():
        assert not key.startswith("./") and "\\" not in key
        assert caption and caption == caption.strip()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(TEXT.map(lambda t: t.encode("utf-8")), st.binary(max_size=200)))
def test_prompts_reader_gives_distinct_stripped_lines_or_one_input_error(tmp_path, data):
    from core.generate import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    try:
        prompts = read_prompts(path)
    except InputError as e:
        assert "\n" not in str(e)
        return
    assert prompts and len(set(prompts)) == len(prompts)
    assert all(p and p == p.strip() and "\n" not in p for p in prompts)


PARTS = st.sampled_from(["a", "b", "..", ".", "", "in", "link", "out", "/", "\\", "~", "C:", "a.png"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(PARTS, min_size=1, max_size=8))
def test_manifest_paths_never_lead_outside_the_manifest_folder(tmp_path, parts):
    """Any path written in a manifest either resolves inside the manifest's folder or is refused."""
    from core.importer import _locate

    base = tmp_path / "base"
    if not base.exists():
        (base / "in").mkdir(parents=True)
        (tmp_path / "out").mkdir()
        (base / "link").symlink_to(tmp_path / "out")  # a symlink inside pointing outside
        (base / "in" / "up").symlink_to(base)  # and one pointing back up (still inside)
    written = "/".join(parts)
    found, reason = _locate(base.resolve(), written)
    if found is None:
        assert reason
    else:
        assert found == base.resolve() or base.resolve() in found.parents, (written, found)
