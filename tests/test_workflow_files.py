"""The shipped workflow files themselves (no server): example_workflows/ (the folder ComfyUI serves as the
pack's templates, and the Comfy Registry packs) is a byte-for-byte copy of workflows/ (both written by
scripts/make_workflows.py); every workflow says on its canvas what it shows (a Note), keeps its nodes in
groups per stage without overlaps, enlarges the toy's 32x32 images before showing them, and the real-model
ones use the stock loaders with the standard file names.  The real frontend's boxes: tests/browser/test_layout.py.
"""
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
REAL = [path for path in WORKFLOWS if not path.stem.startswith("toy_")]
TITLE_HEIGHT = 34  # LiteGraph draws the title bar above a node's pos
IMAGE_NODES = {"SaveImage", "PreviewImage"}
STANDARD_FILES = {  # family prefix -> files its loaders must name
    "sd15": {"v1-5-pruned-emaonly.safetensors"},
    "sdxl": {"sd_xl_base_1.0.safetensors"},
    "sd35": {"clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"},
    "flux": {"flux1-dev.safetensors", "ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"},
}
STOCK_LOADERS = {"CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader", "TripleCLIPLoader", "VAELoader"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def box(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node with its title bar."""
    (x, y), (width, height) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + width, y + height


def overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def overlapping_pairs(nodes: list[dict], boxes: dict) -> list[str]:
    return [f"{a['type']} (node {a['id']}) and {b['type']} (node {b['id']})"
            for i, a in enumerate(nodes) for b in nodes[i + 1:] if overlaps(boxes[a["id"]], boxes[b["id"]])]


def test_example_workflows_is_a_copy_of_workflows():
    examples = sorted((REPO / "example_workflows").glob("*.json"))
    assert [p.name for p in examples] == [p.name for p in WORKFLOWS], \
        "example_workflows/ differs from workflows/: run scripts/make_workflows.py"
    changed = [p.name for p in examples if p.read_bytes() != (REPO / "workflows" / p.name).read_bytes()]
    assert not changed, f"example_workflows/ copies differ: {changed}; run scripts/make_workflows.py"


def test_every_family_has_workflows():
    assert {path.stem.split("_")[0] for path in REAL} == set(STANDARD_FILES)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_says_what_it_shows(path):
    notes = [n for n in load(path)["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and len(notes[0]["widgets_values"][0]) > 60, f"{path.name} has no Note saying what it shows"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_node_overlaps_another_and_groups_hold_every_node(path):
    workflow = load(path)
    nodes = workflow["nodes"]
    boxes = {node["id"]: box(node) for node in nodes}
    assert not overlapping_pairs(nodes, boxes), f"{path.name}: overlapping nodes {overlapping_pairs(nodes, boxes)}"
    groups = [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
               g["bounding"][1] + g["bounding"][3]) for g in workflow["groups"]]
    assert len(groups) >= 3, f"{path.name}: fewer than three stage groups"
    outside = [f"{n['type']} (node {n['id']})" for n in nodes if n["type"] not in ("Note", "MarkdownNote")
               and not any(g[0] <= boxes[n["id"]][0] and g[1] <= boxes[n["id"]][1] and boxes[n["id"]][2] <= g[2]
                           and boxes[n["id"]][3] <= g[3] for g in groups)]
    assert not outside, f"{path.name}: nodes outside every group: {outside}"
    assert not any(overlaps(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]), f"{path.name}: groups overlap"


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if p.stem.startswith("toy_")], ids=lambda p: p.stem)
def test_toy_images_are_enlarged_before_they_are_shown(path):
    workflow = load(path)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    unscaled = [f"{nodes[target]['type']} (node {target})" for _, source, _, target, _, _ in workflow["links"]
                if nodes[target]["type"] in IMAGE_NODES and nodes[source]["type"] == "VAEDecode"]
    assert not unscaled, f"{path.name}: 32x32 images shown without ImageScaleBy: {unscaled}"


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_model_workflow_uses_stock_loaders_and_standard_names(path):
    nodes = load(path)["nodes"]
    loaders = [node for node in nodes if node["type"] in STOCK_LOADERS]
    assert loaders and not any(n["type"].startswith("GuidanceKitToyWorld") for n in nodes), path.name
    named = {value for node in loaders for value in node["widgets_values"] if str(value).endswith(".safetensors")}
    missing = STANDARD_FILES[path.stem.split("_")[0]] - named
    assert not missing, f"{path.name} does not load {sorted(missing)}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_a_thumbnail(path):
    """docs/images/workflows/<name>.png (scripts/make_thumbnails.py, from the browser tests' screenshots)."""
    thumbnail = REPO / "docs" / "images" / "workflows" / f"{path.stem}.png"
    assert thumbnail.is_file(), f"no {thumbnail.relative_to(REPO)}: run make test-browser, scripts/make_thumbnails.py"
    assert thumbnail.stat().st_size < 200_000, f"{thumbnail.name} is {thumbnail.stat().st_size} bytes"
