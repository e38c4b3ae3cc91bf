"""The pack inside the real ComfyUI server: import, /object_info, /prompt + /history, comfy-cli."""
import json
from pathlib import Path

import pytest

from harness.server import ComfyServer

TESTS = Path(__file__).resolve().parent
WORKFLOW = TESTS / "workflows" / "tiny_reference_cfg.json"
PACK_NODES = {"GuidanceKitReferenceCFGGuider"}


@pytest.fixture(scope="module")
def server():
    with ComfyServer(extra_custom_nodes=[TESTS / "comfy_test_nodes"]) as running:
        yield running


def test_pack_imports_without_failure(server):
    assert server.import_failures() == [], server.log()[-3000:]
    assert "guidance_kit" in server.log()


def test_pack_nodes_are_registered_with_tooltips(server):
    info = server.get("/object_info")
    assert PACK_NODES <= info.keys()
    for node in PACK_NODES:
        inputs = info[node]["input"]["required"]
        assert all(spec[1].get("tooltip") for spec in inputs.values()), node


def test_prompt_runs_and_history_reports_output(server):
    entry = server.run(json.loads(WORKFLOW.read_text()))
    saved = entry["outputs"]["7"]["latents"]
    assert len(saved) == 1
    assert (server.output_dir / saved[0]["subfolder"] / saved[0]["filename"]).stat().st_size > 0


def test_comfy_cli_runs_the_workflow_file(server):
    before = server.get("/history")
    result = server.comfy_cli_run(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    new = {k: v for k, v in server.get("/history").items() if k not in before}
    assert len(new) == 1
    (entry,) = new.values()
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["7"]["latents"]
