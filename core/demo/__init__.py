"""The embedded demo: a toy diffusion model that memorises, its data, and the runner of ``memaudit demo``.

- ``model``: ``CaptionConditionedPipeline``, memaudit's own diffusers pipeline (saved model
  folders name it in ``model_index.json``; ``core.generate`` loads them through it);
- ``trainer``: the toy model's training loop (``python -m core.demo.trainer``), also used for
  LiRA's shadow models; not to be confused with ``core.training``, the ingestion of a
  workspace's training set;
- ``data``: the shipped demo training set and its builder (``python -m core.demo.data``);
- ``digits``: the membership demo's digits data, model and shadows (``python -m core.demo.digits``);
- ``runner``: ``memaudit demo``, the complete audit of the shipped model.

Importing this package is cheap: the submodules load torch and diffusers where they need them.
"""
