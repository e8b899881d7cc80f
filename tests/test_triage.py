"""Triage (core.triage): scores checked by hand, seeded and resumable runs, bad input, and a tiny
model trained here that memorises some captions and not others, which triage must rank first."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core import triage
from core.errors import InputError, ModelError
from core.generate import load_pipeline
from core.store import Workspace
from test_bad_input import assert_one_line_error, run, shown, snapshot


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.double().pow(2).flatten(1).mean(1).sqrt()


def _noise(shape: tuple[int, ...], seed: int, samples: int) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + j)) for j in range(samples)])


def _scores(ws: Workspace, run_id: int) -> dict[str, float]:
    return {r.prompt: r.score for r in triage.ranked(ws, run_id)}


# ---------------------------------------------------------------------------- by hand
def _sd_by_hand(model: Path, prompt: str, samples: int, seed: int, guidance: float) -> tuple[float, float]:
    """(noise-norm, one-step) of ``prompt`` at the first step of a 50-step grid, from the components alone."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    tok, enc, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet

    def embed(text: str) -> torch.Tensor:
        ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        return enc(ids)[0]

    # the tiny model's scheduler: 100 training steps, scaled_linear betas, "leading" spacing with offset 1:
    # a 50-step grid is 99, 97, ..., 1, so the first step is t = 99, and a = prod(1 - beta_i) over all 100 betas
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 100, dtype=torch.float32) ** 2
    a = torch.cumprod(1.0 - betas, 0)[99]
    x = _noise((4, 8, 8), seed, samples)
    with torch.no_grad():
        cond = embed(prompt).repeat(samples, 1, 1)
        empty = embed("").repeat(samples, 1, 1)
        eps_c = unet(x, 99, encoder_hidden_states=cond).sample
        eps_u = unet(x, 99, encoder_hidden_states=empty).sample
    noise_norm = float(_rms(eps_c - eps_u).mean())
    eps_g = eps_u + guidance * (eps_c - eps_u)
    x0 = (x - (1 - a).sqrt() * eps_g) / a.sqrt()
    one_step = float(_rms(x0 - x).mean())
    return noise_norm, one_step


def test_scores_equal_a_hand_computation_on_a_tiny_stable_diffusion_pipeline(tmp_path, tiny_text2image):
    ws = Workspace.init(tmp_path / "ws")
    prompts = ["a red fox", "an astronaut"]
    for method in triage.METHODS:
        params = triage.make_params(ws, method=method, steps=1, samples=3, seed=5, guidance=7.5, sampling_steps=50)
        report = triage.triage(ws, str(tiny_text2image), prompts, params, batch_size=4, device="cpu")
        assert report.scored == 2 and report.skipped_existing == 0
        got = _scores(ws, report.run_id)
        for p in prompts:
            want = _sd_by_hand(tiny_text2image, p, samples=3, seed=5, guidance=7.5)[triage.METHODS.index(method)]
            assert got[p] == pytest.approx(want, rel=1e-4), (method, p)
    runs = triage.list_runs(ws)
    assert [r.params.method for r in runs] == list(triage.METHODS)
    assert all(len(r.weights_hash) == 64 and r.prompts == 2 for r in runs)


