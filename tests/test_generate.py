"""Generation through tiny real diffusers pipelines: seeds, resume, provenance, regeneration, errors."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import generate as gen
from core.errors import InputError, MemauditError, ModelError
from core.store import Workspace

FAST = dict(steps=2, guidance=7.5, device="cpu")


def rows(ws: Workspace) -> list[dict]:
    with ws.connect() as con:
        return [dict(r) for r in con.execute(
            "SELECT g.*, p.text AS prompt FROM generations g JOIN prompts p ON p.id = g.prompt_id ORDER BY g.id")]


def pixels(ws: Workspace, row: dict) -> np.ndarray:
    return np.asarray(Image.open(ws.resolve(row["path"])).convert("RGB"))


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.init(tmp_path / "ws")


# ------------------------------------------------------------------------------ generation
def test_text2image_rows_have_one_seed_each_and_full_provenance(ws, tiny_text2image, monkeypatch):
    from core.images import png_bytes

    encoded = []
    monkeypatch.setattr(gen, "png_bytes", lambda pixels: encoded.append(1) or png_bytes(pixels))
    report = gen.generate(ws, str(tiny_text2image), ["a red cube", "a blue ball"], 3, batch_size=4, seed=10, **FAST)
    assert (report.planned, report.skipped_existing, report.generated, report.stopped) == (6, 0, 6, False)
    got = rows(ws)
    assert sorted((r["prompt"], r["seed"]) for r in got) == sorted(
        (p, s) for p in ("a red cube", "a blue ball") for s in (10, 11, 12))
    with ws.connect() as con:
        model = dict(con.execute("SELECT * FROM models").fetchone())
    assert model["kind"] == "text2image" and model["pipeline_class"] == "StableDiffusionPipeline"
    assert model["weights_hash"] == gen.weights_hash(tiny_text2image) and model["scheduler"] == "DDIMScheduler"
    for r in got:
        data = ws.resolve(r["path"]).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        assert r["path"] == f"generations/p0/{r['prompt_id']}/s0/{r['seed']}-{sha[:12]}.png" and r["sha256"] == sha
        assert (r["width"], r["height"], r["steps"], r["guidance"], r["source"]) == (16, 16, 2, 7.5, "generate")
        p = json.loads(r["params"])
        assert p["prompt"] == r["prompt"] and p["seed"] == r["seed"] and p["base_seed"] == 10
        assert p["model_ref"] == str(tiny_text2image.resolve()) and p["weights_hash"] == model["weights_hash"]
        assert p["pipeline_class"] == "StableDiffusionPipeline" and p["scheduler_class"] == "DDIMScheduler"
        assert p["scheduler_config"]["beta_schedule"] == "scaled_linear"
        assert (p["steps"], p["guidance"], p["dtype"], p["device"], p["generator_device"]) == (2, 7.5, "float32", "cpu", "cpu")
        assert p["diffusers_version"] and p["torch_version"] and p["created_at"]
    # every seed gives its own image, encoded once: the bytes hashed are the bytes stored
    assert len({r["sha256"] for r in got}) == 6 and len(encoded) == 6


def test_safety_checker_is_removed(tiny_text2image):
    loaded = gen.load_pipeline(str(tiny_text2image), "cpu")
    assert loaded.kind == "text2image" and loaded.size == (16, 16)
    assert loaded.pipeline.safety_checker is None
    assert loaded.pipeline.config.requires_safety_checker is False


def test_unconditional_model_stores_empty_prompt_and_no_guidance(ws, tiny_unconditional):
    report = gen.generate(ws, str(tiny_unconditional), None, 3, batch_size=2, seed=0, **FAST)
    assert report.generated == 3
    got = rows(ws)
    assert [(r["prompt"], r["seed"], r["guidance"]) for r in got] == [("", 0, None), ("", 1, None), ("", 2, None)]
    assert json.loads(got[0]["params"])["kind"] == "unconditional"
    with pytest.raises(InputError, match="unconditional model and takes no prompts"):
        gen.generate(ws, str(tiny_unconditional), ["a cat"], 1, batch_size=1, seed=0, **FAST)


def test_class_model_takes_ids_and_names_and_refuses_others(ws, tiny_class_conditional):
    ref = str(tiny_class_conditional)
    with pytest.raises(InputError, match="'zebra' is not a class"):
        gen.generate(ws, ref, ["golden retriever", "zebra"], 1, batch_size=2, seed=0, **FAST)
    assert rows(ws) == []  # refused before anything was generated
    report = gen.generate(ws, ref, ["Golden Retriever", "7"], 2, batch_size=4, seed=0, **FAST)
    assert report.generated == 4
    labels = {(r["prompt"], json.loads(r["params"])["class_label"]) for r in rows(ws)}
    assert labels == {("Golden Retriever", 1), ("7", 7)}
    with pytest.raises(InputError, match="id from 0 to 999"):
        gen.generate(ws, ref, ["1000"], 1, batch_size=1, seed=0, **FAST)


def test_settings_are_checked_before_loading(ws):
    with pytest.raises(InputError, match="steps"):
        gen.generate(ws, "/nonexistent/model", ["x"], 1, steps=0, guidance=1.0, batch_size=1, seed=0, device="cpu")
    with pytest.raises(InputError, match="batch_size"):
        gen.generate(ws, "/nonexistent/model", ["x"], 1, steps=1, guidance=1.0, batch_size=0, seed=0, device="cpu")


# ------------------------------------------------------------------------------ seeds and batches
@pytest.fixture
def ddpm(tmp_path) -> str:
    """Unconditional DDPM: a stochastic sampler drawing fresh noise at every step from each image's generator."""
    from tiny_models import build_unconditional

    return str(build_unconditional(tmp_path / "ddpm", scheduler="ddpm"))


