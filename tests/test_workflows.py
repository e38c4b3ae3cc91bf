"""The toy workflows (workflows/toy_*.json): UI format, only registered nodes, run through the real server
with `comfy run --workflow` on the toy model, and linked from the README.  The real-model workflows
(SD1.5, SDXL, SD3.5, Flux) are checked by tests/test_workflow_files.py and tests/test_real_model_workflows.py."""
import json
from pathlib import Path

import pytest

from harness.workflow_api import VIRTUAL_NODES

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("toy_*.json"))


def ui_nodes(workflow: dict) -> list[dict]:
    return workflow["nodes"] + [node for subgraph in workflow.get("definitions", {}).get("subgraphs", [])
                                for node in subgraph.get("nodes", [])]


def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ holds no workflow"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_ui_format_on_the_toy_model(path):
    workflow = json.loads(path.read_text())
    assert isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list), \
        f"{path.name} is not in the UI format (File > Save, not Export (API))"
    assert workflow.get("version") == 0.4
    types = {node["type"] for node in ui_nodes(workflow)}
    assert "GuidanceKitToyWorldLoader" in types, f"{path.name} does not run on the toy model"
    assert not types & {"CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "VAELoader"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_comfy_run_executes_the_workflow(comfy_server, path):
    registered = comfy_server.get("/object_info").keys()
    missing = {node["type"] for node in ui_nodes(json.loads(path.read_text()))} - registered - VIRTUAL_NODES
    assert not missing, f"{path.name} uses unregistered nodes {sorted(missing)}"
    before = comfy_server.get("/history").keys()
    result = comfy_server.comfy_cli_run(path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    new = [entry for prompt_id, entry in comfy_server.get("/history").items() if prompt_id not in before]
    assert len(new) == 1 and new[0]["status"]["status_str"] == "success", json.dumps(new)[:3000]
    images = [image for output in new[0]["outputs"].values() for image in output.get("images", [])]
    assert images, f"{path.name} produced no image"


def test_docs_link_every_workflow():
    """README.md links docs/workflows.md, and that page links every shipped workflow."""
    assert "](docs/workflows.md)" in (REPO / "README.md").read_text()
    page = (REPO / "docs" / "workflows.md").read_text()
    unlinked = [path.name for path in WORKFLOWS if f"](../workflows/{path.name})" not in page]
    assert not unlinked, f"docs/workflows.md does not link {unlinked}"
