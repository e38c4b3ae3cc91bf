"""Every technique as a user runs it: the saved workflows of tests/workflows/ (UI format, as the frontend
saves them) queued over HTTP on the real server (``comfy_server``, ``harness.workflow_api.ui_to_api``),
with their result checked, not just that an image came out.

* ``stacked_*.json``: a technique's MODEL patch stacked with another pack patch through KSampler (or under
  the Reference CFG guider), on the toy world at batch 2 and a few steps.  Whether every technique acted is
  checked by ablation, as a user would check it: the workflow again with one pack patch bypassed (mode 4,
  Ctrl+B; ``ui_to_api`` hands its MODEL input on, as the frontend does) must change one of the saved images
  by a mean of at least ``MIN_MEAN_CHANGE`` levels of 255 (one: AG and GFCG act per sample, and may leave a
  sample all but untouched).  A technique the stack silently drops leaves every image of the graph without
  it bit for bit (Autoguidance -> GFCG gave GFCG alone, GFCG -> Autoguidance gave
  Autoguidance alone); a patch that breaks the patches after it fails the run (PPAP's hook, deep-copied by
  every later clone).  The Reference CFG guider must give exactly CFGGuider's images (it is plain CFG plus
  statistics), which also shows that two runs of one graph agree bit for bit, as the ablation assumes.
  Every Run Stats node must report the run (its UI text in /history, the summary the server also sends as
  the ``guidance_kit.run_summary`` event); the summary names the techniques stacked under the last patch
  ("also acting: ..."), but only those that record their steps, so the ablation is the proof.
* ``train_*.json``: a training node (DeeDiff Train Heads, PPAP Train Experts, LinearAG Calibrate) on tiny
  settings, sampling with its output where it has one (PPAP's is a file name: a STRING cannot feed the PPAP
  node's experts list, which the server checks before the file exists), and a muted group (Ctrl+M) that loads
  the written file and samples with it.  Queued as saved, then with every node unmuted (as a user does after
  training): the file exists in the server's models folder, loads, the sampling with it ran (image and Run
  Stats summary of the technique), and gives the in-memory result's images bit for bit.  The files
  (``test_server_*``) are removed afterwards.

About 15 s of runs (27 prompts) on 2 shared CPU cores, plus the server start (~12 s) when no other test
started it: 25 to 45 s for the module on this box.
"""
import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.comfy_host import comfyui_dir
from harness.workflow_api import BYPASSED, MUTED, ui_to_api

WORKFLOWS = Path(__file__).resolve().parent / "workflows"
STACKED = sorted(WORKFLOWS.glob("stacked_*.json"))
TRAINING = sorted(WORKFLOWS.glob("train_*.json"))
API_PROMPTS = {"tiny_reference_cfg.json"}  # test_server.py's API prompt, not a saved workflow
MIN_MEAN_CHANGE = 1.0  # levels of 255; the techniques here change their most-changed image by 3.6 to 71
RUN_STATS = "GuidanceKitRunStats"
REFERENCE_GUIDER = "GuidanceKitReferenceCFGGuider"
AUTOGUIDANCE, GFCG, PPAP = "GuidanceKitAutoguidance", "GuidanceKitGFCG", "GuidanceKitPPAP"
TECHNIQUE_NODES = {
    "Adaptive Guidance": {"GuidanceKitAdaptiveGuidance"},
    "LinearAG": {"GuidanceKitLinearAG", "GuidanceKitLinearAGLoad"},
    "Composable": {"GuidanceKitComposableModelPatch", "GuidanceKitComposableConcept", "GuidanceKitComposablePrompt"},
    "GFCG": {GFCG},
    "Autoguidance": {AUTOGUIDANCE},
    "PPAP": {PPAP},
    "DeeDiff": {"GuidanceKitDeeDiff", "GuidanceKitDeeDiffLoad"},
    "Reference CFG": {REFERENCE_GUIDER},
    "Run Stats": {RUN_STATS},
}
# training node -> (its folder under the server's models/, the technique's label in run summaries)
TRAINERS = {"GuidanceKitDeeDiffTrain": ("deediff", "DeeDiff"), "GuidanceKitPPAPTrainExperts": ("ppap", "PPAP"),
            "GuidanceKitLinearAGCalibrate": ("linear_ag", "LinearAG")}