def test_pixel_pipeline_score_equals_a_hand_computation(tmp_path):
    """memaudit's own x0-predicting pipeline: eps = (x - sqrt(a) x0) / sqrt(1 - a) at t = 999 (cosine schedule)."""
    from core.demo.model import CaptionConditionedPipeline, make_scheduler
    from core.demo.trainer import TrainConfig, build_unet

    torch.manual_seed(0)
    unet = build_unet(TrainConfig(steps=1, size=8, channels=(8, 16)), classes=3)
    CaptionConditionedPipeline(unet=unet, scheduler=make_scheduler(), vocabulary=["", "a cat", "a dog"],
                               default_steps=4).save_pretrained(tmp_path / "model")
    ws = Workspace.init(tmp_path / "ws")
    params = triage.make_params(ws, steps=2, samples=2, seed=0, guidance=3.0, sampling_steps=4)
    report = triage.triage(ws, str(tmp_path / "model"), ["a cat", "a dog"], params, batch_size=8, device="cpu")
    got = _scores(ws, report.run_id)

    sched = make_scheduler()
    sched.set_timesteps(4)
    assert sched.timesteps.tolist()[:2] == [999, 749]
    for caption, label in (("a cat", 1), ("a dog", 2)):
        x = _noise((3, 8, 8), 0, 2)
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for t in (999, 749):
                a = sched.alphas_cumprod[t]
                x0_c = unet(x, t, class_labels=torch.full((2,), label)).sample
                x0_u = unet(x, t, class_labels=torch.zeros(2, dtype=torch.long)).sample
                eps = lambda x0: (x - a.sqrt() * x0) / (1 - a).sqrt()  # noqa: E731
                total += _rms(eps(x0_c) - eps(x0_u))
                x = sched.step(x0_u + 3.0 * (x0_c - x0_u), t, x).prev_sample
        assert got[caption] == pytest.approx(float((total / 2).mean()), rel=1e-4)


# ---------------------------------------------------------------------------- determinism, resume, use
def test_same_seed_same_scores_other_seed_other_scores_and_resume(tmp_path, tiny_text2image):
    prompts = ["a red fox", "an astronaut", "a bowl of soup"]
    scores = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        ws = Workspace.init(tmp_path / name)
        params = triage.make_params(ws, samples=2, seed=seed)
        scores.append(_scores(ws, triage.triage(ws, str(tiny_text2image), prompts, params, batch_size=4, device="cpu").run_id))
    assert scores[0] == scores[1]
    assert all(scores[0][p] != scores[2][p] for p in prompts)

    # an interrupted run: the same command scores only what is missing, into the same run
    ws = Workspace.init(tmp_path / "resume")
    params = triage.make_params(ws, samples=2, seed=0)
    first = triage.triage(ws, str(tiny_text2image), prompts, params, batch_size=2, device="cpu",
                          should_stop=lambda: len(triage.list_runs(ws)) > 0)
    assert first.stopped and first.scored == 1
    again = triage.triage(ws, str(tiny_text2image), prompts, params, batch_size=2, device="cpu")
    assert again.run_id == first.run_id and again.skipped_existing == 1 and again.scored == 2
    assert _scores(ws, again.run_id) == pytest.approx(scores[0], rel=1e-5)


def test_cli_triage_json_out_and_generate_from_the_ranking(tmp_path, capsys, tiny_text2image):
    ws = tmp_path / "ws"
    assert run(capsys, "init", ws)[0] == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan astronaut\na bowl of soup\n")
    code, out, err = run(capsys, "triage", ws, "--model", tiny_text2image, "--prompts", prompts, "--samples", "2",
                         "--out", tmp_path / "top.txt", "--top", "2", "--json")
    assert code == 0, err
    data = json.loads(out)
    ranking = [p["prompt"] for p in data["prompts"]]
    assert sorted(ranking) == sorted(prompts.read_text().split("\n")[:3])
    assert [p["score"] for p in data["prompts"]] == sorted((p["score"] for p in data["prompts"]), reverse=True)
    assert data["parameters"] == {"method": "noise-norm", "steps": 1, "samples": 2, "seed": 0, "guidance": 7.5, "sampling_steps": 50}
    assert (tmp_path / "top.txt").read_text() == "".join(p + "\n" for p in ranking[:2])

    code, out, err = run(capsys, "generate", ws, "--model", tiny_text2image, "--prompts-from-triage", data["run_id"],
                         "--top", "1", "--per-prompt", "2", "--steps", "2", "--json")
    assert code == 0, err
    w = Workspace.open(ws)
    with w.connect() as con:
        generated = {r[0] for r in con.execute("SELECT p.text FROM generations g JOIN prompts p ON p.id = g.prompt_id")}
    assert generated == {ranking[0]}

    code, out, err = run(capsys, "generate", ws, "--model", tiny_text2image, "--prompts-from-triage", 99, "--top", "1")
    assert_one_line_error(code, err, "no triage run 99")
    code, out, err = run(capsys, "generate", ws, "--model", tiny_text2image, "--prompts", prompts, "--top", "1")
    assert_one_line_error(code, err, "--prompts-from-triage")


