"""Shared fixtures: tiny models built once per session and saved in the real layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("shared/data (beside the checkout) is not present")
    return SHARED


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> str:
    from reneg.tiny import build_tiny_pipeline

    return build_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "pipeline"), seed=0)


@pytest.fixture(scope="session")
def tiny_pixart_dir(tmp_path_factory) -> str:
    from reneg.tiny import build_tiny_pixart

    return build_tiny_pixart(str(tmp_path_factory.mktemp("tiny") / "pixart"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_image_dir(tmp_path_factory) -> str:
    from reneg.tiny import build_tiny_qwen_image

    return build_tiny_qwen_image(str(tmp_path_factory.mktemp("tiny") / "qwen-image"), seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    from reneg.tiny import build_tiny_sdxl

    return build_tiny_sdxl(str(tmp_path_factory.mktemp("tiny") / "sdxl"), seed=0)


@pytest.fixture(scope="session")
def tiny_hps_ckpt(tmp_path_factory) -> str:
    from reneg.tiny import build_tiny_hps

    return build_tiny_hps(str(tmp_path_factory.mktemp("tiny") / "hps"), seed=0)


@pytest.fixture(scope="session")
def tiny_backend(tiny_pipeline_dir):
    from reneg.backends.loading import load_diffusers

    return load_diffusers(tiny_pipeline_dir)


@pytest.fixture(scope="session")
def tiny_reward(tiny_hps_ckpt):
    from reneg.rewards import load_rewards

    return load_rewards([f"hpsv2={tiny_hps_ckpt}"])


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the command line's --threads auto follows the machine's load; tests that call it (in this process
    # or in children, which inherit this) run on a fixed thread count so that their results repeat
    os.environ.setdefault("RENEG_THREADS", "1")


def pytest_sessionstart(session):
    # Tiny models are dominated by per-op overhead: one thread is as fast, and it keeps
    # the suite from collapsing when the 2 cores are shared (CI, subprocess tests).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """CLI entry points called in-process (``--demo`` picks 2 threads) must not change later tests."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> str:
    from reneg.tiny import build_tiny_flux

    return build_tiny_flux(str(tmp_path_factory.mktemp("tiny") / "flux-dev"), seed=0)
