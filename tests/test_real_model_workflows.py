"""The real-model workflows (workflows/<family>_<technique>.json: SD1.5, SDXL, SD3.5, Flux) run end to end
through the real server, queued over HTTP as the frontend sends them, on tiny random-weight files written
at test time under the standard names into the server's own models folder (``harness.tiny_models``:
``write_model_files``; what stands in for what, and why, is documented there): the stock loaders detect each
file as its family, the technique runs, an image is saved and Run Stats reports the technique.

Overridden in the test only (the shipped files keep the model cards' settings): 64x64 images (8x8 latents),
2 sampling steps, one calibration/training prompt, 2 training steps on 16 rows, the text encoders
(``GuidanceKitTestTinyTextEncoder``), Flux's diffusion model (``GuidanceKitTestTinyFlux``) and CLIP vision
(``GuidanceKitTestTinyClipVision``).  Calibration and training files (LinearAG, Adaptive Guidance (learned),
DeeDiff, PPAP) are written under ``test_server_`` names and removed.  A training workflow
(``<family>_<technique>_train.json``: PPAP's experts) runs first, in the test of the workflow that reads its file,
which then reads the file written under the test's name.
"""
import copy
import json
import re
from pathlib import Path

import pytest

from harness import tiny_models
from harness.comfy_host import comfyui_dir
from harness.workflow_api import _widget_names, ui_to_api

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted(path for path in (REPO / "workflows").glob("*.json") if not path.stem.startswith("toy_"))
TRAINING = {path.stem.removesuffix("_train"): path for path in WORKFLOWS if path.stem.endswith("_train")}
REAL = [path for path in WORKFLOWS if not path.stem.endswith("_train")]
FAMILIES = {"sd15", "sdxl", "sd35", "flux"}
TEST_OVERRIDES = {"steps": 2, "sample_steps": 2, "train_steps": 2, "training_rows": 16, "width": 64, "height": 64,
                  "batch_size": 1, "prompts": "a red fox", "images": 2, "steps_per_expert": 2}
WRITTEN_FOLDERS = ("linear_ag", "learned_ag", "deediff", "ppap")  # where calibration/training nodes write
TEXT_ENCODER_LOADERS = {"DualCLIPLoader", "TripleCLIPLoader", "CLIPLoader"}
TECHNIQUE_LABELS = {"adaptive_guidance": "AG", "learned_ag": "Learned AG", "composable": "Composable",
                    "linear_ag": "LinearAG", "lina": "LINA", "lina_schedule": "CFG", "autoguidance": "ATG",
                    "gfcg": "GFCG", "deediff": "DeeDiff", "ppap": "PPAP"}
SUMMARY = re.compile(r"^([\w+ ]+?): \d+ steps")
# What Run Stats must report when the technique acted at all on the tiny run (where that is certain at 2 steps):
# LINA's ablated-prompt row comes on top of CFG's two in its window (the first step).
ACTED = {"lina": "more than CFG's"}


def family_of(path: Path) -> str:
    return path.stem.split("_")[0]


def widget_index(node: dict, object_info: dict, name: str) -> int | None:
    """The index of widget ``name`` in a UI-format node's widgets_values (seeds' control values counted)."""
    index = 0
    for widget, control in _widget_names(object_info[node["type"]]):
        if widget == name:
            return index
        index += 1 + control
    return None


def set_widget(node: dict, object_info: dict, name: str, value) -> bool:
    """Set widget ``name`` of a UI-format node."""
    index = widget_index(node, object_info, name)
    if index is not None:
        node["widgets_values"][index] = value
    return index is not None