def test_validation_against_an_audit_run(tmp_path, tiny_text2image):
    """The ROC of the score against the audit's verdict, and the threshold that keeps every extracted prompt."""
    from core import audit

    ws = Workspace.init(tmp_path / "ws")
    prompts = [f"prompt {i}" for i in range(6)]
    report = triage.triage(ws, str(tiny_text2image), prompts, triage.make_params(ws, samples=1), device="cpu")
    ranking = triage.ranked(ws, report.run_id)
    # an audit run whose verdicts we choose: extracted = ranks 1, 2 and 4
    extracted = {ranking[i].prompt_id for i in (0, 1, 3)}
    with ws.transaction() as con:
        run_id = con.execute("INSERT INTO audit_runs(created_at, finished_at, status, params) VALUES ('x', 'x', 'done', ?)",
                             (json.dumps(audit.params_from(ws).to_dict()),)).lastrowid
        for r in ranking[:5]:  # prompt of rank 6 was never audited
            con.execute("INSERT INTO prompt_results(run_id, prompt_id, generations, largest_clique, flagged, mean_distance) "
                        "VALUES (?, ?, 10, 10, 1, 0.1)", (run_id, r.prompt_id))
        for pid in extracted:
            gen_id = con.execute("INSERT INTO generations(prompt_id, seed, path, sha256, width, height, source, created_at) "
                                 "VALUES (?, ?, ?, 'x', 8, 8, 'import', 'x')", (pid, pid, f"generations/{pid}.png")).lastrowid
            con.execute("INSERT INTO candidates(run_id, prompt_id, group_rank, clique_size, mean_distance, flagged, "
                        "medoid_generation_id, extracted, score) VALUES (?, ?, 0, 10, 0.1, 1, ?, 1, 0)", (run_id, pid, gen_id))
    v = triage.validate(ws, report.run_id, run_id)
    assert (v.prompts, v.positives, v.negatives, v.not_audited) == (5, 3, 2, 1)
    # ranks 1 2 3 4 5 are + + - + -: of the 6 ordered pairs (pos, neg), 5 are ranked right
    assert v.auc == pytest.approx(5 / 6)
    assert v.tpr_at_1pct_fpr == pytest.approx(2 / 3)
    assert v.keep_all_threshold == ranking[3].score and v.keep_all_rank == 4
    assert "keeps the top 4 of 5" in v.summary()
    flagged = triage.validate(ws, report.run_id, run_id, "flagged")
    assert flagged.positives == 5 and flagged.calibration is None


def test_export_holds_the_triage_runs(tmp_path, tiny_text2image):
    from core.export import export_json
    from reliability import small_audited_workspace

    ws, _ = small_audited_workspace(tmp_path / "ws")
    params = triage.make_params(ws, samples=1)
    report = triage.triage(ws, str(tiny_text2image), ["a red fox", "an astronaut"], params, device="cpu")
    runs = export_json(ws)["triage_runs"]
    assert [r["id"] for r in runs] == [report.run_id]
    assert runs[0]["parameters"] == params.to_dict() and len(runs[0]["weights_hash"]) == 64
    assert runs[0]["provenance"]["pipeline_class"] == "StableDiffusionPipeline"
    assert [s["rank"] for s in runs[0]["scores"]] == [1, 2]


# ---------------------------------------------------------------------------- bad input
def _workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    Workspace.init(ws)
    return ws


