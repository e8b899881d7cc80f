"""Shared test setup: never touch the network; tiny random-weight pipelines built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before anything imports huggingface_hub: a hub id fails at once instead of retrying for ~46 s.
os.environ["HF_HUB_OFFLINE"] = "1"


def _few_threads() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored after it (modules that train or sample take it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_unconditional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny DDIMPipeline (16 x 16 RGB, unconditional)."""
    from tiny_models import build_unconditional

    _few_threads()
    return build_unconditional(tmp_path_factory.mktemp("tiny-unconditional") / "model")


@pytest.fixture(scope="session")
def tiny_text2image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny StableDiffusionPipeline (16 x 16 RGB, no safety checker)."""
    from tiny_models import build_text2image

    _few_threads()
    return build_text2image(tmp_path_factory.mktemp("tiny-text2image") / "model")


@pytest.fixture(scope="session")
def tiny_class_conditional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny DiTPipeline (16 x 16 RGB, classes 0-999, three of them named)."""
    from tiny_models import build_class_conditional

    _few_threads()
    return build_class_conditional(tmp_path_factory.mktemp("tiny-class") / "model")