def as_tested(workflow: dict, family: str, object_info: dict, written_prefix: str) -> dict:
    """The workflow as the test runs it: tiny sizes and steps, the substitute text encoder (and Flux model, CLIP
    vision), files written under ``written_prefix``."""
    changed = copy.deepcopy(workflow)
    encoder_id = max(node["id"] for node in changed["nodes"]) + 1
    changed["nodes"] = [node for node in changed["nodes"] if node["type"] not in TEXT_ENCODER_LOADERS]
    changed["nodes"].append({"id": encoder_id, "type": "GuidanceKitTestTinyTextEncoder", "mode": 0, "inputs": [],
                             "outputs": [{"name": "CLIP", "type": "CLIP", "links": []}],
                             "widgets_values": [family]})
    for link in changed["links"]:
        if link[5] == "CLIP":
            link[1], link[2] = encoder_id, 0
    for node in changed["nodes"]:
        if node["type"] == "UNETLoader":
            node.update(type="GuidanceKitTestTinyFlux", widgets_values=[])
        if node["type"] == "CLIPVisionLoader":
            node.update(type="GuidanceKitTestTinyClipVision", widgets_values=[family])
        if node["type"] in object_info:
            for name, value in TEST_OVERRIDES.items():
                set_widget(node, object_info, name, value)
            set_widget(node, object_info, "filename", written_prefix)
    return changed


def with_trained_file(workflow: dict, training: Path, comfy_server, object_info: dict, written_prefix: str) -> dict:
    """Runs the training workflow ``training`` (its file written as ``written_prefix``) and returns ``workflow``
    reading that file where it read the shipped name (the training node's ``filename`` + ``.safetensors``)."""
    trainer = json.loads(training.read_text())
    comfy_server.run(ui_to_api(as_tested(trainer, family_of(training), object_info, written_prefix), object_info),
                     timeout=300)
    shipped = {f"{node['widgets_values'][index]}.safetensors" for node in trainer["nodes"]
               if node["type"] in object_info and (index := widget_index(node, object_info, "filename")) is not None}
    changed = copy.deepcopy(workflow)
    replaced = 0
    for node in changed["nodes"]:
        values = node.get("widgets_values") or []
        for index, value in enumerate(values):
            if value in shipped:
                values[index] = f"{written_prefix}.safetensors"
                replaced += 1
    assert replaced, f"{training.name} writes {sorted(shipped)}, which no node of the workflow reads"
    return changed


@pytest.fixture(scope="module")
def model_files(comfy_server):
    written = [path for family in sorted(FAMILIES) for path in tiny_models.write_model_files(family,
                                                                                          comfy_server.models_dir)]
    yield written
    for path in written:
        path.unlink(missing_ok=True)


def test_every_family_is_covered():
    assert {family_of(path) for path in REAL} == FAMILIES


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_model_workflow_runs_on_tiny_files(comfy_server, model_files, path):
    object_info = comfy_server.get("/object_info")
    workflow = json.loads(path.read_text())
    missing = {node["type"] for node in workflow["nodes"] if node["type"] not in ("Note", "MarkdownNote")} - \
        object_info.keys()
    assert not missing, f"{path.name} uses unregistered nodes {sorted(missing)}"
    family = family_of(path)
    written_prefix = f"test_server_{path.stem}"
    try:
        if path.stem in TRAINING:
            workflow = with_trained_file(workflow, TRAINING[path.stem], comfy_server, object_info, written_prefix)
        entry = comfy_server.run(ui_to_api(as_tested(workflow, family, object_info, written_prefix), object_info),
                                 timeout=300)
    finally:
        for folder in WRITTEN_FOLDERS:
            for written in (comfyui_dir() / "models" / folder).rglob(f"{written_prefix}*"):
                written.unlink()
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])
              if image.get("type") == "output"]
    assert images, f"{path.name} saved no image"
    summaries = [" ".join(output["text"]) for output in entry["outputs"].values() if "text" in output]
    technique = TECHNIQUE_LABELS[path.stem.removeprefix(family + "_")]
    assert summaries and all(SUMMARY.match(text) for text in summaries), summaries
    assert any(SUMMARY.match(text).group(1) == technique for text in summaries), (technique, summaries)
    evidence = ACTED.get(path.stem.removeprefix(family + "_"))
    assert evidence is None or any(evidence in text for text in summaries), (evidence, summaries)
