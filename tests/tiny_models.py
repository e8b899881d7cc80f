"""Random-weight diffusers pipelines, built from seeded code and saved to a folder.

They are real pipelines (real UNets, schedulers, VAE, CLIP text encoder and
tokenizer), most of them small enough to sample in well under a second on a CPU,
so tests exercise the same loading and sampling code as a real checkpoint;
``build_sd15`` builds Stable Diffusion 1.5's full architecture (or a tiny version
of it) for the GPU check (benchmarks/gpu_check.py). Nothing is
downloaded: the CLIP tokenizer's ``vocab.json`` and ``merges.txt`` are written
here (the 256 byte symbols, each also with the ``</w>`` word-end marker, plus
the two special tokens; no merges, so every word is spelled letter by letter).

Each builder seeds torch before creating weights, so two builds with the same
arguments give byte-identical weight files.
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_MAX_LENGTH = 16


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def build_unconditional(path: str | Path, *, size: int = 16, scheduler: str = "ddim", seed: int = 0) -> Path:
    """Save a tiny unconditional DDIMPipeline (or DDPMPipeline with ``scheduler="ddpm"``) to ``path``.

    UNet2DModel with channels 8/16, one layer a block: about 25k parameters; images are ``size`` x ``size`` RGB.
    """
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    _seeded(seed)
    unet = UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    if scheduler == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100))
    elif scheduler == "ddpm":
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    else:
        raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {scheduler!r}")
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: one printable symbol for each of the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def write_tokenizer_files(folder: str | Path) -> tuple[Path, Path]:
    """Write a complete byte-level CLIP vocabulary (514 tokens) and an empty merge list."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab_file, merges_file


def build_text2image(path: str | Path, *, seed: int = 0, inpainting: bool = False) -> Path:
    """Save a tiny StableDiffusionPipeline (16 x 16 images, no safety checker) to ``path``;
    with ``inpainting`` a StableDiffusionInpaintPipeline (UNet input: latents, mask, masked-image latents).

    UNet2DConditionModel with channels 8/16 and cross-attention width 16 on 8 x 8 x 4 latents,
    AutoencoderKL with channels 8/16 (scale factor 2), a 2-layer CLIP text encoder of width 16.
    """
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    _seeded(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9 if inpainting else 4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_tokenizer_files(tmp)
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=TOKENIZER_MAX_LENGTH)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(
        num_train_timesteps=100, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = (StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline)(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path


CLASS_NAMES = {0: "tabby cat, tabby", 1: "golden retriever", 2: "red fox"}


def build_class_conditional(path: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny DiTPipeline (class-conditional, 16 x 16 images) to ``path``.

    DiTTransformer2DModel with one layer of width 16 on 8 x 8 x 4 latents (patch 2), the same
    tiny AutoencoderKL as ``build_text2image``. DiTPipeline's guidance uses class 1000 as the
    null class, so the model has 1000 classes (plus the null one) like ImageNet DiT; three of
    them are named in ``id2label``, written into model_index.json where DiT checkpoints keep it.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    _seeded(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=100, steps_offset=1))
    path = Path(path)
    pipe.save_pretrained(path)
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text(encoding="utf-8"))
    index["id2label"] = {str(k): v for k, v in CLASS_NAMES.items()}
    index_file.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return path


# ------------------------------------------------------------------ Stable Diffusion 1.5's architecture
# The published component configs of Stable Diffusion 1.5 (its unet/, vae/ and text_encoder/
# config.json, the text encoder being CLIP ViT-L/14's), written out so that a pipeline of that
# size can be built with random weights and no download. ``SD15_TINY`` keeps every block type,
# block count and the scheduler, and shrinks the widths, depths and image size.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8, "act_fn": "silu",
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1,
}
SD15_VAE = {
    "sample_size": 512, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "act_fn": "silu",
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768,
}
SD15_SCHEDULER = {  # PNDM, as Stable Diffusion 1.5 ships it
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1
}
SD15_TINY = {  # overrides: 64 x 64 images (8 x 8 latents), widths 32/64, one layer a block
    "unet": {"sample_size": 8, "layers_per_block": 1, "block_out_channels": (32, 32, 64, 64),
             "cross_attention_dim": 32, "attention_head_dim": 2},
    "vae": {"sample_size": 64, "layers_per_block": 1, "block_out_channels": (32, 32, 32, 32)},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "projection_dim": 32},
}


def build_sd15(path: str | Path, *, tiny: bool = False, seed: int = 0, device: str = "cpu",
               dtype: str = "float32") -> Path:
    """Save a StableDiffusionPipeline with Stable Diffusion 1.5's architecture and random weights to ``path``.

    Full size: 512 x 512 images, an 860M-parameter UNet, the 84M-parameter VAE and the 123M-parameter
    CLIP text encoder; ``tiny``: the same blocks at 64 x 64 with small widths (``SD15_TINY``). The
    weights are drawn on ``device`` (a GPU draws 1B parameters in a second, a CPU takes much longer)
    and saved in ``dtype``. The tokenizer is the byte-level one of ``write_tokenizer_files`` with
    SD's 77-token context; it spells words letter by letter, which changes no tensor shape.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    over = SD15_TINY if tiny else {"unet": {}, "vae": {}, "text": {}}
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_tokenizer_files(tmp)
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=SD15_TEXT["max_position_embeddings"])
    text = {**SD15_TEXT, **over["text"]}
    if tiny:
        text["vocab_size"] = len(tokenizer)
    _seeded(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**{**SD15_UNET, **over["unet"]})
        vae = AutoencoderKL(**{**SD15_VAE, **over["vae"]})
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if dtype != "float32":
        pipe.to(getattr(torch, dtype))
    path = Path(path)
    pipe.save_pretrained(path)
    return path
