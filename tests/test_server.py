"""The pack inside the real ComfyUI server: import, /object_info, /prompt + /history, comfy-cli."""
import json
from pathlib import Path

TESTS = Path(__file__).resolve().parent
WORKFLOW = TESTS / "workflows" / "tiny_reference_cfg.json"
PACK_NODES = {"GuidanceKitReferenceCFGGuider"}


def test_pack_imports_without_failure(comfy_server):
    assert comfy_server.import_failures() == [], comfy_server.log()[-3000:]
    assert "guidance_kit" in comfy_server.log()


def test_pack_nodes_are_registered_with_tooltips(comfy_server):
    info = comfy_server.get("/object_info")
    assert PACK_NODES <= info.keys()
    for node in PACK_NODES:
        inputs = info[node]["input"]["required"]
        assert all(spec[1].get("tooltip") for spec in inputs.values()), node


def test_prompt_runs_and_history_reports_output(comfy_server):
    entry = comfy_server.run(json.loads(WORKFLOW.read_text()))
    saved = entry["outputs"]["7"]["latents"]
    assert len(saved) == 1
    assert (comfy_server.output_dir / saved[0]["subfolder"] / saved[0]["filename"]).stat().st_size > 0


def test_comfy_cli_runs_the_workflow_file(comfy_server):
    before = comfy_server.get("/history")
    result = comfy_server.comfy_cli_run(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    new = {k: v for k, v in comfy_server.get("/history").items() if k not in before}
    assert len(new) == 1
    (entry,) = new.values()
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["7"]["latents"]