@pytest.mark.parametrize("model", ["text2image", "ddpm"])
def test_rows_generated_one_at_a_time_regenerate_bit_identical(ws, tiny_text2image, ddpm, model):
    ref, prompts = (str(tiny_text2image), ["a red cube"]) if model == "text2image" else (ddpm, None)
    gen.generate(ws, ref, prompts, 3, batch_size=1, seed=3, **FAST)
    loaded = gen.load_pipeline(ref, "cpu")
    for r in rows(ws):
        again = gen.regenerate(ws, r["id"], "cpu", loaded=loaded)
        assert again.dtype == np.uint8 and again.shape == (16, 16, 3)
        assert np.array_equal(again, pixels(ws, r)), f"seed {r['seed']}"


@pytest.mark.parametrize("model", ["text2image", "ddpm"])
def test_batched_rows_regenerate_alone_within_one_level(ws, tiny_text2image, ddpm, model):
    """CPU kernels are not batch-invariant: a row regenerated alone may differ from its batch of 8
    by one 8-bit level on a few values (the tolerance documented in core.generate), never more."""
    ref, prompts = (str(tiny_text2image), ["a red cube"]) if model == "text2image" else (ddpm, None)
    gen.generate(ws, ref, prompts, 8, batch_size=8, seed=0, **FAST)
    got = rows(ws)
    assert {json.loads(r["params"])["batch_size"] for r in got} == {8}
    loaded = gen.load_pipeline(ref, "cpu")
    diffs = np.stack([np.abs(gen.regenerate(ws, r["id"], "cpu", loaded=loaded).astype(int) - pixels(ws, r))
                      for r in got])
    assert diffs.max() <= 1 and (diffs > 0).mean() <= 0.001
    # below the 8-bit rounding the difference is float noise
    conds = [((prompts or [""])[0], None)] * 8
    batch = gen.sample(loaded, conds, list(range(8)), steps=2, guidance=7.5)
    alone = np.concatenate([gen.sample(loaded, conds[:1], [s], steps=2, guidance=7.5) for s in range(8)])
    assert np.abs(batch - alone).max() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generates_in_half_precision_and_regenerates_rows(ws, tiny_text2image):
    """On CUDA: fp16 rows recorded as such, finite and not black; batch-1 rows regenerate exactly,
    batched rows within the documented one 8-bit level."""
    ref = str(tiny_text2image)
    gen.generate(ws, ref, ["a red cube"], 3, steps=4, guidance=7.5, batch_size=1, seed=3, device="cuda")
    gen.generate(ws, ref, ["a blue ball"], 4, steps=4, guidance=7.5, batch_size=4, seed=0, device="cuda")
    loaded = gen.load_pipeline(ref, "cuda")
    assert loaded.dtype == "float16" and loaded.pipeline.unet.dtype == torch.float16
    for r in rows(ws):
        params = json.loads(r["params"])
        assert (params["dtype"], params["device"]) == ("float16", "cuda")
        stored = pixels(ws, r)
        assert stored.max() > 2
        diff = np.abs(gen.regenerate(ws, r["id"], "cuda", loaded=loaded).astype(int) - stored)
        assert diff.max() <= (0 if params["batch_size"] == 1 else 1), (r["prompt"], r["seed"], int(diff.max()))


