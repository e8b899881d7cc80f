"""memaudit's own diffusers pipelines.

``CaptionConditionedPipeline`` is a small text-to-image pipeline whose "text
encoder" is a lookup table: each training caption has a class id, and the UNet
(``diffusers.UNet2DModel`` with ``num_class_embeds``) is conditioned on that id.
Class id 0 is the empty caption ``""`` (the unconditional class learnt by
caption dropout), so ``""`` generates unconditionally and ``guidance_scale > 1``
applies classifier-free guidance.

The vocabulary is stored in ``model_index.json`` beside the components, so a
saved directory loads with ``CaptionConditionedPipeline.from_pretrained(dir)``
(or through ``core.generate.load_pipeline``, which reads ``_class_name``).

Sampling is DDIM with the UNet predicting the clean sample x0. At each step,
with the guided prediction
``x0 = x0(x_t, null) + g * (x0(x_t, c) - x0(x_t, null))`` (just ``x0(x_t, c)``
when ``g <= 1``), clipped to [-1, 1], the scheduler moves to the previous step.
Image ``i`` of a call starts from noise drawn with ``generator[i]`` alone, so
one image regenerated alone matches the same image generated in a batch.

Importing this module imports torch and diffusers: import it only where a
pipeline is used.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..errors import InputError

UNCONDITIONAL = ""


def build_vocabulary(captions: Sequence[str]) -> list[str]:
    """Caption id table: ``[""] + sorted(set(captions) - {""})``; a caption's id is its position."""
    return [UNCONDITIONAL] + sorted(set(captions) - {UNCONDITIONAL})


def make_scheduler(num_train_timesteps: int = 1000) -> DDIMScheduler:
    """The sampler the demo models are trained for: x0 prediction, cosine betas, trailing spacing.

    With trailing spacing the n-step grid is ``round(T - k * T / n) - 1`` for k = 0..n-1
    (999, 949, ..., 49 for n = 20), so the first step starts from pure noise and every grid
    whose n divides the training grid's is a subset of it.
    """
    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
    )


class CaptionConditionedPipeline(DiffusionPipeline):
    """Generate images from training captions with a class-conditional UNet.

    ``vocabulary[i]`` is the caption of class id ``i``; ``vocabulary[0]`` is ``""``.
    ``default_steps`` is the number of sampling steps whose timestep grid the UNet
    was trained on (used when ``num_inference_steps`` is not given).
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDIMScheduler,
        vocabulary: list[str] | None = None,
        default_steps: int = 20,
    ) -> None:
        super().__init__()
        vocabulary = list(vocabulary) if vocabulary is not None else [UNCONDITIONAL]
        if not vocabulary or vocabulary[0] != UNCONDITIONAL:
            raise ValueError("vocabulary[0] must be the empty caption ''")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("vocabulary has repeated captions")
        classes = unet.config.num_class_embeds
        if classes is not None and classes < len(vocabulary):
            raise ValueError(f"the UNet has {classes} class embeddings but the vocabulary has {len(vocabulary)} captions")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(vocabulary=vocabulary, default_steps=int(default_steps))
        self._ids = {caption: i for i, caption in enumerate(vocabulary)}

    @property
    def vocabulary(self) -> list[str]:
        return list(self.config.vocabulary)

    @property
    def captions(self) -> list[str]:
        """The training captions (the vocabulary without the empty caption)."""
        return list(self.config.vocabulary[1:])

    @property
    def sample_size(self) -> int:
        return int(self.unet.config.sample_size)

    def caption_ids(self, prompts: Sequence[str]) -> list[int]:
        """Class id of each caption; an unknown caption raises InputError naming it."""
        ids = []
        for p in prompts:
            if not isinstance(p, str):
                raise InputError(f"prompts must be strings, got {p!r}")
            if p not in self._ids:
                raise InputError(
                    f"caption {p!r} is not in this model's vocabulary of {len(self._ids) - 1} training captions; "
                    f"use one of them exactly (pipe.captions lists them) or '' for an unconditional image"
                )
            ids.append(self._ids[p])
        return ids

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = UNCONDITIONAL,
        num_inference_steps: int | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per (prompt, copy); returns ``ImagePipelineOutput(images=...)``.

        ``output_type``: "pil" (list of RGB PIL images), "np" (float32 N x H x W x 3 in [0, 1])
        or "pt" (float32 N x 3 x H x W in [0, 1]).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("no prompts given; pass at least one caption")
        if num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        size = self.sample_size
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != size:
                raise InputError(f"{name}={value} is not supported: this model generates {size} x {size} images only")
        steps = self.config.default_steps if num_inference_steps is None else int(num_inference_steps)
        if steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {steps}")
        if output_type not in ("pil", "np", "pt"):
            raise InputError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise InputError(f"got {len(generator)} generators for {len(prompts)} images; pass one per image")

        n = len(prompts)
        device = self._execution_device
        dtype = self.unet.dtype
        labels = torch.tensor(self.caption_ids(prompts), device=device, dtype=torch.long)
        guided = guidance_scale > 1.0
        if guided:
            labels = torch.cat([torch.zeros_like(labels), labels])
        channels = self.unet.config.in_channels
        x = randn_tensor((n, channels, size, size), generator=generator, device=device, dtype=dtype)

        self.scheduler.set_timesteps(steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([x, x]) if guided else x
            pred = self.unet(model_in, t, class_labels=labels).sample
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(pred, t, x, eta=eta, generator=generator).prev_sample

        images = (x.float().clamp(-1, 1) + 1) / 2
        if output_type == "pt":
            out: object = images.cpu()
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            if output_type == "np":
                out = arr
            else:
                out = [Image.fromarray((a * 255 + 0.5).clip(0, 255).astype(np.uint8)) for a in arr]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)
