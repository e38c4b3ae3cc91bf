"""In-app help: the real frontend's node help panel shows the pack's page for a node.

ComfyUI's frontend (1.32) fetches a custom node's help from ``/extensions/<pack>/docs/<node id>/<locale>.md``,
then ``/extensions/<pack>/docs/<node id>.md``, which ``web/docs/<node id>.md`` serves (WEB_DIRECTORY). Without
a page the panel falls back to the node's description and inputs, so the test reads a sentence that only the
page has."""
import importlib.util
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NODES = ["GuidanceKitGFCG", "GuidanceKitRunStats"]

# One node of the type on an empty canvas, selected, in view: the selection toolbox then offers its info button.
SELECT_NEW_NODE = """async (type) => {
  app.graph.clear();
  const node = LiteGraph.createNode(type);
  node.pos = [600, 400];
  app.graph.add(node);
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1;
  app.canvas.deselectAll?.();
  app.canvas.selectNode(node);
  app.canvas.setDirty(true, true);
  return node.id;
}"""

HELP_TEXT = "() => [...document.querySelectorAll('.node-help-content')].map((e) => e.innerText).join('\\n')"


def page_sentence(node_type: str) -> str:
    """The last sentence of the node's overview (scripts/make_node_docs.py), which the panel's fallback lacks."""
    spec = importlib.util.spec_from_file_location("make_node_docs", REPO / "scripts" / "make_node_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OVERVIEW[node_type][0].rstrip(".").split(". ")[-1].replace("`", "")


def test_help_pages_are_served(comfy_server):
    for node_type in NODES:
        with urllib.request.urlopen(f"{comfy_server.url}/extensions/guidance_kit/docs/{node_type}.md") as response:
            assert page_sentence(node_type) in response.read().decode().replace("`", "")


@pytest.mark.parametrize("node_type", NODES)
def test_node_help_panel_shows_the_pack_page(page, node_type):
    page.evaluate(SELECT_NEW_NODE, node_type)
    info = page.locator('[data-testid="info-button"]')
    info.first.wait_for(state="visible", timeout=20_000)
    info.first.click()
    sentence = page_sentence(node_type)
    page.wait_for_function(f"() => ({HELP_TEXT})().replace(/`/g, '').includes({sentence!r})", timeout=20_000)
    shown = page.evaluate(HELP_TEXT)
    assert "## Inputs" not in shown and "Inputs" in shown, "the page's markdown was not rendered"
    # Close the panel again (the info button toggles it) so later tests start from the plain canvas.
    info.first.click()
