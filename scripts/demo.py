"""`make demo`: run every toy workflow in workflows/ on the real ComfyUI server, collect the images.

Starts ``main.py --cpu`` with the pack installed, sends each workflow file through comfy-cli
(``comfy run --workflow ... --wait``, UI-format files are converted with the server's
/object_info), copies the saved images to ``out/demo/`` and draws a contact sheet
(``out/demo/contact_sheet.png``: one row per workflow, captioned with its technique and prompt).
"""
import json
import shutil
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from harness.server import ComfyServer  # noqa: E402

OUT = REPO / "out" / "demo"
CELL = 128
LABEL_WIDTH = 330
PROMPT_NODES = {"CLIPTextEncode", "PrimitiveStringMultiline", "GuidanceKitComposablePrompt"}
TECHNIQUES = {"adaptive_guidance": "Adaptive Guidance", "autoguidance": "Autoguidance (+ GFCG)",
              "composable_nodes": "Composable (Concept nodes)", "composable_prompt": "Composable (AND / NOT prompt)",
              "deediff": "DeeDiff early exit", "gfcg": "GFCG", "lina_schedule": "LINA causality-aware schedule",
              "linear_ag": "LinearAG (calibrated here)", "linear_ag_shipped": "LinearAG (shipped calibration)",
              "ppap": "PPAP", "reference_cfg": "Reference CFG (baseline)"}


def caption(workflow: Path) -> list[str]:
    """A contact-sheet row's caption: the technique (from the file name) and the first non-empty prompt."""
    nodes = sorted(json.loads(workflow.read_text())["nodes"], key=lambda n: n["id"])
    prompts = [n["widgets_values"][0] for n in nodes if n["type"] in PROMPT_NODES and n.get("widgets_values")
               and n["widgets_values"][0]]
    name = workflow.stem.removeprefix("toy_")
    technique = TECHNIQUES.get(name, name.replace("_", " "))
    prompt = f'"{prompts[0]}"' if prompts else "(empty prompt: unconditional)"
    return [technique, *textwrap.wrap(prompt, 44)]


def saved_images(server: ComfyServer, entry: dict) -> list[Path]:
    return [server.output_dir / image["subfolder"] / image["filename"]
            for output in entry["outputs"].values() for image in output.get("images", [])
            if image.get("type") == "output"]


def run_workflow(server: ComfyServer, workflow: Path) -> list[Path]:
    before = set(server.get("/history"))
    result = server.comfy_cli_run(workflow)
    if result.returncode != 0:
        raise SystemExit(f"{workflow.name} failed:\n{result.stdout}\n{result.stderr}")
    entries = [entry for key, entry in server.get("/history").items() if key not in before]
    copies = []
    for index, source in enumerate(path for entry in entries for path in saved_images(server, entry)):
        target = OUT / f"{workflow.stem}_{index:02d}.png"
        shutil.copyfile(source, target)
        copies.append(target)
    return copies


def contact_sheet(rows: dict[Path, list[Path]], path: Path) -> None:
    """One row per workflow: its caption (technique, prompt), then its images at CELL pixels."""
    cell = CELL
    width = LABEL_WIDTH + cell * max(len(images) for images in rows.values())
    sheet = Image.new("RGB", (width, cell * len(rows)), (24, 24, 28))
    draw = ImageDraw.Draw(sheet)
    for row, (workflow, images) in enumerate(rows.items()):
        for line, text in enumerate(caption(workflow)):
            draw.text((8, row * cell + 12 + 16 * line), text, fill=(250, 220, 120) if line == 0 else (230, 230, 230))
        for column, image_path in enumerate(images):
            image = Image.open(image_path).convert("RGB")
            image = image.resize((cell, cell * image.height // image.width), Image.NEAREST)
            sheet.paste(image, (LABEL_WIDTH + column * cell, row * cell))
    sheet.save(path)


def main() -> None:
    workflows = sorted((REPO / "workflows").glob("toy_*.json"))  # the real-model ones need the user's models
    if not workflows:
        raise SystemExit("no toy workflows in workflows/")
    OUT.mkdir(parents=True, exist_ok=True)
    rows = {}
    with ComfyServer() as server:
        for workflow in workflows:
            print(f"running {workflow.name} ...", flush=True)
            # The sheet shows generated (square) images; wide outputs (stats plots) stay in out/demo/ only.
            rows[workflow] = [p for p in run_workflow(server, workflow) if Image.open(p).width == Image.open(p).height]
    rows = {name: images for name, images in rows.items() if images}
    sheet = OUT / "contact_sheet.png"
    contact_sheet(rows, sheet)
    print(f"demo images written to {OUT}/ ({sum(map(len, rows.values()))} images from {len(workflows)} workflows)")
    print(f"contact sheet: {sheet}")


if __name__ == "__main__":
    main()
