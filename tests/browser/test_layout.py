"""Every shipped workflow (toy and real-model) in the real frontend: it loads with no missing node type,
no node's box (as the frontend draws it, title bar included) overlaps another's, and every node lies in a
group.  A screenshot of the whole canvas goes to out/browser/layout/<workflow>.png (scripts/make_thumbnails.py
makes the docs' thumbnails from them)."""
import json
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from test_frontend import FIT_VIEW, LOAD_WORKFLOW  # tests/browser is on sys.path (rootdir conftest)

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
SCREENSHOTS = REPO / "out" / "browser" / "layout"

BOXES = """() => ({
  nodes: app.graph.nodes.map((n) => ({id: n.id, type: n.type, box: Array.from(n.boundingRect)})),
  groups: app.graph.groups.map((g) => ({title: g.title, box: Array.from(g._bounding ?? g.bounding)})),
})"""


def overlaps(a: list, b: list) -> bool:
    """Two [x, y, width, height] boxes share area."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def inside(inner: list, outer: list) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_without_overlaps(page, path):
    workflow = json.loads(path.read_text())
    loaded = page.evaluate(LOAD_WORKFLOW, [workflow, path.stem])
    assert loaded["missing"] == [] and loaded["broken"] == [], loaded
    assert loaded["nodes"] == len(workflow["nodes"])
    page.wait_for_timeout(300)  # the frontend sizes nodes (and their DOM widgets) after loading
    drawn = page.evaluate(BOXES)
    nodes = drawn["nodes"]
    overlapping = [f"{a['type']} (node {a['id']}) {a['box']} and {b['type']} (node {b['id']}) {b['box']}"
                   for i, a in enumerate(nodes) for b in nodes[i + 1:] if overlaps(a["box"], b["box"])]
    assert not overlapping, f"{path.name}: overlapping nodes in the frontend:\n" + "\n".join(overlapping)
    outside = [f"{n['type']} (node {n['id']})" for n in nodes if n["type"] not in ("Note", "MarkdownNote")
               and not any(inside(n["box"], g["box"]) for g in drawn["groups"])]
    assert not outside, f"{path.name}: nodes outside every group in the frontend: {outside}"

    page.evaluate(FIT_VIEW)
    page.wait_for_timeout(300)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    screenshot = SCREENSHOTS / f"{path.stem}.png"
    page.screenshot(path=str(screenshot))
    with Image.open(screenshot) as image:
        assert max(ImageStat.Stat(image.convert("L")).stddev) > 5, "blank screenshot"
