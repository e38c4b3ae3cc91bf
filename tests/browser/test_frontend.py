"""The pack in the real ComfyUI frontend: every toy workflow in workflows/ loads with no missing node, runs
when queued from the page, and the technique nodes (and Run Stats nodes) show their run summary,
which only web/guidance_kit.js puts there.  Screenshots go to out/browser/<workflow>.png."""
import json
from pathlib import Path

import pytest
from PIL import Image, ImageStat

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("toy_*.json"))  # real-model ones: test_layout.py
SCREENSHOTS = REPO / "out" / "browser"
EXTENSION_NAME = "GuidanceKit.RunSummary"
EXTENSION_URL = "/extensions/guidance_kit/guidance_kit.js"
RUN_STATS_NODE = "GuidanceKitRunStats"
RUN_SECONDS = 600

# The test's own record of what the server sent (independent of the extension under test).
WATCH_EXECUTION = """() => {
  if (window.__guidanceKitTest) return;
  const api = window.comfyAPI.api.api;
  const record = window.__guidanceKitTest = {summaries: [], status: null, error: null};
  api.addEventListener("guidance_kit.run_summary", (e) => record.summaries.push(e.detail));
  api.addEventListener("execution_success", () => { record.status = "success"; });
  api.addEventListener("execution_error", (e) => { record.status = "error"; record.error = e.detail; });
  api.addEventListener("execution_interrupted", () => { record.status = "interrupted"; });
}"""

LOAD_WORKFLOW = """async ([workflow, name]) => {
  const definitions = workflow.definitions?.subgraphs ?? [];
  const subgraphIds = new Set(definitions.map((s) => s.id));
  const types = new Set([...workflow.nodes, ...definitions.flatMap((s) => s.nodes ?? [])].map((n) => n.type));
  const missing = [...types].filter((t) => !subgraphIds.has(t) && !(t in LiteGraph.registered_node_types));
  await app.loadGraphData(workflow, true, true, name, {showMissingNodesDialog: false});
  const broken = app.graph.nodes.filter((n) => n.has_errors).map((n) => `${n.id} ${n.type}`);
  return {missing, broken, nodes: app.graph.nodes.length};
}"""

QUEUE = """async () => {
  Object.assign(window.__guidanceKitTest, {summaries: [], status: null, error: null});
  await app.queuePrompt(0, 1);
}"""

SHOWN_SUMMARIES = """(ids) => ids.map((id) => {
  const node = app.graph.getNodeById(id);
  const element = node?.widgets?.find((w) => w.name === "guidance_kit_summary")?.element;
  const box = element?.getBoundingClientRect();
  const style = element && getComputedStyle(element);
  return {id, type: node?.type, property: node?.guidanceKitSummary ?? null, text: element?.textContent ?? null,
          visible: !!element && element.isConnected && box.width > 0 && box.height > 0 &&
                   style.display !== "none" && style.visibility !== "hidden"};
})"""

FIT_VIEW = """() => {
  const rects = app.graph.nodes.map((n) => n.boundingRect);
  const left = Math.min(...rects.map((r) => r[0])), top = Math.min(...rects.map((r) => r[1]));
  const right = Math.max(...rects.map((r) => r[0] + r[2])), bottom = Math.max(...rects.map((r) => r[1] + r[3]));
  app.canvas.ds.fitToBounds([left, top, right - left, bottom - top], {zoom: 0.9});
  app.canvas.setDirty(true, true);
}"""

PREVIEWS_LOADED = """() => app.graph.nodes.filter((n) => ["PreviewImage", "SaveImage"].includes(n.type))
  .every((n) => n.imgs?.length && n.imgs.every((img) => img.complete && img.naturalWidth > 0))"""

POLL = """async ([predicate, arg, milliseconds]) => {
  const check = eval(predicate);
  const deadline = Date.now() + milliseconds;
  while (!check(arg) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
  return !!check(arg);
}"""


def wait_until(page, predicate: str, arg=None, seconds: float = 10) -> bool:
    """Poll a JS predicate in the page; False (no exception) when it still fails after ``seconds``."""
    return page.evaluate(POLL, [predicate, arg, seconds * 1000])


def test_extension_is_served_and_registered(page, comfy_server):
    assert EXTENSION_URL in comfy_server.get("/extensions")
    names = page.evaluate("() => app.extensions.map((e) => e.name)")
    assert EXTENSION_NAME in names, "web/guidance_kit.js did not register its extension"
    assert not [e for e in page.errors if "guidance_kit" in e], page.errors


def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ holds no workflow"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_runs_and_shows_summaries(page, path):
    workflow = json.loads(path.read_text())
    loaded = page.evaluate(LOAD_WORKFLOW, [workflow, path.stem])
    assert loaded["missing"] == [] and loaded["broken"] == [], loaded
    assert loaded["nodes"] == len(workflow["nodes"])

    page.evaluate(WATCH_EXECUTION)
    page.evaluate(QUEUE)
    page.wait_for_function("() => window.__guidanceKitTest.status !== null", timeout=RUN_SECONDS * 1000)
    record = page.evaluate("() => window.__guidanceKitTest")
    assert record["status"] == "success", json.dumps(record["error"])[:3000]
    assert record["summaries"], f"{path.name}: no Guidance Kit node reported a run summary"

    sent = {str(s["node"]): s["text"] for s in record["summaries"]}
    run_stats_ids = [str(n["id"]) for n in workflow["nodes"] if n["type"] == RUN_STATS_NODE]
    page.evaluate(FIT_VIEW)  # every node on screen: DOM widgets of off-screen nodes are hidden
    wait_until(page, f"(ids) => ({SHOWN_SUMMARIES})(ids).every((s) => s.text && s.visible)", [*sent, *run_stats_ids],
               seconds=10)
    shown = {s["id"]: s for s in page.evaluate(SHOWN_SUMMARIES, [*sent, *run_stats_ids])}
    for node_id, text in sent.items():
        assert shown[node_id]["text"] == shown[node_id]["property"] == text, f"summary not shown: {shown[node_id]}"
        assert shown[node_id]["visible"], f"summary hidden: {shown[node_id]}"
    for node_id in run_stats_ids:
        assert shown[node_id]["text"] in sent.values(), f"Run Stats summary not shown: {shown[node_id]}"
        assert shown[node_id]["visible"], f"summary hidden: {shown[node_id]}"
    saved = dict(page.evaluate(
        "() => app.graph.serialize().nodes.map((n) => [String(n.id), n.widgets_values ?? null])"))
    for node in workflow["nodes"]:
        if str(node["id"]) in shown:
            assert (saved[str(node["id"])] or []) == node.get("widgets_values", []), \
                "the summary leaked into the workflow"

    wait_until(page, PREVIEWS_LOADED, seconds=10)  # a screenshot without the previews is still worth keeping
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    screenshot = SCREENSHOTS / f"{path.stem}.png"
    page.screenshot(path=str(screenshot))
    with Image.open(screenshot) as image:
        assert image.size == (page.viewport_size["width"], page.viewport_size["height"])
        assert max(ImageStat.Stat(image.convert("L")).stddev) > 5, "blank screenshot"
