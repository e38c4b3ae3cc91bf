"""Test set-up: the real ComfyUI (``make comfyui`` or ``COMFYUI_DIR``) booted in-process on the CPU.

The repository root is *appended* to ``sys.path`` (for ``harness`` and the pure packages), so that
ComfyUI's own top-level ``nodes`` module, inserted first by ``harness.comfy_host.boot``, wins over
this pack's ``nodes/`` folder.  Pack modules are imported as ``guidance_kit.*`` (the pack is linked
into ComfyUI's ``custom_nodes/`` under that name).
"""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from harness import comfy_host, tiny_models  # noqa: E402

COMFY_DIR = comfy_host.boot()  # before test modules are collected: they import comfy.*


@pytest.fixture(scope="session")
def comfy_dir():
    return COMFY_DIR


@pytest.fixture(scope="session", params=tiny_models.FAMILIES)
def tiny(request, comfy_dir):
    """One tiny random-weight model per family (eps, adm, v-prediction, flow DiT)."""
    return tiny_models.build(request.param)


@pytest.fixture(scope="session")
def tiny_eps(comfy_dir):
    return tiny_models.build("sd15_eps")
