"""Tiny random-weight diffusers pipelines, built from seeded code and saved to a folder.

They are real pipelines (real UNets, schedulers, VAE, CLIP text encoder and
tokenizer) small enough to sample in well under a second on a CPU, so tests
exercise the same loading and sampling code as a real checkpoint. Nothing is
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
