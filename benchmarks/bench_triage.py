"""Triage against the generation it replaces: seconds per prompt, as a ratio in one run, and how well
the score separates the demo's memorised captions from the others.

1. Demo model (``assets/demo/model``, 32 x 32 pixels, CPU): ``core.triage.score_batch`` on every
   demo caption (noise-norm, the first step, 4 samples, as ``memaudit demo`` runs it) against
   ``core.generate.sample`` of one batch of B images at the demo's 20 steps. The generation a
   triage score replaces is 500 samples of one prompt: ``500 / B`` batches, each timed here
   (sampling is linear in the number of batches). Interleaved rounds, medians; wall and CPU seconds.
2. A Stable Diffusion-sized pipeline with random weights (CPU, at a small size): the SD 1.x UNet
   (channels 320/640/1280/1280, two layers a block, cross-attention width 768), its CLIP text
   encoder (12 layers of width 768) and VAE (channels 128/256/512/512), at 64 x 64 pixels
   (8 x 8 latents); ``--smoke``: the tiny test pipeline. Triage of one prompt (text encoding,
   one guided UNet call on 2 x 4 latents) against the 500-sample generation at 50 steps, built
   from its measured parts: ``ceil(500 / B) x (50 x one guided UNet call on 2B latents + a VAE
   decode of B latents)``, text encoding once. Random weights cost what trained ones cost.
3. Detection on the demo: the score against the truth of the demo's training set (a caption is
   memorised when its image is present 10 or 100 times: exactly the captions the demo's audit
   extracts), as AUC and TPR at 1% FPR (``core.calibrate``), for each method and for 1 to 3 steps.

What a GPU run would measure: the same ratios with the pipeline in float16 at 512 x 512
(64 x 64 latents), where the UNet dominates both sides even more.

    python -m benchmarks.bench_triage [--smoke]
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from typing import Any, Callable

from benchmarks.common import cli, print_table, write_json

TARGET = 500  # samples per prompt in the generate-and-filter attack


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _rounds(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall, cpu) seconds of each variant over interleaved rounds, after one untimed call each."""
    for fn in variants.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            w, c = _timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in variants}


def _demo(smoke: bool) -> tuple[list[dict], dict]:
    from core import triage
    from core.demo.data import DEMO_MODEL_DIR, DEMO_PROMPTS, DEMO_STEPS
    from core.generate import load_pipeline, read_prompts, sample

    loaded = load_pipeline(str(DEMO_MODEL_DIR), "cpu")
    captions = read_prompts(DEMO_PROMPTS)
    if smoke:
        captions = captions[:4]
    params = triage.make_params(steps=1, samples=4, seed=0, guidance=1.0, sampling_steps=DEMO_STEPS)
    scorer = triage.scorer_for(loaded)
    sched = triage.trajectory_scheduler(loaded.pipeline.scheduler, params.sampling_steps, "cpu")
    batch = 8 if smoke else 64
    steps = 2 if smoke else DEMO_STEPS
    conditions = [(captions[0], None)] * batch
    seeds = list(range(batch))
    med = _rounds({
        "triage": lambda: triage.score_batch(scorer, sched, captions, params),
        "generate": lambda: sample(loaded, conditions, seeds, steps=steps, guidance=None),
    }, rounds=1 if smoke else 3)
    tri_w, tri_c = med["triage"][0] / len(captions), med["triage"][1] / len(captions)
    gen_w, gen_c = (med["generate"][0] * TARGET / batch, med["generate"][1] * TARGET / batch)
    rows = [
        {"model": "demo (32 px, CPU)", "variant": f"triage: noise-norm, 1 step, 4 samples ({len(captions)} prompts in one call)",
         "s_per_prompt": tri_w, "cpu_s_per_prompt": tri_c, "ratio": 1.0, "cpu_ratio": 1.0},
        {"model": "demo (32 px, CPU)", "variant": f"generate {TARGET} samples x {steps} steps ({TARGET}/{batch} batches of {batch})",
         "s_per_prompt": gen_w, "cpu_s_per_prompt": gen_c, "ratio": gen_w / tri_w, "cpu_ratio": gen_c / tri_c},
    ]
    return rows, {"captions": len(captions), "batch": batch, "steps": steps, "median_s": med}