SUMMARY = re.compile(r"^[\w+]+: \d+ steps")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def node_types(workflow: dict) -> set[str]:
    return {node["type"] for node in workflow["nodes"]}


def model_links(workflow: dict) -> set[tuple[str, str]]:
    """(source type, target type) of every MODEL link."""
    types = {node["id"]: node["type"] for node in workflow["nodes"]}
    return {(types[link[1]], types[link[3]]) for link in workflow["links"] if link[5] == "MODEL"}


def variant(workflow: dict, node_id: int, **changes) -> dict:
    """``workflow`` with ``changes`` to one node and its Run Stats nodes muted (they may report on that node)."""
    changed = copy.deepcopy(workflow)
    for node in changed["nodes"]:
        if node["id"] == node_id:
            node.update(changes)
        elif node["type"] == RUN_STATS:
            node["mode"] = MUTED
    return changed


def unmuted(workflow: dict) -> dict:
    changed = copy.deepcopy(workflow)
    for node in changed["nodes"]:
        node["mode"] = 0
    return changed


def label(node: dict, object_info: dict) -> str:
    return f"{node.get('title') or object_info[node['type']]['display_name']} (node {node['id']})"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def queue(comfy_server, workflow: dict, object_info: dict) -> dict:
    return comfy_server.run(ui_to_api(workflow, object_info), timeout=180)


def saved_images(comfy_server, entry: dict) -> dict[str, np.ndarray]:
    """{SaveImage node id: its images [N, H, W, C] as ints} of a finished prompt."""
    found = {}
    for node_id, output in entry["outputs"].items():
        files = [image for image in output.get("images", []) if image.get("type") == "output"]
        if files:
            found[node_id] = np.stack([np.asarray(Image.open(comfy_server.output_dir / image["subfolder"] /
                                                             image["filename"])).astype(int) for image in files])
    return found


def summaries(entry: dict) -> dict[str, str]:
    """{Run Stats node id: its summary} of a finished prompt."""
    return {node_id: " ".join(output["text"]) for node_id, output in entry["outputs"].items() if "text" in output}


def largest_change(images: dict[str, np.ndarray], others: dict[str, np.ndarray]) -> float:
    """The largest mean absolute difference of one image between two runs' saved images."""
    assert images.keys() == others.keys(), (images.keys(), others.keys())
    return max(float(np.abs(images[k] - others[k]).mean(axis=(1, 2, 3)).max()) for k in images)


# ---------------------------------------------------------------- the workflow set

def test_tests_workflows_holds_only_stacked_and_training_workflows():
    others = {path.name for path in WORKFLOWS.glob("*.json")} - {path.name for path in STACKED + TRAINING}
    assert others == API_PROMPTS, f"tests/workflows/ files this module does not run: {sorted(others - API_PROMPTS)}"
    for path in STACKED + TRAINING:
        workflow = load(path)
        assert workflow.get("version") == 0.4 and isinstance(workflow.get("links"), list), path.name
        assert "GuidanceKitToyWorldLoader" in node_types(workflow), f"{path.name} does not run on the toy model"


def test_stacked_workflows_cover_every_technique_and_the_regression_orders():
    workflows = [load(path) for path in STACKED]
    used = set().union(*map(node_types, workflows))
    missing = [technique for technique, nodes in TECHNIQUE_NODES.items() if not nodes <= used]
    assert not missing, f"no stacked workflow uses {missing}"
    links = set().union(*map(model_links, workflows))
    assert (AUTOGUIDANCE, GFCG) in links and (GFCG, AUTOGUIDANCE) in links, "both Autoguidance/GFCG orders"
    assert any(source == PPAP and target.startswith("GuidanceKit") for source, target in links), \
        "a stacked workflow with a pack node after PPAP"


def test_training_workflows_cover_every_training_node():
    used = set().union(*(node_types(load(path)) for path in TRAINING))
    assert set(TRAINERS) <= used, f"no training workflow uses {sorted(set(TRAINERS) - used)}"


