"""Test set-up: the real ComfyUI (``make comfyui`` or ``COMFYUI_DIR``) booted in-process on the CPU.

The repository root is *appended* to ``sys.path`` (for ``harness`` and the pure packages), so that
ComfyUI's own top-level ``nodes`` module, inserted first by ``harness.comfy_host.boot``, wins over
this pack's ``nodes/`` folder.  Pack modules are imported as ``guidance_kit.*`` (the pack is linked
into ComfyUI's ``custom_nodes/`` under that name).
"""
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from harness import comfy_host, tiny_models  # noqa: E402
from harness.executor import run_node  # noqa: E402
from harness.server import ComfyServer  # noqa: E402

# Property-based tests (hypothesis): a small, derandomised example budget by default (CI); set
# GUIDANCE_KIT_HYPOTHESIS=thorough for 25x the examples (fresh random ones each run).
HYPOTHESIS_COMMON = dict(deadline=None, database=None, print_blob=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("ci", max_examples=8, derandomize=True, **HYPOTHESIS_COMMON)
settings.register_profile("thorough", max_examples=200, **HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get("GUIDANCE_KIT_HYPOTHESIS", "ci"))

COMFY_DIR = comfy_host.boot()  # before test modules are collected: they import comfy.*
import folder_paths  # noqa: E402
import nodes  # noqa: E402  (ComfyUI's own nodes module)

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


@dataclass
class ToyWorld:
    """The embedded toy world as a user's nodes load it: MODEL, CLIP, VAE, the weak model, the shipped classifier
    and DeeDiff heads, a prompt and the empty negative, an AND composition, and a LinearAG calibration of the model
    (3 euler/simple steps at cfg 4: technique_table's STEPS and CFG)."""

    model: object
    clip: object
    vae: object
    weak: object
    classifier: object
    heads: object
    positive: list
    negative: list
    composition: list
    calibration: object

    def encode(self, text: str) -> list:
        return run_node(nodes.CLIPTextEncode, self.clip, text)[0]

    @staticmethod
    def latent(batch: int) -> dict:
        from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent

        return run_node(ToyWorldEmptyLatent, batch)[0]


@pytest.fixture(scope="session")
def toy(comfy_dir):
    """The one toy-world fixture (``ToyWorld``), loaded through the pack's nodes once per session."""
    from guidance_kit.nodes.classifier import TOY_CHOICE, LoadClassifier
    from guidance_kit.nodes.composable import ComposablePrompt
    from guidance_kit.nodes.deediff import DeeDiffLoad
    from guidance_kit.nodes.linear_ag import calibrate
    from guidance_kit.nodes.toyworld import ToyWorldLoader

    model, clip, vae = run_node(ToyWorldLoader, "toy_dit.safetensors")
    positive, negative = (run_node(nodes.CLIPTextEncode, clip, text)[0] for text in ("a red circle on the left", ""))
    calibration = calibrate(model, [positive], negative, ToyWorld.latent(1), seed=0, steps=3, cfg=4.0,
                            sampler_name="euler", scheduler="simple")
    weak = run_node(ToyWorldLoader, "toy_dit_weak.safetensors")[0]
    heads = run_node(DeeDiffLoad, "toy_dit_heads.safetensors")[0]
    classifier = run_node(LoadClassifier, TOY_CHOICE, "auto")[0]
    composition = run_node(ComposablePrompt, clip, "a red circle AND a blue square", 1.0)[0]
    return ToyWorld(model, clip, vae, weak, classifier, heads, positive, negative, composition, calibration)


@pytest.fixture(scope="session", params=tiny_models.FAMILIES)
def tiny(request, comfy_dir):
    """One tiny random-weight model per family (eps, adm, v-prediction, flow DiT)."""
    return tiny_models.build(request.param)


@pytest.fixture(scope="session")
def tiny_eps(comfy_dir):
    return tiny_models.build("sd15_eps")


@pytest.fixture(scope="module")
def sd3(comfy_dir):
    """A tiny random-weight SD3 MMDiT, built afresh for each test module that uses it."""
    return tiny_models.build("sd3_flow")


@pytest.fixture
def deediff_folder(tmp_path, monkeypatch):
    """An empty models/deediff/ folder for one test (where the DeeDiff nodes write and read their bundles)."""
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "deediff", ([str(tmp_path)], {".safetensors"}))
    return tmp_path
