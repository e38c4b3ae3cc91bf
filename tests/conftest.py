"""Test set-up: the real ComfyUI (``make comfyui`` or ``COMFYUI_DIR``) booted in-process on the CPU.

The repository root is *appended* to ``sys.path`` (for ``harness`` and the pure packages), so that
ComfyUI's own top-level ``nodes`` module, inserted first by ``harness.comfy_host.boot``, wins over
this pack's ``nodes/`` folder.  Pack modules are imported as ``guidance_kit.*`` (the pack is linked
into ComfyUI's ``custom_nodes/`` under that name).
"""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from harness import comfy_host, tiny_models  # noqa: E402
from harness.server import ComfyServer  # noqa: E402

COMFY_DIR = comfy_host.boot()  # before test modules are collected: they import comfy.*
TEST_NODES = REPO / "tests" / "comfy_test_nodes"
# A first visit without the template browser, the "Nodes 2.0" banner and the minimap over the graph,
# and with node text drawn at any zoom (browser screenshots fit the whole workflow).
FRESH_USER_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                       "LiteGraph.Canvas.MinFontSizeForLOD": 0}


def pytest_collection_modifyitems(items):
    """Tests on the real server carry the ``server`` marker (``make test-fast`` leaves them out)."""
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def comfy_server():
    """One real ComfyUI server (main.py --cpu on a free loopback port) for every server and browser test,
    with the pack and the test-only nodes of tests/comfy_test_nodes/."""
    server = ComfyServer(extra_custom_nodes=[TEST_NODES])
    settings = server.workdir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(FRESH_USER_SETTINGS))
    with server as running:
        yield running


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