def _sd_pipeline(smoke: bool):
    """(pipeline, size): an SD 1.x-sized random-weight StableDiffusionPipeline (the tiny test one with ``smoke``)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_models import write_tokenizer_files

    if smoke:
        from tests.tiny_models import build_text2image

        folder = build_text2image(tempfile.mkdtemp(prefix="bench-triage-") + "/model")
        return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False), 16

    def materialise(module: torch.nn.Module) -> torch.nn.Module:
        # built on the meta device, then filled with small random values: the cost of a forward pass
        # does not depend on the values, and this skips minutes of initialisation
        module = module.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.02, generator=gen)
            for name, b in module.named_buffers():
                if name.endswith("position_ids"):
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
                elif b.is_floating_point():
                    b.zero_()
        return module.eval()

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_tokenizer_files(tmp)
        tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id))
    unet, vae, text = materialise(unet), materialise(vae), materialise(text)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe, 64


def _stable_diffusion(smoke: bool) -> tuple[list[dict], dict]:
    import torch

    from core import triage
    from core.generate import LoadedPipeline

    pipe, size = _sd_pipeline(smoke)
    prompt = "a red fox" if smoke else "a photograph of an astronaut riding a horse"  # within the tokenizer's length
    pipe.set_progress_bar_config(disable=True)
    parameters = sum(p.numel() for p in pipe.unet.parameters())
    loaded = LoadedPipeline(pipeline=pipe, kind="text2image", pipeline_class=type(pipe).__name__, weights_hash="random",
                            scheduler=type(pipe.scheduler).__name__, dtype="float32", device="cpu", ref="random weights",
                            path=None, size=(size, size), call_params=frozenset({"prompt", "guidance_scale", "height", "width"}))
    params = triage.make_params(steps=1, samples=4, seed=0, guidance=7.5, sampling_steps=50)
    scorer = triage.scorer_for(loaded)
    sched = triage.trajectory_scheduler(pipe.scheduler, 50, "cpu")
    batch = 4
    latents = torch.randn(2 * batch, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor,
                          generator=torch.Generator().manual_seed(0))
    cond, uncond = pipe.encode_prompt([prompt] * batch, "cpu", 1, True)
    emb = torch.cat([uncond, cond])

    def unet_call():
        with torch.inference_mode():
            pipe.unet(latents, sched.timesteps[0], encoder_hidden_states=emb)

    def decode():
        with torch.inference_mode():
            pipe.vae.decode(latents[:batch] / pipe.vae.config.scaling_factor)

    def encode():
        with torch.inference_mode():
            pipe.encode_prompt([prompt], "cpu", 1, True)

    med = _rounds({"triage": lambda: triage.score_batch(scorer, sched, [prompt], params),
                   "unet_step": unet_call, "vae_decode": decode, "text": encode}, rounds=1)
    calls = math.ceil(TARGET / batch)
    gen_w = med["text"][0] + calls * (50 * med["unet_step"][0] + med["vae_decode"][0])
    gen_c = med["text"][1] + calls * (50 * med["unet_step"][1] + med["vae_decode"][1])
    tri_w, tri_c = med["triage"]
    name = f"{'tiny test SD' if smoke else 'SD 1.x-sized, random weights'} ({size} px, CPU, UNet {parameters / 1e6:.0f}M)"
    rows = [
        {"model": name, "variant": "triage: noise-norm, 1 step, 4 samples", "s_per_prompt": tri_w, "cpu_s_per_prompt": tri_c,
         "ratio": 1.0, "cpu_ratio": 1.0},
        {"model": name, "variant": f"generate {TARGET} samples x 50 steps, guidance 7.5 ({calls} x (50 UNet calls on 2 x {batch} + VAE decode of {batch}))",
         "s_per_prompt": gen_w, "cpu_s_per_prompt": gen_c, "ratio": gen_w / tri_w, "cpu_ratio": gen_c / tri_c},
    ]
    return rows, {"size": size, "unet_parameters": parameters, "batch": batch, "median_s": med}


def _detection(smoke: bool) -> list[dict]:
    from core import triage
    from core.calibrate import calibrate
    from core.demo.data import DEMO_MODEL_DIR, DEMO_PROMPTS, DEMO_SOURCES, DEMO_STEPS
    from core.generate import load_pipeline, read_prompts

    copies: dict[str, int] = {}
    with open(DEMO_SOURCES, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            copies[row["caption"]] = max(copies.get(row["caption"], 0), int(row["copies"]))
    captions = read_prompts(DEMO_PROMPTS)
    loaded = load_pipeline(str(DEMO_MODEL_DIR), "cpu")
    scorer = triage.scorer_for(loaded)
    truth = [copies[c] >= 10 for c in captions]
    rows = []
    settings = [("noise-norm", 1)] if smoke else [("noise-norm", 1), ("noise-norm", 2), ("noise-norm", 3), ("one-step", 1)]
    for method, steps in settings:
        params = triage.make_params(method=method, steps=steps, samples=4, seed=0, guidance=1.0, sampling_steps=DEMO_STEPS)
        sched = triage.trajectory_scheduler(loaded.pipeline.scheduler, DEMO_STEPS, "cpu")
        scores, _ = triage.score_batch(scorer, sched, captions, params)
        cal = calibrate(scores, truth, metric="triage", higher_is_positive=True)
        ranked = sorted(zip(scores, truth), key=lambda p: -p[0])
        keep = max(i + 1 for i, (_, t) in enumerate(ranked) if t)
        rows.append({"method": method, "steps": steps, "captions": len(captions), "memorised": sum(truth), "auc": cal.auc,
                     "tpr_at_1pct_fpr": cal.tpr_at_1pct_fpr, "top_n_keeping_all": keep})
    return rows


def main(smoke: bool = False) -> dict:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    columns = ["model", "variant", "s_per_prompt", "cpu_s_per_prompt", "ratio", "cpu_ratio"]
    demo_rows, demo_raw = _demo(smoke)
    print_table(demo_rows, columns, title="demo model")
    sd_rows, sd_raw = _stable_diffusion(smoke)
    rows = demo_rows + sd_rows
    print_table(rows, columns,
                title=f"Triage vs the {TARGET}-sample generation it replaces (seconds per prompt; ratio = generation / triage), "
                      f"{torch.get_num_threads()} torch threads")
    quality = _detection(smoke)
    print_table(quality, ["method", "steps", "captions", "memorised", "auc", "tpr_at_1pct_fpr", "top_n_keeping_all"],
                title="Detection on the demo (memorised: captions whose image is in the training set 10 or 100 times)")
    payload = {"rows": rows, "demo": demo_raw, "stable_diffusion": sd_raw, "detection": quality}
    write_json("triage", smoke, payload)
    return payload


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0])