def _prompts(tmp_path: Path, text: str = "a red fox\n") -> Path:
    f = tmp_path / "prompts.txt"
    f.write_text(text)
    return f


def test_models_without_an_unconditional_branch_are_refused_in_one_line(tmp_path, capsys, tiny_unconditional,
                                                                         tiny_class_conditional, tiny_text2image):
    ws = _workspace(tmp_path)
    before = snapshot(ws)
    prompts = _prompts(tmp_path)
    code, _, err = run(capsys, "triage", ws, "--model", tiny_unconditional, "--prompts", prompts)
    assert_one_line_error(code, err, "unconditional model", "classifier-free guidance")
    code, _, err = run(capsys, "triage", ws, "--model", tiny_class_conditional, "--prompts", prompts)
    assert_one_line_error(code, err, "class model")

    no_encoder = tmp_path / "no-encoder"
    shutil.copytree(tiny_text2image, no_encoder)
    index = json.loads((no_encoder / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (no_encoder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(no_encoder / "text_encoder")
    code, _, err = run(capsys, "triage", ws, "--model", no_encoder, "--prompts", prompts)
    assert_one_line_error(code, err, "cannot load", "check that the folder is complete")
    # a pipeline object that lacks its text encoder (built in code) gets its own sentence
    loaded = load_pipeline(str(tiny_text2image), "cpu")
    with pytest.raises(ModelError, match="takes no guidance_scale"):
        triage.scorer_for(dataclasses.replace(loaded, call_params=loaded.call_params - {"guidance_scale"}))
    loaded.pipeline.text_encoder = None
    with pytest.raises(ModelError, match="has no text encoder"):
        triage.scorer_for(loaded)

    from core.demo.model import CaptionConditionedPipeline, make_scheduler
    from core.demo.trainer import TrainConfig, build_unet

    torch.manual_seed(0)
    no_dropout = tmp_path / "no-dropout"
    CaptionConditionedPipeline(unet=build_unet(TrainConfig(steps=1, size=8, channels=(8, 16)), classes=2),
                               scheduler=make_scheduler(), vocabulary=["", "a red fox"]).save_pretrained(no_dropout)
    (no_dropout / "training.json").write_text(json.dumps({"config": {"caption_dropout": 0.0}}))
    code, _, err = run(capsys, "triage", ws, "--model", no_dropout, "--prompts", prompts)
    assert_one_line_error(code, err, "without caption dropout")
    assert snapshot(ws) == before


def test_empty_prompts_file_nan_prediction_and_long_prompt(tmp_path, capsys, tiny_text2image):
    ws = _workspace(tmp_path)
    before = snapshot(ws)
    code, _, err = run(capsys, "triage", ws, "--model", tiny_text2image, "--prompts", _prompts(tmp_path, "\n  \n"))
    assert_one_line_error(code, err, "holds no prompts")

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_text2image, broken)
    from safetensors.torch import load_file, save_file

    weights_file = next((broken / "unet").glob("*.safetensors"))
    state = load_file(weights_file)
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("nan"))
    save_file(state, weights_file)
    code, _, err = run(capsys, "triage", ws, "--model", broken, "--prompts", _prompts(tmp_path))
    assert_one_line_error(code, err, "NaN or inf", "'a red fox'")
    code, _, err = run(capsys, "triage", ws, "--model", tiny_text2image, "--prompts", _prompts(tmp_path), "--steps", "60")
    assert_one_line_error(code, err, "exceed the 50-step sampling grid")
    code, _, err = run(capsys, "triage", ws, "--model", tiny_text2image, "--prompts", _prompts(tmp_path),
                       "--method", "one-step", "--steps", "2")
    assert_one_line_error(code, err, "--steps 1")
    assert snapshot(ws) == before

    # longer than the tokenizer's 16 tokens: scored on what the model reads, and said in one line
    long_prompt = "a red fox jumping over a lazy dog"
    code, out, err = run(capsys, "triage", ws, "--model", tiny_text2image, "--prompts", _prompts(tmp_path, long_prompt + "\n"),
                         "--samples", "1")
    assert code == 0, err
    notes = shown(err)
    assert len(notes) == 1 and notes[0].startswith("memaudit: note: ") and "first 16" in notes[0], err
    row = triage.ranked(Workspace.open(ws))[0]
    assert row.prompt == long_prompt and "first 16" in row.note
    with pytest.raises(InputError, match="no prompts"):
        triage.triage(Workspace.open(ws), str(tiny_text2image), ["", " "], triage.make_params(), device="cpu")


# ---------------------------------------------------------------------------- a model that memorises
def _training_set(folder: Path) -> tuple[Path, list[str], list[str]]:
    """4 real images with a caption each, 8 copies apiece (memorised), and 2 captions each shared by
    4 different images, once each (the model cannot tell which image such a caption means)."""
    from core.demo.data import DEMO_DATA_DIR

    import hashlib

    seen, distinct = set(), []
    for f in sorted(DEMO_DATA_DIR.glob("*.png")):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            distinct.append(f)
    pick = [distinct[i] for i in np.linspace(0, len(distinct) - 1, 12).round().astype(int)]
    folder.mkdir(parents=True)
    memorised = [f"photo number {i}" for i in range(4)]
    shared = ["a picture", "an image"]
    rows = []
    for i, src in enumerate(pick[:4]):
        for j in range(8):
            shutil.copyfile(src, folder / f"m{i}-{j}.png")
            rows.append((f"m{i}-{j}.png", memorised[i]))
    for i, src in enumerate(pick[4:]):
        shutil.copyfile(src, folder / f"s{i}.png")
        rows.append((f"s{i}.png", shared[i % 2]))
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        w.writerows(rows)
    return folder, memorised, shared


def test_triage_ranks_the_captions_a_tiny_model_memorised_first(tmp_path):
    """The one end-to-end proof: a model trained here (the 16 x 16 recipe, about 40 s on a quiet core)
    copies the duplicated images' captions and not the shared ones; triage ranks the copied ones first."""
    from core.demo.trainer import measure_copies, train

    data, memorised, shared = _training_set(tmp_path / "data")
    train(data, tmp_path / "m", steps=600, seed=0, size=16, channels=(16, 32), batch_size=32, grid_steps=10, threads=1)
    copies = {r.caption: r for r in measure_copies(tmp_path / "m", data, per_prompt=8, tau=0.1)}
    # the attack's truth: a clique of at least half the generations, all copies of one training image
    assert all(copies[c].copy_clique >= 4 for c in memorised), {c: copies[c].copy_clique for c in memorised}
    assert all(copies[c].copy_clique < 4 for c in shared), {c: copies[c].copy_clique for c in shared}

    ws = Workspace.init(tmp_path / "ws")
    report = triage.triage(ws, str(tmp_path / "m"), shared + memorised, triage.make_params(ws, sampling_steps=10), device="cpu")
    ranking = [r.prompt for r in triage.ranked(ws, report.run_id)]
    assert set(ranking[:4]) == set(memorised), ranking


def test_a_workspace_from_a_newer_memaudit_is_refused_by_the_triage_commands(tmp_path, capsys, tiny_text2image):
    import sqlite3

    ws = _workspace(tmp_path)
    con = sqlite3.connect(ws / "audit.db")
    con.execute("INSERT INTO migrations(version, name, applied_at) VALUES (999, 'from the future', '2100-01-01')")
    con.commit()
    con.close()
    before = snapshot(ws)
    for argv in (["triage", "--model", tiny_text2image, "--prompts", _prompts(tmp_path)], ["triage-runs"],
                 ["generate", "--model", tiny_text2image, "--prompts-from-triage", 1]):
        code, _, err = run(capsys, argv[0], ws, *argv[1:])
        assert_one_line_error(code, err, "newer memaudit (schema 999")
    assert snapshot(ws) == before