def test_regenerate_needs_only_the_row(ws, tiny_text2image):
    gen.generate(ws, str(tiny_text2image), ["a red cube"], 2, batch_size=2, seed=5, **FAST)
    r = rows(ws)[1]
    assert np.array_equal(gen.regenerate(ws, r["id"], "cpu"), pixels(ws, r))
    with pytest.raises(InputError, match="no generation with id 999"):
        gen.regenerate(ws, 999, "cpu")


def test_regenerate_refuses_a_changed_model(ws, tmp_path, tiny_unconditional):
    model = shutil.copytree(tiny_unconditional, tmp_path / "copy")
    gen.generate(ws, str(model), None, 1, batch_size=1, seed=0, **FAST)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="has changed since generation"):
        gen.regenerate(ws, rows(ws)[0]["id"], "cpu")


# ------------------------------------------------------------------------------ resume, cancel, disk full
def test_stop_after_first_batch_then_resume_completes_without_duplicates(ws, tiny_text2image):
    ref, prompts = str(tiny_text2image), ["a red cube", "a blue ball"]
    calls: list[tuple[int, int]] = []
    asked = []

    def stop_after_first() -> bool:
        asked.append(1)
        return len(asked) > 1

    first = gen.generate(ws, ref, prompts, 3, batch_size=4, seed=0, progress=lambda d, t: calls.append((d, t)),
                         should_stop=stop_after_first, **FAST)
    assert (first.planned, first.generated, first.stopped) == (6, 4, True)
    assert calls == [(0, 6), (4, 6)] and len(rows(ws)) == 4
    calls.clear()
    second = gen.generate(ws, ref, prompts, 3, batch_size=4, seed=0, progress=lambda d, t: calls.append((d, t)), **FAST)
    assert (second.skipped_existing, second.generated, second.stopped) == (4, 2, False)
    assert calls == [(4, 6), (6, 6)]
    keys = [(r["prompt"], r["seed"]) for r in rows(ws)]
    assert len(keys) == 6 and len(set(keys)) == 6
    # nothing left: a third run does no work; other steps are other generations
    assert gen.generate(ws, ref, prompts, 3, batch_size=4, seed=0, **FAST).generated == 0
    assert gen.generate(ws, ref, prompts[:1], 1, batch_size=4, seed=0, steps=1, guidance=7.5, device="cpu").generated == 1


def test_disk_full_stops_with_a_clear_error_and_nothing_half_written(ws, tiny_unconditional, monkeypatch):
    real = gen.save_png_atomic
    written = []

    def fill_up(array, path):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(array, path)
        written.append(Path(path))

    monkeypatch.setattr(gen, "save_png_atomic", fill_up)
    with pytest.raises(MemauditError, match="disk is full"):
        gen.generate(ws, str(tiny_unconditional), None, 5, batch_size=4, seed=0, **FAST)
    got = rows(ws)
    assert sorted(ws.resolve(r["path"]) for r in got) == sorted(written)  # a row for each complete file, no more
    assert not list((ws.root / "generations").rglob(".tmp-*"))
    monkeypatch.setattr(gen, "save_png_atomic", real)
    again = gen.generate(ws, str(tiny_unconditional), None, 5, batch_size=4, seed=0, **FAST)
    assert (again.skipped_existing, again.generated) == (2, 3)


# ------------------------------------------------------------------------------ loading errors
def test_offline_hub_id_says_pass_a_local_directory():
    with pytest.raises(ModelError, match="pass a local directory"):
        gen.load_pipeline("memaudit-tests/no-such-model", "cpu")


def test_unreachable_hub_says_pass_a_local_directory(monkeypatch):
    """Online mode but no connection (simulated: this machine has no network to fail against)."""
    from diffusers import DiffusionPipeline

    def no_network(*args, **kwargs):
        raise OSError("Cannot load model: the model is not fully cached locally and the Hub could not be reached")

    monkeypatch.setattr(gen, "_offline", lambda: False)
    monkeypatch.setattr(DiffusionPipeline, "download", no_network)
    with pytest.raises(ModelError, match="the Hub could not be reached; pass a local directory"):
        gen.load_pipeline("memaudit-tests/no-such-model", "cpu")