# ---------------------------------------------------------------- stacked: every technique acts

@pytest.mark.parametrize("path", STACKED, ids=lambda p: p.stem)
def test_every_technique_of_a_stacked_workflow_acts(comfy_server, object_info, path):
    workflow = load(path)
    entry = queue(comfy_server, workflow, object_info)
    images = saved_images(comfy_server, entry)
    assert images, f"{path.name} saved no image"
    reports = summaries(entry)
    stats_nodes = {str(node["id"]) for node in workflow["nodes"] if node["type"] == RUN_STATS}
    assert stats_nodes and reports.keys() == stats_nodes, f"{path.name}: Run Stats reported {reports}"
    assert all(SUMMARY.match(text) for text in reports.values()), reports
    dropped = []
    patches = {name for name, definition in object_info.items()
               if name.startswith("GuidanceKit") and definition["output"] == ["MODEL"]}
    for node in workflow["nodes"]:
        if node["type"] in patches:
            without = saved_images(comfy_server, queue(comfy_server, variant(workflow, node["id"], mode=BYPASSED),
                                                       object_info))
            change = largest_change(images, without)
            if change < MIN_MEAN_CHANGE:
                dropped.append(f"{label(node, object_info)}: bypassing it changes no image by more than "
                               f"{change:.3f} levels")
        elif node["type"] == REFERENCE_GUIDER:
            plain = saved_images(comfy_server, queue(comfy_server, variant(workflow, node["id"], type="CFGGuider"),
                                                     object_info))
            if images.keys() != plain.keys() or any(not np.array_equal(images[k], plain[k]) for k in images):
                dropped.append(f"{label(node, object_info)}: its images differ from CFGGuider's")
    assert not dropped, f"{path.name}: not every technique acted ({reports}):\n" + "\n".join(dropped)


# ---------------------------------------------------------------- training: file written, loaded, sampled

def remove_written(folder: Path, name: str) -> None:
    for path in folder.rglob(name) if folder.is_dir() else ():
        path.unlink()


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.stem)
def test_training_workflow_writes_a_file_that_loads_and_samples(comfy_server, object_info, path):
    workflow = load(path)
    (trainer,) = [node for node in workflow["nodes"] if node["type"] in TRAINERS]
    subfolder, technique = TRAINERS[trainer["type"]]
    folder = comfyui_dir() / "models" / subfolder
    name = trainer["widgets_values"][-1] + ".safetensors"
    assert name.startswith("test_server_"), f"{path.name}: write a file name unique to the tests, got {name}"
    muted = {str(node["id"]) for node in workflow["nodes"] if node.get("mode") == MUTED}
    assert any(node["type"] == "SaveImage" and str(node["id"]) in muted for node in workflow["nodes"]), \
        f"{path.name}: no muted group samples with the written file"
    remove_written(folder, name)
    try:
        trained = queue(comfy_server, workflow, object_info)
        assert (folder / name).is_file(), f"{path.name}: {trainer['type']} wrote no {folder / name}"
        entry = queue(comfy_server, unmuted(workflow), object_info)
    finally:
        remove_written(folder, name)
    reports = {**summaries(trained), **summaries(entry)}
    assert all(text.startswith(f"{technique}: ") and SUMMARY.match(text) for text in reports.values()), reports
    from_file = {node_id: pixels for node_id, pixels in saved_images(comfy_server, entry).items() if node_id in muted}
    assert from_file, f"{path.name}: sampling with the loaded {name} saved no image"
    assert muted & reports.keys(), f"{path.name}: no Run Stats report of the sampling with the loaded file"
    in_memory = saved_images(comfy_server, trained)
    if in_memory:
        assert summaries(trained), f"{path.name}: no Run Stats report of the sampling with the node's output"
        assert len(in_memory) == len(from_file) == 1, (in_memory.keys(), from_file.keys())
        (first,), (second,) = in_memory.values(), from_file.values()
        assert np.array_equal(first, second), f"{path.name}: the loaded {name} samples otherwise than the node's output"