def test_folders_that_are_not_diffusers_models_are_refused(tmp_path, tiny_unconditional):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        gen.load_pipeline(str(plain), "cpu")
    with pytest.raises(ModelError, match="no such model folder"):
        gen.load_pipeline(str(tmp_path / "missing"), "cpu")
    broken = shutil.copytree(tiny_unconditional, tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match="cannot load the diffusers pipeline"):
        gen.load_pipeline(str(broken), "cpu")


def test_own_pipelines_load_through_their_class(tmp_path, monkeypatch, tiny_unconditional):
    """A model_index.json naming a class of core.demo.model (unknown to diffusers) loads through that class."""
    import torch
    from diffusers import DDIMPipeline, ImagePipelineOutput

    class PromptedTestPipeline(DDIMPipeline):
        def caption_ids(self, prompts: list[str]) -> list[int]:
            for p in prompts:
                if p.startswith("x"):
                    raise InputError(f"caption {p!r} is not in this model's vocabulary")
            return [len(p) for p in prompts]

        def __call__(self, prompt: list[str], num_inference_steps: int = 2, generator=None, output_type: str = "np"):
            out = super().__call__(batch_size=len(prompt), generator=generator,
                                   num_inference_steps=num_inference_steps, output_type="np")
            shade = torch.tensor([len(p) % 2 for p in prompt], dtype=torch.float32).numpy()[:, None, None, None]
            return ImagePipelineOutput(images=out.images * 0.5 + shade * 0.5)

    from core.demo import model as own_pipelines

    PromptedTestPipeline.__module__ = own_pipelines.__name__
    monkeypatch.setattr(own_pipelines, "PromptedTestPipeline", PromptedTestPipeline, raising=False)
    base = gen.load_pipeline(str(tiny_unconditional), "cpu").pipeline
    folder = tmp_path / "own"
    PromptedTestPipeline(unet=base.unet, scheduler=base.scheduler).save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "PromptedTestPipeline"

    loaded = gen.load_pipeline(str(folder), "cpu")
    assert type(loaded.pipeline) is PromptedTestPipeline
    assert loaded.kind == "text2image" and not loaded.uses_guidance
    ws = Workspace.init(tmp_path / "ws")
    with pytest.raises(InputError, match="'xyz' is not in this model's vocabulary"):  # checked before any batch
        gen.generate(ws, str(folder), ["ab", "xyz"], 2, batch_size=1, seed=0, **FAST)
    assert rows(ws) == []
    assert gen.generate(ws, str(folder), ["ab", "abc"], 2, batch_size=4, seed=0, **FAST).generated == 4
    assert {r["guidance"] for r in rows(ws)} == {None}
    for r in rows(ws):
        assert np.array_equal(gen.regenerate(ws, r["id"], "cpu", loaded=loaded), pixels(ws, r))


def test_resolve_device():
    import torch

    assert gen.resolve_device("cpu") == "cpu"
    assert gen.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else
                                          "mps" if torch.backends.mps.is_available() else "cpu")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        gen.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            gen.resolve_device("cuda")


def test_weights_hash_follows_weight_bytes_only(tmp_path, tiny_unconditional):
    model = shutil.copytree(tiny_unconditional, tmp_path / "m")
    before = gen.weights_hash(model)
    (model / "README.md").write_text("notes")
    assert gen.weights_hash(model) == before
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert gen.weights_hash(model) != before


# ------------------------------------------------------------------------------ prompts files
def test_read_prompts_strips_drops_blanks_dedupes_keeps_order(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\ufeff  a cat \n\n b dog\r\na cat\n   \nc bird", encoding="utf-8")
    assert gen.read_prompts(f) == ["a cat", "b dog", "c bird"]


def test_read_prompts_errors(tmp_path):
    with pytest.raises(InputError, match="no such prompts file"):
        gen.read_prompts(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    with pytest.raises(InputError, match="holds no prompts"):
        gen.read_prompts(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.txt is not UTF-8"):
        gen.read_prompts(tmp_path / "latin1.txt")
